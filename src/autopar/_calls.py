"""From what ``map``/``starmap`` were given to the calls of a loop: zipped iterables, and
keyword arguments that are per-iteration (`each`) or broadcast (the rest)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sized
from collections.abc import Set as AbstractSet
from typing import Any, Generic, NamedTuple, TypeVar

__all__ = ["Calls", "each", "own_keywords", "split_keywords", "star_calls", "take", "zip_calls"]

T = TypeVar("T")


class each(Generic[T]):  # a marker used like a function: offset=each(offsets)
    """Mark a keyword argument of ``map`` (``starmap``, ``imap``, ``verify``...) as one value
    per iteration: ``f.map(xs, offset=each(offsets), scale=2.0)`` calls
    ``f(x, offset=o, scale=2.0)`` for ``x, o`` zipped (the shortest input ends the loop);
    ``scale`` stays one value for every iteration."""

    __slots__ = ("iterable",)

    def __init__(self, iterable: Iterable[T]) -> None:
        if not isinstance(iterable, Iterable):
            raise TypeError(f"each() takes an iterable of per-iteration values, not {type(iterable).__name__}")
        self.iterable = iterable

    def __repr__(self) -> str:
        return f"each({self.iterable!r})"

    def __reduce__(self) -> Any:
        raise TypeError("each(...) marks a keyword argument of map(); it is not a value to send to an iteration")


class Calls(NamedTuple):
    arguments: Iterable[Any]
    total: int | None
    single: bool
    """``arguments`` yields each call's only argument (one iterable), else a tuple of them."""
    keywords: tuple[str, ...] = ()
    """The names of the per-iteration keyword arguments, whose values end each tuple."""


def split_keywords(kwargs: dict[str, Any]) -> tuple[dict[str, Iterable[Any]], dict[str, Any]]:
    """The per-iteration keyword arguments (their iterables), and the broadcast ones."""
    per_iteration = {name: value.iterable for name, value in kwargs.items() if isinstance(value, each)}
    if not per_iteration:
        return {}, kwargs
    return per_iteration, {name: value for name, value in kwargs.items() if name not in per_iteration}


def own_keywords(args: tuple[Any, ...], keywords: tuple[str, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's positional arguments, and its own keyword arguments (`each`), whose values
    end its tuple of arguments."""
    if not keywords:
        return args, {}
    count = len(keywords)
    return args[:-count], dict(zip(keywords, args[-count:], strict=True))


def zip_calls(method: str, iterables: tuple[Iterable[Any], ...], per_iteration: dict[str, Iterable[Any]]) -> Calls:
    """The calls of ``f.map(*iterables, name=each(...))``: the iterables zipped."""
    if not iterables and not per_iteration:
        raise TypeError(
            f"{method}() needs at least one iterable of arguments, or a keyword argument given as each(...)"
        )
    for position, iterable in enumerate(iterables, 1):
        if not isinstance(iterable, Iterable):
            raise TypeError(f"{method}() argument {position} must be iterable, not {type(iterable).__name__}")
    every = (*iterables, *per_iteration.values())
    total = _shortest(every)
    if len(iterables) == 1 and not per_iteration:  # no 1-tuple per call to build, pickle and unpack
        return Calls(iterables[0], total, True)
    return Calls(zip(*every, strict=False), total, False, tuple(per_iteration))


def star_calls(iterable: Iterable[Iterable[Any]], per_iteration: dict[str, Iterable[Any]]) -> Calls:
    """The calls of ``f.starmap(tuples, name=each(...))``."""
    if not isinstance(iterable, Iterable):
        raise TypeError(f"starmap() argument must be iterable, not {type(iterable).__name__}")
    total = _shortest((iterable, *per_iteration.values()))

    def calls() -> Iterator[tuple[Any, ...]]:
        for index, args in enumerate(iterable):
            if not isinstance(args, Iterable) or isinstance(args, str | bytes | Mapping | AbstractSet):
                keywords = isinstance(args, Mapping)
                hint = " (for keyword arguments, map a function that calls f(**kwargs), or pass name=each(values))"
                hint = hint if keywords else ""
                raise TypeError(
                    f"starmap(): element {index} is {args!r} ({type(args).__name__}), "
                    f"not a tuple of positional arguments{hint}"
                )
            yield tuple(args)

    if not per_iteration:
        return Calls(calls(), total, False)
    joined = (args + values for args, values in zip(calls(), zip(*per_iteration.values(), strict=False), strict=False))
    return Calls(joined, total, False, tuple(per_iteration))


def take(calls: Calls, count: int | None) -> tuple[list[Any], Calls]:
    """The first ``count`` calls (every one for None), and the calls as they were."""
    arguments = calls.arguments
    if count is None:
        head = list(arguments)
        return head, calls._replace(arguments=head, total=len(head))
    if isinstance(arguments, list | tuple | range):  # stays a sequence, which the engine slices
        return list(arguments[:count]), calls
    iterator = iter(arguments)
    head = list(itertools.islice(iterator, count))
    return head, calls._replace(arguments=itertools.chain(head, iterator))


def _shortest(iterables: Iterable[Iterable[Any]]) -> int | None:
    """The number of calls, when every iterable has a length: the shortest one's."""
    iterables = list(iterables)
    known = [length for length in map(_length, iterables) if length is not None]
    # A Sized one too long for len() (range(10**20)) does not end the loop first.
    return min(known) if known and all(isinstance(it, Sized) for it in iterables) else None


def _length(iterable: Iterable[Any]) -> int | None:
    """The number of elements, or None when unknown: no ``len()``, or more than ``len()``
    can count (``range(10**20)``, which iterates fine)."""
    if not isinstance(iterable, Sized):
        return None
    try:
        return len(iterable)
    except OverflowError:
        return None
