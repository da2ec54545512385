"""The result collector: puts finished iterations back in input order and handles failures.

It turns the engine's batches (completion order) into a `LoopResult` (``map``) or a lazy
in-order iterator (``imap``). Each failure becomes a `Failure` whose exception carries a note
``iteration <index>: f(args...)`` and, when it came from another process, the worker's
traceback text as ``__cause__``. Under ``on_error="raise"`` the first failure stops the loop and
is raised with the results so far as ``err.partial_result``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Generic, TypeVar

from autopar._calls import own_keywords
from autopar._capture import Echo
from autopar._debugger import debug_failure
from autopar._engine import Dispatcher
from autopar._errors import (
    RemoteTraceback,
    add_iteration_note,
    drop_earlier_iteration_note,
    fresh_copy,
    set_attribute,
)
from autopar._hazards import warn_if_writes_lost
from autopar._plan import Loop
from autopar._progress import progress_bar
from autopar._records import Batch, Call, Failed, IterationOutput
from autopar._results import Failure, LoopResult, LoopStats, describe_call

__all__ = ["LoopIterator", "run_as_completed", "run_imap", "run_map"]

R = TypeVar("R", covariant=True)  # read-only, like LoopResult
_MISSING: Any = object()


class _Runs:
    """Values by input index, kept as runs of consecutive iterations (one per chunk, as they
    come back), so that a loop of tiny iterations costs one slice per chunk, not a dict entry
    per iteration."""

    def __init__(self) -> None:
        self._runs: dict[int, list[Any]] = {}  # first index -> values
        self.count = 0

    def put(self, indices: Sequence[int], values: list[Any]) -> None:
        if isinstance(indices, range):
            if values:
                self._runs[indices.start] = values
        else:
            self._runs.update((index, [value]) for index, value in zip(indices, values, strict=True))
        self.count += len(values)

    def take(self, first: int) -> list[Any] | None:
        """Remove and return the run that starts at ``first``, if it is here."""
        run = self._runs.pop(first, None)
        if run is not None:
            self.count -= len(run)
        return run

    def to_list(self, size: int) -> tuple[list[Any], list[int]]:
        """The values of indices ``0..size-1`` (None where missing), and the missing indices."""
        values: list[Any] = [_MISSING] * size
        for first, run in self._runs.items():
            values[first : first + len(run)] = run
        if self.count == size:  # every iteration came back: the common case
            return values, []
        missing = [index for index, value in enumerate(values) if value is _MISSING]
        for index in missing:
            values[index] = None
        return values, missing

    def end(self) -> int:
        """One past the highest index held."""
        return max((first + len(run) for first, run in self._runs.items()), default=0)


class _Collector:
    """Gathers one loop's outcomes by index, turning failures into `Failure` records."""

    def __init__(self, loop: Loop, in_order: bool = True) -> None:
        """``in_order``: results are kept until taken in input order (``map``, ``imap``);
        otherwise each batch's are handed out at once (``as_completed``)."""
        self.dispatcher = dispatcher = Dispatcher(loop)
        self.in_order = in_order
        self.name = loop.name
        self.values = _Runs()
        self.iterations = 0
        self.failures: list[Failure] = []
        self._noted: dict[int, tuple[BaseException, list[str]]] = {}  # by id: and its notes before ours
        self.busy_time = 0.0
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.startup: float | None = None  # until the first result, less its own work
        self.remote = not dispatcher.in_process
        self.progress = progress_bar(loop.options.progress, loop.total, loop.name)
        self.echo = Echo(self.progress.write, self.progress.aside, in_order)
        """What iterations wrote and logged, written here as results are collected."""

    def add(self, batch: Batch) -> list[Failure]:
        """Store a batch; return its failures (already recorded in ``self.failures``)."""
        if self.in_order:
            self.values.put(batch.indices, batch.values)
        self.iterations += len(batch.indices)
        self.busy_time += batch.seconds
        if self.startup is None and batch.indices:
            self.startup = max(time.perf_counter() - self.started - batch.seconds, 0.0)
        outputs = batch.outputs or {}
        failed = [self._failure(call, failure, outputs.get(call[0])) for call, failure in batch.failures]
        self.failures.extend(failed)
        self.echo.add(batch.indices, batch.outputs)
        self.progress.update(len(batch.indices))
        return failed

    def _failure(self, call: Call, failed: Failed, output: IterationOutput | None) -> Failure:
        index, args = call
        exc = failed.exception
        seen = self._noted.get(id(exc))
        if seen is not None:  # in-process, the very object raised again (a prebuilt one):
            exc = fresh_copy(exc)  # a copy, with the notes it had before another iteration's
            set_attribute(exc, "__notes__", list(seen[1]))
        else:
            drop_earlier_iteration_note(exc)
            self._noted[id(exc)] = (exc, list(getattr(exc, "__notes__", ())))
        loop = self.dispatcher.loop
        args, kwargs = own_keywords(args, loop.keywords)
        kwargs.update(loop.broadcast)
        note = f"iteration {index}: {describe_call(self.name, args, kwargs)}"
        if failed.attempts > 1:
            note += f" (failed {failed.attempts} attempts)"
        add_iteration_note(exc, note)
        if self.remote and failed.traceback:
            set_attribute(exc, "__cause__", RemoteTraceback(failed.traceback))
        output = output or IterationOutput()
        failure = Failure(
            index, args, kwargs, exc, failed.traceback, failed.attempts, output.stdout, output.stderr, loop.rerun
        )
        set_attribute(exc, "failure", failure)
        return failure

    def result(self) -> LoopResult[Any]:
        """Everything collected so far; indices that never ran are listed as ``missing``.
        Results ``imap`` or ``as_completed`` already handed out are not kept: ``None`` there,
        but not missing (``as_completed`` lists none missing: it keeps nothing)."""
        values, missing = self.values.to_list(max(self.dispatcher.counters.consumed, self.values.end()))
        delivered = self.dispatcher.delivered or 0
        missing = [index for index in missing if index >= delivered] if self.in_order else []
        failures = sorted(self.failures, key=lambda failure: failure.index)
        return LoopResult(values, failures, self.stats(), missing, self.dispatcher.loop.rerun)

    def stats(self) -> LoopStats:
        counters = self.dispatcher.counters
        return LoopStats(
            wall_time=(self.ended or time.perf_counter()) - self.started,
            busy_time=self.busy_time,
            iterations=self.iterations,
            workers=self.dispatcher.plan.workers,
            chunksize=counters.chunksize,
            bytes_sent=counters.bytes_sent,
            bytes_received=counters.bytes_received,
            failed=len(self.failures),
            pickle_time=counters.pickle_seconds,
            startup_time=self.startup or 0.0,
        )

    def to_raise(self, failure: Failure) -> BaseException:
        """``failure``'s exception, with the results so far attached; under
        ``on_error="debug"``, once the iteration was run again under the debugger."""
        if self.dispatcher.loop.options.on_error == "debug":
            debug_failure(failure)
        exc = failure.exception
        set_attribute(exc, "partial_result", self.result())
        return exc

    def interrupted(self, exc: KeyboardInterrupt) -> None:
        """Ctrl-C: kill the workers, unless it is an iteration's own KeyboardInterrupt, raised
        as its failure (that one stops only this loop, like any other failure)."""
        if not any(failure.exception is exc for failure in self.failures):
            self.dispatcher.interrupt()

    def close(self) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()  # an imap's stats, read later, stay those of the loop
        self.progress.close()


def run_map(loop: Loop, *, warn_lost_writes: bool = True) -> LoopResult[Any]:
    """Run every iteration and return the results in input order (``warn_lost_writes``:
    say when iterations wrote globals that stayed in worker processes; `verify` reports it).

    Under ``on_error="raise"``, the failure raised is the one of the earliest iteration, as
    in the old loop, whatever order they finish in: after a failure no more input is read,
    and the loop stops once every earlier iteration has finished."""
    collector = _Collector(loop)
    dispatcher = collector.dispatcher
    batches = dispatcher.batches()
    first: Failure | None = None
    try:
        for batch in batches:
            failed = collector.add(batch)
            if failed and loop.options.on_error != "collect":
                earliest = min(failed, key=lambda failure: failure.index)
                first = earliest if first is None or earliest.index < first.index else first
                dispatcher.stop_before(first.index)
            if first is not None and not dispatcher.runs_before(first.index):
                break
        if first is not None:
            batches.close()
            raise collector.to_raise(first)
    except KeyboardInterrupt as exc:  # Ctrl-C here, between batches, closes the engine without it
        collector.interrupted(exc)
        raise
    except Exception as exc:
        if exc is collector.dispatcher.input_error:  # the input broke: what ran is still yours
            set_attribute(exc, "partial_result", collector.result())
        raise
    finally:
        batches.close()
        collector.close()
    result = collector.result()
    if warn_lost_writes:
        warn_if_writes_lost(loop.function, loop.name, result, len(result.failures), in_process=dispatcher.in_process)
    return result


class LoopIterator(Iterator[R], Generic[R]):
    """The lazy iterator that ``f.imap(...)`` (results in input order) and
    ``f.as_completed(...)`` (``(index, value)`` pairs as iterations finish) return.

    Under ``on_error="collect"`` a failed iteration yields ``None``; `failures` lists the
    failures met so far and `stats` describes the loop so far.
    """

    def __init__(self, collector: _Collector, generator: Generator[Any, None, Failure | None]) -> None:
        self._collector = collector
        # The generator must not refer back to this iterator: dropping the iterator (a `break`
        # out of a for loop) then finalizes the generator at once, which stops the loop.
        self._generator = generator

    @property
    def failures(self) -> list[Failure]:
        return sorted(self._collector.failures, key=lambda failure: failure.index)

    @property
    def stats(self) -> LoopStats:
        return self._collector.stats()

    def __next__(self) -> R:
        try:
            value: R = next(self._generator)
        except StopIteration as end:
            if end.value is None:
                raise
            failure: Failure = end.value
        else:
            return value
        exc = self._collector.to_raise(failure)
        if isinstance(exc, StopIteration):  # raised from __next__, it would end a for loop
            error = RuntimeError(f"iteration {failure.index} raised StopIteration, which an iterator cannot pass on")
            set_attribute(error, "partial_result", getattr(exc, "partial_result", None))
            raise error from exc  # as a generator would (PEP 479), naming the iteration
        raise exc

    def close(self) -> None:
        """Stop the loop: chunks that have not started are cancelled."""
        self._generator.close()
        self._collector.close()  # the generator's own cleanup never ran if it never started


@contextlib.contextmanager
def _driving(collector: _Collector) -> Iterator[Generator[Batch, None, None]]:
    """The engine's batches, for a lazy iterator; closed however it ends (Ctrl-C kills the
    workers, unless an iteration raised it)."""
    batches = collector.dispatcher.batches()
    try:
        yield batches
    except KeyboardInterrupt as exc:
        collector.interrupted(exc)
        raise
    finally:
        batches.close()
        collector.close()


def _in_order(collector: _Collector, on_error: str) -> Generator[Any, None, Failure | None]:
    """The results in input order; under "raise", returns the first failure, to be raised."""
    dispatcher = collector.dispatcher
    dispatcher.delivered_up_to(0)
    failed_at: dict[int, Failure] = {}
    next_index = 0
    with _driving(collector) as batches:
        for batch in batches:
            for failure in collector.add(batch):
                failed_at[failure.index] = failure
            while (run := collector.values.take(next_index)) is not None:
                for position, value in enumerate(run):
                    if next_index in failed_at and on_error != "collect":
                        batches.close()
                        collector.values.put(range(next_index, next_index + len(run) - position), run[position:])
                        return failed_at[next_index]
                    failed_at.pop(next_index, None)
                    yield value  # the caller has it now: memory stays flat
                    next_index += 1
                    dispatcher.delivered_up_to(next_index)
    return None


def _completion_order(collector: _Collector, on_error: str) -> Generator[Any, None, Failure | None]:
    """``(index, value)`` as iterations finish; under "raise", returns the first failure."""
    dispatcher = collector.dispatcher
    dispatcher.delivered_up_to(0)
    delivered = 0
    with _driving(collector) as batches:
        for batch in batches:
            failed = {failure.index: failure for failure in collector.add(batch)}
            for index, value in zip(batch.indices, batch.values, strict=True):
                if index in failed and on_error != "collect":
                    batches.close()
                    return failed[index]
                yield index, value
                delivered += 1
                dispatcher.delivered_up_to(delivered)  # read ahead only so far: memory stays flat
    return None


def run_imap(loop: Loop) -> LoopIterator[Any]:
    """A lazy iterator of results in input order; the input is consumed as workers free up."""
    collector = _Collector(loop)
    return LoopIterator(collector, _in_order(collector, loop.options.on_error))


def run_as_completed(loop: Loop) -> LoopIterator[tuple[int, Any]]:
    """A lazy iterator of ``(index, value)`` pairs, in the order iterations finish."""
    collector = _Collector(loop, in_order=False)
    return LoopIterator(collector, _completion_order(collector, loop.options.on_error))
