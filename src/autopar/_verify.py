"""``f.verify(xs)``: is the parallel loop the old loop?

The first iterations run twice: serially in this process, in input order, as the old loop
ran them, watching what each one changes besides its return value; then through the loop's
own backend. The report lists what differs and what would be lost in worker processes:
values, arguments changed in place, module globals the function changes, and draws from the
process-global random generators. Changes are found by comparing a digest of each object's
pickle before and after every serial call; an object that cannot be pickled is not checked,
and the report says so.

Verifying leaves the program as it was: the serial run works on copies of the arguments,
and the globals it changed (and the random generators it advanced) are put back afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from autopar._calls import own_keywords
from autopar._collect import run_map
from autopar._hazards import global_names, unwrap
from autopar._options import Options
from autopar._plan import Loop
from autopar._random import DrawWatch, global_states, iteration_streams, put_back_global_states
from autopar._results import describe_call
from autopar._serialize import describe, dumps, loads

__all__ = ["Mismatch", "VerifyReport", "verify"]

_MISSING: Any = object()
_SHOWN = 5  # problems of one kind spelt out in the report; the rest are counted


@dataclass(frozen=True)
class Mismatch:
    """An iteration whose value (or exception) differs between the serial and parallel runs."""

    index: int
    args: tuple[Any, ...]
    serial: Any
    """The serial run's value, or the exception it raised."""
    parallel: Any
    """The parallel run's value, or the exception it raised."""


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found: ``ok`` when the parallel loop is the old loop on the iterations
    compared; ``str(report)`` says what differs and what to change."""

    function: str
    """The loop's function, as messages name it."""
    backend: str
    """The backend the parallel run used."""
    iterations: int
    """How many iterations were compared."""
    mismatches: list[Mismatch] = field(default_factory=list)
    mutated_arguments: list[tuple[int, str]] = field(default_factory=list)
    """``(index, name)``: an iteration changed one of its own or broadcast arguments in place."""
    mutated_globals: list[tuple[int, str]] = field(default_factory=list)
    """``(index, name)``: the first iteration that rebound or changed a module global it reads."""
    global_random: bool = False
    """Iterations drew from a process-global random generator without ``seed=``."""
    unchecked: list[str] = field(default_factory=list)
    """What could not be checked for changes, because it could not be pickled."""
    random_sources: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing was found: same values, nothing changed that would be lost."""
        return not (self.mismatches or self.mutated_arguments or self.mutated_globals or self.global_random)

    def __str__(self) -> str:
        """What was found, causes first (each with what to change), then the values that differ."""
        head = f"verify({self.function}): {_count(self.iterations, 'iteration')}"
        lines = [f"{head}, serially in this process and on {self.backend}."]
        if self.ok:
            lines.append("The parallel loop gave the same values, and no iteration changed anything it would lose.")
        threads = self.backend in ("thread", "ThreadPoolExecutor")
        where = "serial" if self.backend == "serial" else "thread" if threads else "workers"
        lines += [_mutated_global(index, name, where) for index, name in self.mutated_globals]
        by_name: dict[str, list[int]] = {}
        for index, name in self.mutated_arguments:
            by_name.setdefault(name, []).append(index)
        lines += [_mutated_argument(indices, name, where) for name, indices in by_name.items()]
        if self.global_random:
            sources = " and ".join(self.random_sources) or "a process-global generator"
            lines.append(
                f"Iterations drew random numbers from the global generator of {sources}: in parallel, which numbers "
                "an iteration gets depends on the worker and on what ran there before it. Pass seed= to the "
                "decorator or .options() (each iteration then draws from (seed, index), the same on every "
                "backend), or draw from autopar.rng()."
            )
        if self.mismatches:
            lines.append(
                f"{_count(len(self.mismatches), 'iteration')} of {self.iterations} gave other values in parallel:"
            )
            lines += [f"  {self._mismatch(mismatch)}" for mismatch in self.mismatches[:_SHOWN]]
            if len(self.mismatches) > _SHOWN:
                lines.append(f"  ... and {len(self.mismatches) - _SHOWN} more.")
        if self.mismatches and self.seed is not None:
            lines.append(
                "With seed=, an iteration's numbers follow (seed, index) when it draws from autopar.rng() or "
                "the functions of random and numpy.random; a generator it makes itself "
                "(np.random.default_rng()) or one held elsewhere (scipy.stats' default) does not."
            )
        if self.unchecked:
            lines.append(
                f"Not checked for changes, because they could not be pickled (nor copied, so both runs used "
                f"them as they are): {', '.join(self.unchecked)}."
            )
        return "\n".join(lines)

    def _mismatch(self, mismatch: Mismatch) -> str:
        call = describe_call(self.function, mismatch.args, {})
        serial, parallel = _shown(mismatch.serial), _shown(mismatch.parallel)
        return f"iteration {mismatch.index}, {call}: {serial} serially, {parallel} in parallel"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def _iterations(indices: list[int]) -> str:
    """``iteration 3``, ``iterations 0 and 4``, ``iterations 0, 1, 2 and 5 more``."""
    if len(indices) == 1:
        return f"iteration {indices[0]}"
    shown = ", ".join(map(str, indices[:3]))
    rest = indices[3:]
    if not rest:
        return f"iterations {shown.rpartition(', ')[0]} and {indices[-1]}"
    return f"iterations {shown} and {len(rest)} more" if len(rest) > 1 else f"iterations {shown} and {rest[0]}"


def _shown(outcome: Any) -> str:
    if isinstance(outcome, BaseException):
        return f"raised {describe(outcome)}"
    text = repr(outcome)
    return text if len(text) <= 80 else text[:77] + "..."


def _mutated_argument(indices: list[int], name: str, where: str) -> str:
    if where == "serial":
        effect = (
            'on "serial" your program sees that change, as with the old loop; on "process" a worker changes a '
            'copy, which your program never sees, and on "thread" threads make such changes in no fixed order'
        )
    elif where == "thread":
        effect = "your program sees that change, as with the old loop, but threads make such changes in no fixed order"
    else:
        effect = (
            "the old loop's later iterations and your program saw that change; in a worker process it changes "
            "a copy, which they never see"
        )
    return f"{_iterations(indices)} changed {name} in place: {effect}. Return what the iteration computes instead."


def _mutated_global(index: int, name: str, where: str) -> str:
    if where == "serial":
        where = (
            'on "serial" it changes as in the old loop, but on "process" a worker process changes a copy of it, '
            'which your program never sees, and on "thread" the threads change it in no fixed order'
        )
    elif where == "thread":
        where = "the threads share it, so iterations change it at once, in an order that is not the loop's"
    else:
        where = "in worker processes each worker changes its own copy, and your program never sees it"
    return (
        f"iteration {index} changed the module global {name!r}: {where}. Return the value instead, "
        f"and build {name} from the loop's results."
    )


def verify(
    function: Callable[..., Any],
    name: str,
    calls: list[Any],
    single: bool,
    keywords: tuple[str, ...],
    broadcast: dict[str, Any],
    options: Options,
) -> VerifyReport:
    """Run ``calls`` (a loop's first, as the engine takes them) serially here and on the
    backend of ``options`` (resolved), and report what differs."""
    calls_args = [own_keywords((call,) if single else tuple(call), keywords) for call in calls]
    watched = _Globals(function)
    states = global_states()
    in_process = options.backend in ("serial", "thread") or not isinstance(options.backend, str)
    try:
        serial = _run_serially(function, calls_args, broadcast, options.seed, watched)
        watched.put_back()
        put_back_global_states(states)
        if in_process:  # the threads would change the user's own objects, and the loop runs again
            calls, broadcast = _copy_or_same(calls), _copy_or_same(broadcast)
        loop = Loop(
            function,
            name,
            calls,
            broadcast,
            replace(options, on_error="collect", progress=False, retries=0),
            len(calls),
            single,
            keywords,
        )
        result = run_map(loop, warn_lost_writes=False)
    finally:
        watched.put_back()
        put_back_global_states(states)
    failed = {failure.index: failure.exception for failure in result.failures}
    mismatches = [
        Mismatch(index, calls_args[index][0], outcome, failed.get(index, result[index]))
        for index, outcome in enumerate(serial.outcomes)
        if not _same(outcome, failed.get(index, result[index]))
    ]
    backend = options.backend if isinstance(options.backend, str) else type(options.backend).__name__
    return VerifyReport(
        name,
        backend,
        len(calls),
        mismatches,
        serial.mutated_arguments,
        watched.changed(),
        bool(serial.random_sources),
        sorted(set(serial.unchecked) | set(watched.unchecked)),
        tuple(sorted(serial.random_sources)),
        options.seed,
    )


@dataclass
class _SerialRun:
    outcomes: list[Any] = field(default_factory=list)
    mutated_arguments: list[tuple[int, str]] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    random_sources: set[str] = field(default_factory=set)


def _run_serially(
    function: Callable[..., Any],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    broadcast: dict[str, Any],
    seed: int | None,
    watched: _Globals,
) -> _SerialRun:
    run = _SerialRun()
    plain, instance = _unbound(function)
    shared = {**({"self": instance} if instance is not None else {}), **broadcast}
    shared = {key: _copy_or_same(value) for key, value in shared.items()}  # one copy: iterations share it
    instance = shared.get("self", instance)
    watching: Any = DrawWatch() if seed is None else contextlib.nullcontext()
    with watching as watch:
        for index, (args, keywords) in enumerate(calls):
            args, keywords = _copy_or_same(args), _copy_or_same(keywords)
            named = _named_arguments(plain, instance, args, keywords, broadcast)
            objects = {**named, **{_broadcast_name(key): value for key, value in shared.items()}}
            before = {key: _digest(value) for key, value in objects.items()}
            watched.before(index)
            if watch is not None:
                watch.begin()
            with iteration_streams(seed, index):
                try:
                    leading = (instance,) if instance is not None else ()
                    outcome = plain(*leading, *args, **keywords, **{k: v for k, v in shared.items() if k != "self"})
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    outcome = exc
            run.outcomes.append(outcome)
            if watch is not None:
                run.random_sources.update(_SOURCES[generator] for generator in watch.end())
            for key, value in objects.items():
                if before[key] is None:
                    if key not in run.unchecked:
                        run.unchecked.append(key)
                elif _digest(value) != before[key]:
                    run.mutated_arguments.append((index, key))
            watched.after(index)
    return run


def _broadcast_name(key: str) -> str:
    return "self (the method's instance)" if key == "self" else f"the keyword argument {key!r} given to every iteration"


def _named_arguments(
    function: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    keywords: dict[str, Any],
    broadcast: dict[str, Any],
) -> dict[str, Any]:
    """The iteration's own arguments by the names its function gives them."""
    named: dict[str, Any] = {}
    try:
        leading = (instance,) if instance is not None else ()
        bound = inspect.signature(function).bind(*leading, *args, **keywords, **broadcast)
    except (TypeError, ValueError):
        bound = None
    if bound is not None:
        parameters = inspect.signature(function).parameters
        for parameter_name, value in bound.arguments.items():
            if parameter_name in broadcast or (instance is not None and value is instance):
                continue
            kind = parameters[parameter_name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                named.update((f"argument {parameter_name}[{i}]", item) for i, item in enumerate(value))
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update((f"argument {key!r}", item) for key, item in value.items() if key not in broadcast)
            else:
                named[f"argument {parameter_name!r}"] = value
        return named
    named.update((f"argument {position + 1}", value) for position, value in enumerate(args))
    named.update((f"argument {key!r}", value) for key, value in keywords.items())
    return named


def _unbound(function: Callable[..., Any]) -> tuple[Callable[..., Any], Any]:
    """The plain function a loop calls, and the instance it is bound to (None if none)."""
    inner = getattr(function, "__wrapped__", function)
    instance = getattr(inner, "__self__", None)
    if instance is None or isinstance(instance, types.ModuleType):
        return inner, None
    return getattr(inner, "__func__", inner), instance


class _Globals:
    """The module globals a function reads or writes, watched across the serial run: which
    iteration first rebound or changed each one, and how to put them back afterwards."""

    def __init__(self, function: Callable[..., Any]) -> None:
        namespace = getattr(unwrap(function), "__globals__", None)
        self.namespace: dict[str, Any] = namespace if isinstance(namespace, dict) else {}
        reads, writes = global_names(function) if self.namespace else (frozenset(), frozenset())
        self.names = sorted(name for name in reads | writes if name in writes or _is_data(self.namespace.get(name)))
        self.original = {name: self.namespace.get(name, _MISSING) for name in self.names}
        self.saved = {name: _pickled(value) for name, value in self.original.items() if value is not _MISSING}
        self.unchecked = [f"the module global {name!r}" for name in self.names if self.saved.get(name, b"") is None]
        self._before: dict[str, tuple[Any, str | None]] = {}
        self._first: dict[str, int] = {}

    def before(self, index: int) -> None:
        """Before iteration ``index``: what each global still unchanged is (the look after the
        last iteration serves, unchanged: one pickle per global and iteration, for large ones)."""
        for name in self.names:
            if name not in self._first and name not in self._before:
                self._before[name] = self._look(name)

    def after(self, index: int) -> None:
        for name in self.names:
            if name in self._first:
                continue
            value, signature = self._look(name)
            old_value, old_signature = self._before[name]
            if value is not old_value or (signature is not None and signature != old_signature):
                self._first[name] = index

    def changed(self) -> list[tuple[int, str]]:
        return sorted((index, name) for name, index in self._first.items())

    def _look(self, name: str) -> tuple[Any, str | None]:
        value = self.namespace.get(name, _MISSING)
        return value, (_digest(value) if value is not _MISSING else "")

    def put_back(self) -> None:
        """Undo what the iterations did to the globals: bindings, then contents in place."""
        for name, value in self.original.items():
            if value is _MISSING:
                self.namespace.pop(name, None)
                continue
            self.namespace[name] = value
            saved = self.saved.get(name)
            if saved is not None and _pickled(value) != saved:
                _restore_in_place(value, loads(saved))


def _is_data(value: Any) -> bool:
    """A global that holds data (what an iteration might change), not code or a module."""
    return not isinstance(value, types.ModuleType | types.FunctionType | types.BuiltinFunctionType | type) and not (
        value is _MISSING or (callable(value) and hasattr(value, "__wrapped__"))
    )


def _restore_in_place(obj: Any, saved: Any) -> None:
    """Put ``saved``'s contents back into ``obj``, which other names may share."""
    if isinstance(obj, list):
        obj[:] = saved
    elif isinstance(obj, dict | set):
        obj.clear()
        obj.update(saved)
    elif hasattr(obj, "__array__") and hasattr(obj, "shape") and getattr(obj, "shape", None) == saved.shape:
        obj[...] = saved
    elif hasattr(obj, "__dict__"):
        vars(obj).clear()
        vars(obj).update(vars(saved))


def _pickled(value: Any) -> bytes | None:
    try:
        return dumps(value)
    except Exception:
        return None


def _digest(value: Any) -> str | None:
    """A digest of ``value``'s pickle; None when it cannot be pickled."""
    data = _pickled(value)
    return hashlib.blake2b(data, digest_size=16).hexdigest() if data is not None else None


def _copy_or_same(value: Any) -> Any:
    """A copy, as a worker would receive it; the object itself when it cannot be pickled."""
    data = _pickled(value)
    return loads(data) if data is not None else value


# --- the process-global random generators ---


_SOURCES = {"random": "Python's random", "numpy": "numpy.random"}


# --- comparing values ---


def _same(serial: Any, parallel: Any) -> bool:
    """Whether two outcomes are the same: ``==``; NumPy arrays by content, NaN equal to NaN;
    containers element by element; exceptions by type and arguments; objects without an
    ``__eq__`` of their own by their attributes."""
    if serial is parallel:
        return True
    if isinstance(serial, BaseException) or isinstance(parallel, BaseException):
        return type(serial) is type(parallel) and str(serial) == str(parallel)
    if type(serial) is not type(parallel):
        return _equal(serial, parallel)
    if isinstance(serial, tuple | list):
        return len(serial) == len(parallel) and all(map(_same, serial, parallel))
    if isinstance(serial, Mapping) and not hasattr(serial, "__array__"):
        return serial.keys() == parallel.keys() and all(_same(serial[key], parallel[key]) for key in serial)
    if _is_array(serial):
        return _arrays_equal(serial, parallel)
    if all("__eq__" not in vars(cls) for cls in type(serial).__mro__[:-1]):  # no == of its own
        state = getattr(serial, "__dict__", None)
        if state is not None:
            return _same(state, getattr(parallel, "__dict__", None))
        return _pickled(serial) == _pickled(parallel)
    return _equal(serial, parallel)


def _equal(serial: Any, parallel: Any) -> bool:
    try:
        equal = serial == parallel
        if isinstance(equal, bool):
            return equal or (_is_nan(serial) and _is_nan(parallel))
        equals = getattr(serial, "equals", None)  # pandas: == compares element-wise
        if callable(equals):
            return bool(equals(parallel))
        return bool(getattr(equal, "all", lambda: equal)())
    except Exception:
        return _pickled(serial) == _pickled(parallel)


def _is_nan(value: Any) -> bool:
    try:
        return value != value if isinstance(value, float | complex) else math.isnan(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype")


def _arrays_equal(serial: Any, parallel: Any) -> bool:
    import numpy as np

    try:
        return bool(np.array_equal(serial, parallel, equal_nan=True))
    except TypeError:  # a dtype without NaN (strings, objects)
        return bool(np.array_equal(serial, parallel))
