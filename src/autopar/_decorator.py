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
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, Unpack, overload

import wrapt

from autopar._calls import Calls, split_keywords, star_calls, take, zip_calls
from autopar._collect import LoopIterator, run_as_completed, run_imap, run_map
from autopar._errors import UnsafeLoopError
from autopar._options import OPTION_NAMES, LoopOptions, Options, resolve, validate
from autopar._plan import Loop
from autopar._replay import Rerun
from autopar._results import LoopResult
from autopar._serialize import dumps, loads, reduce_with
from autopar._verify import VerifyReport, verify
from autopar._worker import in_iteration, in_worker_process

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

    def _loop(self, calls: Calls, broadcast: dict[str, Any]) -> Loop:
        """The loop to run now: options are resolved at call time."""
        self._refuse_options_as_arguments(broadcast, calls.keywords)
        options = resolve(self._loop_options())
        sample = _verify_sample()
        if sample is not None:
            head, calls = take(calls, sample)
            report = self._verify(head, calls, broadcast, options)
            if not report.ok:
                raise UnsafeLoopError(report)
        target, name = self._loop_target(), self._loop_name()
        rerun = Rerun(target, name, calls.keywords, self._loop_options())
        arguments, total, single, keywords = calls
        return Loop(target, name, arguments, broadcast, options, total, single, keywords, None, rerun)

    def _verify(self, head: list[Any], calls: Calls, broadcast: dict[str, Any], options: Options) -> VerifyReport:
        return verify(self._loop_target(), self._loop_name(), head, calls.single, calls.keywords, broadcast, options)

    def _refuse_options_as_arguments(self, broadcast: dict[str, Any], keywords: tuple[str, ...]) -> None:
        """``f.map(xs, chunksize=8)``, as for ``Executor.map``, would pass ``chunksize`` to every
        iteration, each failing with "unexpected keyword argument": say where options go."""
        given = broadcast.keys() | set(keywords)
        if given.isdisjoint(OPTION_NAMES):
            return
        try:
            parameters = inspect.signature(self.__wrapped__).parameters  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return  # a builtin without a signature: let the iterations say
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
            return
        for name in sorted(given & set(OPTION_NAMES) - parameters.keys()):
            name_value = f"{name}={'each(...)' if name in keywords else repr(broadcast[name])}"
            raise TypeError(
                f"{self._loop_name()}() takes no argument {name!r}, and autopar's options do not go "
                f"to map(): use .options({name_value}).map(...), or parallel_loop({name_value})"
            )

    def _loop_name(self) -> str:
        wrapped = self.__wrapped__  # type: ignore[attr-defined]
        return getattr(wrapped, "__qualname__", None) or repr(wrapped)

    def map(self, *iterables: Iterable[Any], **kwargs: Any) -> LoopResult[R]:
        """Run one iteration per element (several iterables are zipped, as builtin ``map``
        does), in parallel; keyword arguments go to every iteration, or one value to each
        given as ``each(values)``. Results in input order."""
        per_iteration, broadcast = split_keywords(kwargs)
        return run_map(self._loop(zip_calls("map", iterables, per_iteration), broadcast))

    def starmap(self, iterable: Iterable[Iterable[Any]], **kwargs: Any) -> LoopResult[R]:
        """Like `map`, but each element is a tuple of positional arguments."""
        per_iteration, broadcast = split_keywords(kwargs)
        return run_map(self._loop(star_calls(iterable, per_iteration), broadcast))

    def imap(self, *iterables: Iterable[Any], **kwargs: Any) -> LoopIterator[R]:
        """A lazy iterator of results in input order; the input is read only as workers free
        up, so memory stays bounded for huge or endless iterables."""
        per_iteration, broadcast = split_keywords(kwargs)
        return run_imap(self._loop(zip_calls("imap", iterables, per_iteration), broadcast))

    def as_completed(self, *iterables: Iterable[Any], **kwargs: Any) -> LoopIterator[tuple[int, R]]:
        """A lazy iterator of ``(index, value)`` pairs in the order iterations finish (as
        ``concurrent.futures.as_completed``, with the index that says which input it was);
        memory stays bounded, as with `imap`."""
        per_iteration, broadcast = split_keywords(kwargs)
        return run_as_completed(self._loop(zip_calls("as_completed", iterables, per_iteration), broadcast))

    def verify(self, *iterables: Iterable[Any], sample: int | None = 32, **kwargs: Any) -> VerifyReport:
        """Run the first ``sample`` iterations (None: all) serially in this process, as the
        old loop did, and through this loop's backend, and report what differs: values,
        arguments or module globals an iteration changes (which workers would lose), draws
        from process-global random generators. Takes what `map` takes."""
        if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
            raise TypeError(f"verify(sample={sample!r}): expected a whole number of iterations (1 or more), or None")
        if sample is not None and sample < 1:
            raise ValueError(f"verify(sample={sample!r}): compare at least 1 iteration (or None: all of them)")
        per_iteration, broadcast = split_keywords(kwargs)
        calls = zip_calls("verify", iterables, per_iteration)
        self._refuse_options_as_arguments(broadcast, calls.keywords)
        head, _ = take(calls, sample)
        return self._verify(head, calls, broadcast, resolve(self._loop_options()))

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


def _verify_sample() -> int | None:
    """``AUTOPAR_VERIFY=N``: how many first iterations every loop verifies before it runs
    (None: unset, or inside an iteration, whose own loop was verified)."""
    text = os.environ.get("AUTOPAR_VERIFY", "").strip()
    if not text or in_worker_process() or in_iteration():
        return None
    try:
        sample = int(text)
    except ValueError:
        raise ValueError(f"AUTOPAR_VERIFY={text!r} is not a whole number of iterations to verify") from None
    if sample < 0:
        raise ValueError(f"AUTOPAR_VERIFY={text!r} must be 0 (off) or more")
    return sample or None


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
