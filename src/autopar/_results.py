"""What a loop gives back: `LoopResult`, `Failure` and `LoopStats`, in input order."""

from __future__ import annotations

import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

from autopar._errors import AutoparError

__all__ = ["Failure", "LoopResult", "LoopStats", "Rerunner", "describe_call"]

R = TypeVar("R", covariant=True)  # read-only: a LoopResult[Dog] is a LoopResult[Animal]
_A = TypeVar("_A")
_B = TypeVar("_B")
_C = TypeVar("_C")
_D = TypeVar("_D")
_E = TypeVar("_E")
_K = TypeVar("_K")

_PICKLE_BYTES_PER_SECOND = 1e9  # pickling and copying big buffers, both ways, roughly
_PICKLING_SHARE = 0.25  # of the wall time spent pickling here, beyond which that is the limit
_STARTUP_SHARE = 0.25  # of the wall time spent before the first result, beyond which that is the limit
_FEW_PER_WORKER = 8  # iterations a worker, below which the tail leaves workers idle


def _seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6


def describe_call(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """``calc_stuff(3, offset=2.0)``, every argument shortened to fit one line."""
    parts = [_repr.repr(arg) for arg in args] + [f"{key}={_repr.repr(value)}" for key, value in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class Rerunner(Protocol):
    """How to run a loop's iterations again in this process (see ``autopar._replay``): what
    `Failure.replay` and `LoopResult.retry_failures` hand over to."""

    def replay(self, failure: Failure, debug: bool) -> Any: ...

    def retry(self, result: LoopResult[Any], changes: dict[str, Any]) -> LoopResult[Any]: ...


@dataclass(frozen=True)
class Failure:
    """One iteration that failed: where, with what arguments, and why."""

    index: int
    """Position of the iteration in the input."""
    args: tuple[Any, ...]
    """The positional arguments of the call."""
    kwargs: dict[str, Any]
    """The keyword arguments of the call (the broadcast ones included)."""
    exception: BaseException
    """The exception, of its original type where it could be carried back."""
    traceback: str
    """The traceback as the worker saw it, as text."""
    attempts: int = 1
    """How many times the iteration was tried, retries included."""
    stdout: str = ""
    """What the iteration wrote to ``sys.stdout`` (with ``capture_output=True``; else "")."""
    stderr: str = ""
    """What the iteration wrote to ``sys.stderr`` (with ``capture_output=True``; else "")."""
    _rerun: Rerunner | None = field(default=None, repr=False, compare=False)

    def replay(self, debug: bool = False) -> Any:
        """Run this iteration again in this process, with the same function, arguments and
        keyword arguments (and random streams, under ``seed=``): return its value, or raise
        its exception live, with a real traceback. ``debug=True``: under the debugger
        (``pdb``, or what ``PYTHONBREAKPOINT`` names), stopped where it raised."""
        if not isinstance(debug, bool):
            raise TypeError(f"replay(debug={debug!r}): expected True or False")
        if self._rerun is None:
            raise _not_rerunnable(f"iteration {self.index}")
        return self._rerun.replay(self, debug)


def _not_rerunnable(what: str) -> Exception:
    return AutoparError(f"cannot run {what} again: this record was not made by an autopar loop")


@dataclass(frozen=True)
class LoopStats:
    """How a loop ran: time, work, and how well the workers were used."""

    wall_time: float
    """Seconds for the whole loop."""
    busy_time: float
    """Seconds spent inside iterations, summed over workers."""
    iterations: int
    workers: int
    chunksize: int
    """The chunk size used, or the largest one the automatic chunking reached."""
    bytes_sent: int = 0
    """Pickled arguments, function and broadcast arguments sent to workers, in bytes."""
    bytes_received: int = 0
    """Pickled results received from workers, in bytes."""
    failed: int = 0
    """Iterations that failed (counted in ``iterations``; a timed-out or crashed one adds no
    ``busy_time``)."""
    pickle_time: float = 0.0
    """Seconds this process spent pickling arguments and unpickling results (the workers
    spend about as much on their side)."""
    startup_time: float = 0.0
    """Seconds from the loop's start to its first result, less that result's own work:
    starting workers (a new pool; under spawn, each imports your modules), or about a round
    trip on a warm pool."""

    @property
    def summary(self) -> str:
        """One sentence on what limited the loop, to act on: is parallelizing paying off?"""
        if self.iterations == 0:
            return "no iterations ran."
        mean = self.busy_time / self.iterations
        head = f"{self.iterations:,} iterations averaging {_seconds(mean)} on {self.workers} worker" + (
            "s" if self.workers != 1 else ""
        )
        moved = (self.bytes_sent + self.bytes_received) / self.iterations
        if 2 * self.failed >= self.iterations:
            return (
                f"{self.failed:,} of {self.iterations:,} iterations failed: see the failures first; "
                "until they pass, the timings say little."
            )
        if self.failed:
            head += f" ({self.failed:,} failed)"
        if self.workers == 1:
            return f"{head}: ran serially ({_seconds(self.wall_time)} in all)."
        verdict = "the serial loop would be faster" if self.speedup < 1 else "speedup is limited"
        if self.efficiency >= 0.8:
            balanced = f"{self.speedup:.1f}x ({self.efficiency:.0%} efficiency)"
            return f"{head}: work-bound (not overhead) and well balanced, {balanced}."
        if self.startup_time > _STARTUP_SHARE * self.wall_time:
            return (
                f"{head}: {_seconds(self.startup_time)} of the loop's {_seconds(self.wall_time)} went to starting "
                "the workers (a new pool; under spawn each imports your modules); the next loop with these "
                "options finds them warm."
            )
        returned = self.bytes_received > self.bytes_sent
        what = "results" if returned else "arguments"
        advice = (
            "return less (summaries; large arrays written to files)"
            if returned
            else "pass smaller arguments (file names, indices)"
        )
        if self.pickle_time > _PICKLING_SHARE * self.wall_time:  # measured: many small objects
            return (
                f"{head}: this process spent {self.pickle_time / self.wall_time:.0%} of the loop pickling "
                f"arguments and unpickling results ({_size(moved)} per iteration, mostly {what}): "
                f"serialization-bound, {verdict}; {advice}."
            )
        if moved / _PICKLE_BYTES_PER_SECOND > mean:  # estimated: the workers pay it too
            return (
                f"{head}: arguments and results are {_size(moved)} per {_seconds(mean)} iteration, mostly "
                f"{what}: {'return' if returned else 'serialization'}-bound, {verdict}; {advice}."
            )
        if self.iterations < 2 * self.workers:
            return f"{head}: too few iterations to keep {self.workers} workers busy ({self.efficiency:.0%} efficiency)."
        if mean < 1e-3:
            return (
                f"{head}: overhead-bound, {self.efficiency:.0%} efficiency; chunksize grew to {self.chunksize:,}; "
                "give each iteration more work."
            )
        if self.iterations < _FEW_PER_WORKER * self.workers:
            return (
                f"{head}: workers were busy {self.efficiency:.0%} of the time; with "
                f"{self.iterations / self.workers:.0f} iterations a worker, the last ones leave workers idle: "
                "more, smaller iterations balance better."
            )
        return (
            f"{head}: workers were busy {self.efficiency:.0%} of the time; iteration costs vary "
            "(load imbalance), or other programs share the CPUs."
        )

    @property
    def speedup(self) -> float:
        """``busy_time / wall_time``: about how many times faster than the serial loop."""
        return self.busy_time / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def efficiency(self) -> float:
        """``speedup / workers``: the share of the workers' time spent on iterations."""
        return self.speedup / self.workers if self.workers else 0.0


@dataclass(eq=False)
class LoopResult(Sequence[R], Generic[R]):
    """The outcome of ``f.map(...)``: every iteration's return value, in input order.

    A failed iteration's slot holds ``None`` (see `unzip`'s ``fill`` for another value);
    the failures themselves are in `failures`.
    """

    _values: list[Any]
    failures: list[Failure]
    stats: LoopStats
    missing: list[int] = field(default_factory=list)
    """Indices that never ran: only non-empty on an ``err.partial_result``."""
    _rerun: Rerunner | None = field(default=None, repr=False)

    def retry_failures(self, **options: Any) -> LoopResult[R]:
        """Run the failed iterations again (same function, arguments and keyword arguments;
        ``options`` as for ``.options()``, such as ``timeout=60`` or ``backend="serial"``)
        and return a new result: the new values in the failed slots, `failures` holding only
        those that failed again, ``attempts`` counting every try. This one is unchanged."""
        if not self.failures:
            return LoopResult(list(self._values), [], self.stats, list(self.missing), self._rerun)
        if self._rerun is None:
            raise _not_rerunnable("these failures")
        retried: LoopResult[R] = self._rerun.retry(self, options)
        return retried

    @property
    def ok(self) -> bool:
        """True when no iteration failed."""
        return not self.failures

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> R: ...
    @overload
    def __getitem__(self, index: slice) -> list[R]: ...
    def __getitem__(self, index: int | slice) -> R | list[R]:
        return self._values[index]

    def __iter__(self) -> Iterator[R]:
        return iter(self._values)

    def __repr__(self) -> str:
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return f"<LoopResult of {len(self)} iterations{failed}: {_repr.repr(self._values)}>"

    def raise_failures(self) -> None:
        """Raise an ExceptionGroup of every failure; do nothing when the loop succeeded."""
        if self.failures:
            exceptions = [failure.exception for failure in self.failures]
            raise BaseExceptionGroup(f"{len(exceptions)} of {len(self)} iterations failed", exceptions)

    # Typed for the common shapes, so that ``a, b = f.map(xs).unzip()`` types ``a`` and ``b``
    # from ``f``'s return annotation (a failed iteration's ``fill`` is not in these types).
    @overload
    def unzip(self: LoopResult[tuple[_A]], n: int | None = None, *, fill: Any = None) -> tuple[list[_A]]: ...
    @overload
    def unzip(
        self: LoopResult[tuple[_A, _B]], n: int | None = None, *, fill: Any = None
    ) -> tuple[list[_A], list[_B]]: ...
    @overload
    def unzip(
        self: LoopResult[tuple[_A, _B, _C]], n: int | None = None, *, fill: Any = None
    ) -> tuple[list[_A], list[_B], list[_C]]: ...
    @overload
    def unzip(
        self: LoopResult[tuple[_A, _B, _C, _D]], n: int | None = None, *, fill: Any = None
    ) -> tuple[list[_A], list[_B], list[_C], list[_D]]: ...
    @overload
    def unzip(
        self: LoopResult[tuple[_A, _B, _C, _D, _E]], n: int | None = None, *, fill: Any = None
    ) -> tuple[list[_A], list[_B], list[_C], list[_D], list[_E]]: ...
    @overload
    def unzip(self: LoopResult[tuple[_A, ...]], n: int | None = None, *, fill: Any = None) -> tuple[list[_A], ...]: ...
    @overload
    def unzip(self: LoopResult[Mapping[_K, _A]], n: int | None = None, *, fill: Any = None) -> dict[_K, list[_A]]: ...
    @overload
    def unzip(self, n: int | None = None, *, fill: Any = None) -> Any: ...
    def unzip(self, n: int | None = None, *, fill: Any = None) -> Any:
        """Split multi-output results: a tuple of lists, or a dict of lists for mappings.

        ``n`` names the number of outputs, so an empty loop still gives ``n`` empty lists.
        A failed iteration's slot holds ``fill`` in every list, keeping outputs aligned.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"unzip(n={n!r}): n must be a whole number of outputs, 0 or more")
        failed = {failure.index for failure in self.failures} | set(self.missing)
        present = [(i, v) for i, v in enumerate(self._values) if i not in failed]
        if present and isinstance(present[0][1], Mapping):
            return self._unzip_mappings(present, n, fill)
        if n is None and not present and self._values:
            # () would unpack as "not enough values", far from the cause.
            raise ValueError(
                f"unzip(): none of the {len(self._values)} iterations returned a value "
                f"({len(failed)} failed or missing), so the number of outputs is unknown; "
                "name it, as in unzip(3), to get lists of fill values"
            )
        width = n
        for index, value in present:
            if not isinstance(value, tuple | list):
                raise TypeError(
                    f"unzip(): iteration {index} returned {_repr.repr(value)} "
                    f"({type(value).__name__}), not a tuple, list or mapping"
                )
            if width is None:
                width = len(value)
            elif len(value) != width:
                expected = f"{n} (unzip(n={n}))" if n is not None else f"{width}, as iteration {present[0][0]} did"
                raise TypeError(f"unzip(): iteration {index} returned {len(value)} values, expected {expected}")
        columns: list[list[Any]] = [[fill] * len(self._values) for _ in range(width or 0)]
        for index, value in present:
            for column, item in zip(columns, value, strict=True):
                column[index] = item
        return tuple(columns)

    def _unzip_mappings(self, present: list[tuple[int, Any]], n: int | None, fill: Any) -> dict[Any, list[Any]]:
        keys = list(present[0][1])
        if n is not None and len(keys) != n:
            raise TypeError(f"unzip(n={n}): iteration {present[0][0]} returned a mapping with {len(keys)} keys")
        for index, value in present:
            if not isinstance(value, Mapping) or set(value) != set(keys):
                raise TypeError(
                    f"unzip(): iteration {index} returned {_repr.repr(value)}, "
                    f"not a mapping with the keys {keys!r} of iteration {present[0][0]}"
                )
        columns = {key: [fill] * len(self._values) for key in keys}
        for index, value in present:
            for key in keys:
                columns[key][index] = value[key]
        return columns
