"""Loop options: validation with clear messages, and their resolution at call time.

Precedence, lowest first: the defaults, the decorator, ``.options()``, then the environment.
``AUTOPAR_BACKEND`` overrides every backend (so ``AUTOPAR_BACKEND=serial`` puts any program
under a debugger); ``AUTOPAR_WORKERS`` replaces only the default worker count. A loop started
inside a worker runs serially there, and a loop inside an iteration draws no progress bar.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import operator
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, SupportsFloat, SupportsIndex, TypeAlias, TypedDict, cast

from autopar._cpus import usable_cpu_count
from autopar._worker import in_iteration, in_shipped_iteration, in_worker_process

__all__ = ["OPTION_NAMES", "BackendName", "LoopOptions", "Options", "executor_capacity", "resolve", "validate"]

BackendName: TypeAlias = Literal["process", "thread", "serial"]
_BACKENDS = ("process", "thread", "serial")
_ON_ERROR = ("raise", "collect", "debug")


@dataclass(frozen=True)
class Options:
    """Every option of a loop; see the README's table for their meaning."""

    workers: int | None = None
    backend: BackendName | Executor = "process"
    chunksize: int | None = None
    on_error: Literal["raise", "collect", "debug"] = "raise"
    timeout: float | None = None
    retries: int = 0
    progress: bool = False
    start_method: str | None = None
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_worker: int | None = None
    seed: int | None = None
    capture_output: bool = False
    forward_logging: bool = True

    def merge(self, changes: Mapping[str, Any]) -> Options:
        """A copy with ``changes`` applied, each one validated."""
        merged = replace(self, **validate(changes))
        check_combination(merged)
        return merged


OPTION_NAMES = tuple(field.name for field in fields(Options))


class LoopOptions(TypedDict, total=False):
    """The options as keyword arguments (of `parallel_loop` and ``.options()``), typed so that
    mypy catches a misspelt name or a wrong value; whole numbers may be numpy's."""

    workers: SupportsIndex | None
    backend: BackendName | Executor
    chunksize: SupportsIndex | None
    on_error: Literal["raise", "collect", "debug"]
    timeout: float | SupportsFloat | None
    retries: SupportsIndex
    progress: bool
    start_method: Literal["fork", "spawn", "forkserver"] | None
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...] | list[Any]
    max_tasks_per_worker: SupportsIndex | None
    seed: SupportsIndex | None
    capture_output: bool
    forward_logging: bool


def validate(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check option values, raising a ValueError/TypeError that names option, value and choices."""
    unknown = sorted(set(changes) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are: {', '.join(OPTION_NAMES)}")
    for name, value in changes.items():
        _CHECKS[name](name, value)
    normalized: dict[str, Any] = {
        name: tuple(value) if name == "initargs" else value for name, value in changes.items()
    }
    for name in ("workers", "chunksize", "retries", "max_tasks_per_worker", "seed"):
        if normalized.get(name) is not None:
            normalized[name] = operator.index(normalized[name])
    if normalized.get("timeout") is not None:
        timeout = _seconds(normalized["timeout"])
        normalized["timeout"] = None if timeout > _NO_LIMIT_ABOVE else timeout  # no limit, as None says
    return normalized


def resolve(options: Options) -> Options:
    """The options a loop runs with now: environment applied, workers counted, nesting handled."""
    backend_env = os.environ.get("AUTOPAR_BACKEND", "").strip()
    if backend_env:
        if backend_env not in _BACKENDS:
            raise ValueError(f"AUTOPAR_BACKEND={backend_env!r} is not a backend; choose one of {', '.join(_BACKENDS)}")
        options = replace(options, backend=cast(BackendName, backend_env))
    # A nested loop runs serially where its workers would be: in a worker process (any
    # executor's: its iteration came as a chunk), or, for a thread pool, inside an iteration
    # already holding one of its threads (waiting for the others could wait forever). A
    # process loop inside a thread loop's iteration runs.
    in_process = options.backend in ("thread", "serial") or isinstance(options.backend, ThreadPoolExecutor)
    if in_worker_process() or in_shipped_iteration() or (in_iteration() and in_process):
        options = replace(options, backend="serial", initializer=None, initargs=())
    elif options.backend == "process" and multiprocessing.current_process().daemon:
        # A daemonic process (a multiprocessing.Pool worker) may not start processes.
        options = replace(options, backend="serial")
    if options.progress and (in_worker_process() or in_iteration()):
        # Only the outermost loop draws a bar. A nested loop's would be drawn by a worker (on
        # its own stderr, or as text its capture hands back), or by each of the outer loop's
        # threads at once: bars jumping over each other, and over the outer loop's.
        options = replace(options, progress=False)
    if options.workers is None:
        capacity = executor_capacity(options.backend) if isinstance(options.backend, Executor) else None
        options = replace(options, workers=capacity or _default_workers())
    return options


def executor_capacity(executor: Executor) -> int | None:
    """How many calls an executor the user passed runs at once, where it says: a thread or
    process pool (the standard library's, loky's), or a Dask client's executor (its threads,
    over the whole cluster). The engine keeps twice that many chunks in flight."""
    workers = getattr(executor, "_max_workers", None)
    if isinstance(workers, int) and workers > 0:
        return workers
    threads = getattr(getattr(executor, "_client", None), "nthreads", None)
    if callable(threads):
        try:
            return sum(threads().values()) or None
        except Exception:
            return None
    return None


def _default_workers() -> int:
    text = os.environ.get("AUTOPAR_WORKERS", "").strip()
    if not text:
        return usable_cpu_count()
    try:
        workers = int(text)
    except ValueError:
        raise ValueError(f"AUTOPAR_WORKERS={text!r} is not a whole number of workers (1 or more)") from None
    if workers < 1:
        raise ValueError(f"AUTOPAR_WORKERS={text!r} must be 1 or more")
    return workers


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if not _is_whole(value):
        raise TypeError(f"{name}={value!r}: expected a whole number of 1 or more, or None")
    if value < 1:
        raise ValueError(f"{name}={value!r}: must be 1 or more, or None")


def _check_backend(name: str, value: Any) -> None:
    if isinstance(value, Executor):
        return
    if not isinstance(value, str):
        raise TypeError(
            f"{name}={value!r}: expected one of {', '.join(map(repr, _BACKENDS))} "
            "or a concurrent.futures.Executor instance"
        )
    if value not in _BACKENDS:
        raise ValueError(f"{name}={value!r} is not a backend; choose one of {', '.join(map(repr, _BACKENDS))}")


def _check_choice(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))}")

    return check


def _check_timeout(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's numbers too
        raise TypeError(f"{name}={value!r}: expected a number of seconds, or None")
    if not _seconds(value) > 0:  # also refuses NaN
        raise ValueError(f"{name}={value!r}: must be more than 0 seconds, or None")


_NO_LIMIT_ABOVE = 1e9
"""Seconds (31 years) past which a timeout means no limit: nothing can wait that long
(threading refuses waits past a few centuries)."""


def _seconds(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


def _is_whole(value: Any) -> bool:
    """An int, or an integer-like such as numpy.int64; never a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_retries(name: str, value: Any) -> None:
    if not _is_whole(value):
        raise TypeError(f"{name}={value!r}: expected a whole number of 0 or more")
    if value < 0:
        raise ValueError(f"{name}={value!r}: must be 0 or more")


def _check_seed(name: str, value: Any) -> None:
    if value is not None and not _is_whole(value):
        raise TypeError(f"{name}={value!r}: expected a whole number (the loop's random seed), or None")
    if value is not None and value < 0:
        raise ValueError(f"{name}={value!r}: must be 0 or more (numpy.random.SeedSequence takes no negative seed)")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected True or False")


def _check_start_method(name: str, value: Any) -> None:
    if value is None:
        return
    methods = tuple(multiprocessing.get_all_start_methods())
    if value not in methods:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, methods))} or None")


def check_combination(options: Options) -> None:
    """Options that are fine alone but not together."""
    if options.initializer is not None and isinstance(options.backend, Executor):
        raise ValueError(
            "initializer= runs in the workers autopar starts; an executor you pass is used as it "
            "is: give it the initializer (ProcessPoolExecutor(initializer=..., initargs=...))"
        )
    for name in ("max_tasks_per_worker", "start_method"):
        if getattr(options, name) is not None and isinstance(options.backend, Executor):
            raise ValueError(
                f"{name}= applies to the workers autopar starts; an executor you pass is used as it "
                "is: set it there (ProcessPoolExecutor(max_tasks_per_child=..., mp_context=...))"
            )
    if options.max_tasks_per_worker is not None and options.start_method == "fork":
        raise ValueError(
            "max_tasks_per_worker needs start_method='spawn' or 'forkserver' (or None): "
            "concurrent.futures cannot replace forked workers"
        )


def _check_initializer(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}={value!r}: expected a callable or None")


def _check_initargs(name: str, value: Any) -> None:
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
        raise TypeError(f"{name}={value!r}: expected a tuple of arguments for the initializer")


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "workers": _positive_int_or_none,
    "backend": _check_backend,
    "chunksize": _positive_int_or_none,
    "on_error": _check_choice(_ON_ERROR),
    "timeout": _check_timeout,
    "retries": _check_retries,
    "progress": _check_bool,
    "start_method": _check_start_method,
    "initializer": _check_initializer,
    "initargs": _check_initargs,
    "max_tasks_per_worker": _positive_int_or_none,
    "seed": _check_seed,
    "capture_output": _check_bool,
    "forward_logging": _check_bool,
}
