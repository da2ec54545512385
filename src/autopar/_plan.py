"""A loop to run (`Loop`); what its options and its backend's capacity make of it: how many
workers, how many chunks in flight, a fixed chunk size or none (`LoopPlan`, a pure function
of the options); and what it counts as it runs (`LoopCounters`, read for its stats)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from autopar._options import Options, executor_capacity
from autopar._results import Rerunner

__all__ = ["Loop", "LoopCounters", "LoopPlan", "plan"]


@dataclass(frozen=True)
class Loop:
    """One loop to run: what to call (``name`` in messages), with which positional
    ``arguments`` each time (tuples, or bare values when ``single``), with which broadcast
    keyword arguments and options."""

    function: Callable[..., Any]
    name: str
    arguments: Iterable[Any]
    broadcast: dict[str, Any]
    options: Options
    total: int | None = None
    """The number of calls, when the input knows its length."""
    single: bool = False
    """Each element of ``arguments`` is a call's only argument, not a tuple of them."""
    keywords: tuple[str, ...] = ()
    """The last ``len(keywords)`` arguments of each call go by these names (`each`)."""
    indices: Sequence[int] | None = None
    """Each call's index in the input, when not its position (a rerun of some iterations)."""
    rerun: Rerunner | None = None
    """How to run this loop's iterations again in this process: for its `Failure` records
    (``replay``) and its `LoopResult` (``retry_failures``)."""


@dataclass(frozen=True)
class LoopPlan:
    """The loop's derived parameters, computed once."""

    workers: int
    """Iterations that run at once."""
    window: int
    """Chunks in flight at most."""
    refill_at: int
    """Send more once this few chunks are in flight: every submission wakes the executor's
    threads, and one wake-up can carry several chunks."""
    fixed_chunksize: int | None
    """The chunk size when it is not automatic."""
    capacity: int | None
    """How many calls an executor the user passed runs at once, where it says."""


def plan(options: Options) -> LoopPlan:
    """The plan for a loop with these (resolved) options."""
    serial = options.backend == "serial"
    workers = 1 if serial else options.workers or 1
    capacity = executor_capacity(options.backend) if isinstance(options.backend, Executor) else None
    if capacity is not None and capacity < workers:
        workers = capacity  # an executor runs no more than it has, whatever was asked
    # In-process serial runs one iteration at a time, interleaved with its consumer, like the
    # old loop: chunks buy nothing without a process boundary to amortize. Workers replaced
    # every N iterations need chunks of a known size.
    fixed = options.chunksize
    if fixed is None and (serial or options.max_tasks_per_worker is not None):
        fixed = 1
    if fixed is not None and options.max_tasks_per_worker is not None:
        fixed = min(fixed, options.max_tasks_per_worker)
    window = 1 if serial else 2 * workers
    refill_at = max(window - workers, 0)
    if capacity is not None and capacity > workers:
        # An executor with more workers would run every chunk in flight at once: to run
        # `workers` iterations at a time, keep only that many chunks in flight.
        window, refill_at = workers, workers - 1
    return LoopPlan(workers, window, refill_at, fixed, capacity)


@dataclass
class LoopCounters:
    """What a loop has done so far, for its stats."""

    consumed: int = 0
    """Calls read from the input."""
    chunksize: int = 0
    """The largest chunk sent: the size the loop settled on, not its shrinking tail."""
    bytes_sent: int = 0
    bytes_received: int = 0
    pickle_seconds: float = 0.0
    """In this process: arguments pickled, results unpickled."""
