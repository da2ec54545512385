"""The ``@parallel_loop`` decorator: the plain call untouched, plus ``map``/``starmap``/``imap``.

`LoopFunction` is a wrapt `FunctionWrapper`, so the decorated function keeps its name,
docstring, signature and ``__wrapped__``, and binds as a method. `BoundLoopFunction` is what
``obj.method`` gives, so that ``obj.method.map(xs)`` runs the method of ``obj``. Scheduling
lives elsewhere: the methods here only resolve options and hand over to the collector.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, Unpack, overload

import wrapt

from autopar._collect import LoopIterator, run_imap, run_map
from autopar._engine import Loop
from autopar._options import OPTION_NAMES, LoopOptions, Options, resolve, validate
from autopar._results import LoopResult
from autopar._serialize import dumps, loads, reduce_with

__all__ = ["BoundLoopFunction", "LoopFunction", "parallel_loop"]

P = ParamSpec("P")
R = TypeVar("R")
_P = ParamSpec("_P")
_R = TypeVar("_R")
_Self = TypeVar("_Self")


def _plain_call(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return wrapped(*args, **kwargs)


class _LoopMethods(Generic[P, R]):
    """``map``, ``starmap``, ``imap`` and ``options``, shared by plain and bound wrappers."""

    # wrapt makes a proxy claim its wrapped object's class. For a loop function that would make
    # cloudpickle take it for a plain function and pickle the bare function by value (from
    # `__main__`, a notebook or a closure), silently losing `map` and the options.
    @property  # type: ignore[misc]
    def __class__(self) -> type[Any]:
        return type(self)

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        """The function's attributes, as for any wrapt proxy (not this wrapper's own state)."""
        attributes: dict[str, Any] = self.__wrapped__.__dict__  # type: ignore[attr-defined]
        return attributes

    if TYPE_CHECKING:  # each subclass defines these; declared so (class annotations would
        # hide the function's own ``__annotations__`` behind the proxy, for get_type_hints)

        def _loop_target(self) -> Callable[..., Any]:
            """What the workers call: picklable, and bound to its instance for a method."""

        def _loop_options(self) -> Options:
            """The options the decorator and ``.options()`` gave."""

    def _loop(self, calls: _Calls, broadcast: dict[str, Any]) -> Loop:
        """The loop to run now: options are resolved at call time."""
        if not broadcast.keys().isdisjoint(OPTION_NAMES):
            self._refuse_options_as_arguments(broadcast)
        options = resolve(self._loop_options())
        arguments, total, single = calls
        return Loop(self._loop_target(), self._loop_name(), arguments, broadcast, options, total, single)

    def _refuse_options_as_arguments(self, broadcast: dict[str, Any]) -> None:
        """``f.map(xs, chunksize=8)``, as for ``Executor.map``, would pass ``chunksize`` to every
        iteration, each failing with "unexpected keyword argument": say where options go."""
        try:
            parameters = inspect.signature(self.__wrapped__).parameters  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return  # a builtin without a signature: let the iterations say
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
            return
        for name in sorted(broadcast.keys() & set(OPTION_NAMES) - parameters.keys()):
            name_value = f"{name}={broadcast[name]!r}"
            raise TypeError(
                f"{self._loop_name()}() takes no argument {name!r}, and autopar's options do not go "
                f"to map(): use .options({name_value}).map(...), or parallel_loop({name_value})"
            )

    def _loop_name(self) -> str:
        wrapped = self.__wrapped__  # type: ignore[attr-defined]
        return getattr(wrapped, "__qualname__", None) or repr(wrapped)

    def map(self, *iterables: Iterable[Any], **kwargs: Any) -> LoopResult[R]:
        """Run one iteration per element (several iterables are zipped, as builtin ``map``
        does), in parallel; keyword arguments go to every iteration. Results in input order."""
        return run_map(self._loop(_zip_calls("map", iterables), kwargs))

    def starmap(self, iterable: Iterable[Iterable[Any]], **kwargs: Any) -> LoopResult[R]:
        """Like `map`, but each element is a tuple of positional arguments."""
        return run_map(self._loop(_star_calls(iterable), kwargs))

    def imap(self, *iterables: Iterable[Any], **kwargs: Any) -> LoopIterator[R]:
        """A lazy iterator of results in input order; the input is read only as workers free
        up, so memory stays bounded for huge or endless iterables."""
        return run_imap(self._loop(_zip_calls("imap", iterables), kwargs))

    def options(self, **changes: Unpack[LoopOptions]) -> LoopFunction[P, R]:
        """A copy of this loop function with some options changed."""
        return LoopFunction(self._loop_target_unbound(), self._loop_options().merge(changes))

    def _loop_target_unbound(self) -> Callable[..., Any]:
        return self.__wrapped__  # type: ignore[attr-defined, no-any-return]


class BoundLoopFunction(_LoopMethods[P, R], wrapt.BoundFunctionWrapper[P, R]):
    """A `LoopFunction` reached through an instance: ``obj.method.map(xs)``."""

    def _loop_target(self) -> Callable[..., Any]:
        return self.__wrapped__

    def _loop_options(self) -> Options:
        options: Options = self._self_parent._self_options
        return options

    def __reduce_ex__(self, protocol: Any) -> Any:
        """``obj.method`` pickles as ``getattr(obj, "method")`` (``C.method`` as ``getattr(C, ...)``)."""
        owner = self._self_instance if self._self_instance is not None else self._self_owner
        return getattr, (owner, self.__wrapped__.__name__)


class LoopFunction(_LoopMethods[P, R], wrapt.FunctionWrapper[P, R]):
    """A function decorated with `parallel_loop`: call it as before, or loop it in parallel."""

    __bound_function_wrapper__ = BoundLoopFunction  # type: ignore[assignment]  # wrapt's stub is invariant

    def __init__(self, wrapped: Callable[P, R], options: Options) -> None:
        super().__init__(wrapped, _plain_call)
        self._self_options = options

    def _loop_target(self) -> Callable[..., Any]:
        return self

    def _loop_options(self) -> Options:
        return self._self_options

    if TYPE_CHECKING:  # wrapt's own __get__ (in C) binds; this says what it gives to mypy,
        # whose reading of wrapt's stubs loses `map` on a bound method and binds `self` twice.

        @overload  # type: ignore[override]
        def __get__(self, instance: None, owner: type[Any] | None = None, /) -> LoopFunction[P, R]: ...
        @overload
        def __get__(
            self: LoopFunction[Concatenate[_Self, _P], _R], instance: _Self, owner: type[Any] | None = None, /
        ) -> BoundLoopFunction[_P, _R]: ...
        @overload
        def __get__(self, instance: object, owner: type[Any] | None = None, /) -> BoundLoopFunction[P, R]: ...
        def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Any: ...

    @property
    def _autopar_unwrapped(self) -> Callable[P, R]:
        """What a worker calls: the function itself, without the call-through wrapper."""
        return self.__wrapped__

    def __repr__(self) -> str:
        return f"<parallel_loop {self._loop_name()}>"

    def __copy__(self) -> LoopFunction[P, R]:
        return LoopFunction(self.__wrapped__, self._self_options)

    def __deepcopy__(self, memo: dict[int, Any]) -> LoopFunction[P, R]:
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle by reference when importable (cheap, and the worker imports the module);
        otherwise (``__main__``, notebooks, closures, lambdas) carry the function by value."""
        return self._reduce(within_cloudpickle=False)

    def _reduce(self, *, within_cloudpickle: bool) -> Any:
        """What `__reduce_ex__` says. ``within_cloudpickle``: autopar's own pickler is the one
        asking (it registers this), so the function by value goes into the same pickle, whose
        memo ends the cycle of a function that refers to itself (recursion, ``super()``, its
        own class); any other pickler gets it pickled apart, as bytes, and would recurse."""
        options = _portable(self._self_options)
        module_name = getattr(self.__wrapped__, "__module__", None)
        qualname = getattr(self.__wrapped__, "__qualname__", "")
        if module_name and module_name != "__main__" and "<locals>" not in qualname:
            found = _lookup(module_name, qualname)
            if found is self:
                return qualname
            if isinstance(found, LoopFunction) and found.__wrapped__ is self.__wrapped__:
                return _with_options, (found, options)
        if within_cloudpickle:
            return LoopFunction, (self.__wrapped__, options)
        return _by_value, (dumps(self.__wrapped__), options)


reduce_with(LoopFunction, functools.partial(LoopFunction._reduce, within_cloudpickle=True))


def _lookup(module_name: str, qualname: str) -> Any:
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return found


def _portable(options: Options) -> Options:
    """Options fit for pickling: a live executor instance stays behind."""
    return options if isinstance(options.backend, str) else replace(options, backend="process")


def _with_options(found: LoopFunction[P, R], options: Options) -> LoopFunction[P, R]:
    return LoopFunction(found.__wrapped__, options)


def _by_value(function: bytes, options: Options) -> LoopFunction[Any, Any]:
    return LoopFunction(loads(function), options)


class _Calls(NamedTuple):
    arguments: Iterable[Any]
    total: int | None
    single: bool
    """``arguments`` yields each call's only argument (one iterable), else a tuple of them."""


def _zip_calls(method: str, iterables: tuple[Iterable[Any], ...]) -> _Calls:
    if not iterables:
        raise TypeError(f"{method}() needs at least one iterable of arguments")
    for position, iterable in enumerate(iterables, 1):
        if not isinstance(iterable, Iterable):
            raise TypeError(f"{method}() argument {position} must be iterable, not {type(iterable).__name__}")
    lengths = [_length(it) for it in iterables]
    known = [length for length in lengths if length is not None]
    # The calls stop with the shortest iterable: its length, if every one has a length.
    total = min(known) if known and all(isinstance(it, Sized) for it in iterables) else None
    if len(iterables) == 1:  # no 1-tuple per call to build, pickle and unpack
        return _Calls(iterables[0], total, True)
    return _Calls(zip(*iterables, strict=False), total, False)


def _length(iterable: Iterable[Any]) -> int | None:
    """The number of elements, or None when unknown: no ``len()``, or more than ``len()``
    can count (``range(10**20)``, which iterates fine)."""
    if not isinstance(iterable, Sized):
        return None
    try:
        return len(iterable)
    except OverflowError:
        return None


def _star_calls(iterable: Iterable[Iterable[Any]]) -> _Calls:
    if not isinstance(iterable, Iterable):
        raise TypeError(f"starmap() argument must be iterable, not {type(iterable).__name__}")
    total = _length(iterable)

    def calls() -> Iterator[tuple[Any, ...]]:
        for index, args in enumerate(iterable):
            if not isinstance(args, Iterable) or isinstance(args, str | bytes | Mapping | AbstractSet):
                keywords = isinstance(args, Mapping)
                hint = " (for keyword arguments, map a function that calls f(**kwargs))" if keywords else ""
                raise TypeError(
                    f"starmap(): element {index} is {args!r} ({type(args).__name__}), "
                    f"not a tuple of positional arguments{hint}"
                )
            yield tuple(args)

    return _Calls(calls(), total, False)


@overload
def parallel_loop(function: Callable[P, R], /) -> LoopFunction[P, R]: ...
@overload
def parallel_loop(
    function: None = None, /, **options: Unpack[LoopOptions]
) -> Callable[[Callable[P, R]], LoopFunction[P, R]]: ...
def parallel_loop(
    function: Callable[P, R] | None = None, /, **options: Unpack[LoopOptions]
) -> LoopFunction[P, R] | Callable[[Callable[P, R]], LoopFunction[P, R]]:
    """Decorate a per-iteration function so that its loop can run in parallel.

    ``@parallel_loop`` or ``@parallel_loop(workers=4, on_error="collect", ...)``. The function
    still runs as before when called; ``f.map(xs)`` runs every iteration in parallel and returns
    a `LoopResult` in input order. Options are checked here, and resolved again at each call
    (``AUTOPAR_BACKEND`` and ``AUTOPAR_WORKERS`` are read then).
    """
    resolved = Options().merge(validate(options))

    def decorate(target: Callable[P, R]) -> LoopFunction[P, R]:
        if not callable(target) and not isinstance(target, classmethod | staticmethod):
            raise TypeError(f"parallel_loop decorates a function, not {type(target).__name__}")
        return LoopFunction(target, resolved)

    if function is None:
        return decorate
    return decorate(function)
