"""What came back for a chunk, made into a `Batch` of finished iterations.

A chunk's future holds its `ChunkResult` (values, and errors by position), or the reason it
has none: the executor broke, the worker could not unpickle the arguments (each call is then
sent again alone, so that only the culprit fails), the worker lacked the function sent by key
(sent again in full), or the pool was shut down under the loop (sent again, to a new pool).
A failed iteration with retries left goes back to the line (``resend``), before any new input.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError, Future
from typing import Any

from autopar import _returns
from autopar._backends import Backend
from autopar._chunking import ChunkSizer
from autopar._errors import ChunkArgumentsError, NotCachedHere, WorkerCrashed
from autopar._plan import LoopCounters
from autopar._records import Batch, Call, Calls, ChunkResult, Failed, IterationOutput
from autopar._recovery import Recovery, every_call_fails
from autopar._sending import PartsByKey
from autopar._serialize import decode_error

__all__ = ["Outcomes"]


class Outcomes:
    """Turns one loop's finished chunks into batches; counts each iteration's attempts."""

    def __init__(
        self,
        retries: int,
        in_process: bool,
        resend: deque[Calls],
        counters: LoopCounters,
        sizer: ChunkSizer,
        recovery: Recovery,
        by_key: PartsByKey | None,
    ) -> None:
        self.retries = retries
        self.in_process = in_process
        self.resend = resend
        self.counters = counters
        self.sizer = sizer
        self.recovery = recovery
        self.by_key = by_key
        self._attempts: dict[int, int] = {}  # by index: failed tries of a call being retried
        self.failed_setup: dict[int, Backend] = {}
        """Our pools whose workers' initializer failed: not to serve later loops."""

    def collect(self, future: Future[Any], calls: Calls, nbytes: int, backend: Backend) -> Batch:
        """The batch of a chunk whose future is done (``nbytes``: its pickled arguments)."""
        try:
            result: ChunkResult | NotCachedHere = future.result()
        except CancelledError:
            # Not by us (we cancel only when the loop ends): autopar.shutdown() in another
            # thread closed the pool under this loop. Send the chunk again, to a new pool.
            self.resend.appendleft(calls)
            return Batch.empty()
        except ChunkArgumentsError as exc:
            if len(calls) > 1:  # send the calls again one by one: only the culprit will fail
                self.resend.extendleft(Calls.of([call]) for call in reversed(calls))
                return Batch.empty()
            return self.fail(calls, exc, "".join(traceback.format_exception(exc)))
        except BrokenExecutor as exc:
            # A pool that is not autopar's own lost a worker: what it held fails.
            crashed = WorkerCrashed(f"the executor lost a worker while this iteration was in its chunk ({exc})")
            return self.fail(calls, crashed, "")
        except Exception as exc:
            if type(exc).__name__ != "KilledWorker":  # Dask's, after the chunk's workers died
                return self.fail(calls, exc, "".join(traceback.format_exception(exc)))
            crashed = WorkerCrashed(f"the executor lost the workers that ran this iteration's chunk ({exc})")
            crashed.__cause__ = exc
            return self.fail(calls, crashed, "")
        if isinstance(result, NotCachedHere):
            assert self.by_key is not None
            self.by_key.missed(result.worker)  # and one more chunk, this one, goes in full
            self.resend.appendleft(calls)
            return Batch.empty()
        if self.by_key is not None:
            self.by_key.ran_on(result.worker)
        if result.setup_failed and backend.owned:
            self.failed_setup[id(backend.executor)] = backend
        self.recovery.worked()
        return self._decode(calls, result, nbytes)

    def _decode(self, calls: Calls, result: ChunkResult, nbytes: int) -> Batch:
        received = 0
        if self.in_process:
            values, failed = result.values, result.errors
        else:
            started = time.perf_counter()
            values, failed, received = _returns.decode(result, calls)  # pickles and shared memory
            self.counters.bytes_received += received
            for position, wire in result.errors.items():
                failed[position] = decode_error(calls.index_of(position), wire)
            self.counters.pickle_seconds += time.perf_counter() - started
        # Big results bound the chunk too: the worker, the pipe and an imap buffer hold them.
        self.sizer.record(len(calls), result.seconds, nbytes + received)
        outputs = None
        if result.outputs:  # by input index (-1, the worker's initializer, stays -1)
            outputs = {calls.index_of(p) if p >= 0 else p: output for p, output in result.outputs.items()}
        return self.settle(calls, values, failed, result.seconds, outputs)

    def fail(self, calls: Calls, exc: BaseException, tb_text: str) -> Batch:
        """Every call fails with ``exc`` (each with its own copy, for its own notes)."""
        return self.settle(calls, None, every_call_fails(calls, exc, tb_text), 0.0)

    def settle(
        self,
        calls: Calls,
        values: list[Any] | None,
        failed: dict[int, Failed],
        seconds: float,
        outputs: dict[int, IterationOutput] | None = None,
    ) -> Batch:
        """Send failed iterations with retries left back to the line; batch up the rest.
        ``failed``: by position in ``calls``; ``values``: None when none came back;
        ``outputs``: by input index, what iterations wrote and logged."""
        indices = calls.index_list()
        if values is None:
            values = [None] * len(calls)
        if self._attempts or self.recovery.suspecting:  # forget what is known of calls now settled
            settled = [index for position, index in enumerate(indices) if position not in failed]
            for index in settled:
                self._attempts.pop(index, None)
            self.recovery.settled(settled)
        if not failed:
            return Batch(indices, values, [], seconds, outputs)
        final: list[tuple[Call, Failed]] = []
        retried: set[int] = set()
        for position, failure in failed.items():
            call = calls[position]
            failure.attempts = self._attempts.pop(call[0], 0) + 1
            if failure.attempts <= self.retries:
                self._attempts[call[0]] = failure.attempts
                self.resend.append(Calls.of([call]))
                retried.add(position)
            else:
                final.append((call, failure))
        if retried:
            kept = [position for position in range(len(calls)) if position not in retried]
            indices, values = [indices[p] for p in kept], [values[p] for p in kept]
            if outputs:  # what a try that will be retried wrote is not the iteration's; what
                # it logged happened, and is handled with the iteration's final try
                kept_indices = set(indices)
                outputs = {
                    index: output if index in kept_indices or index < 0 else IterationOutput(records=output.records)
                    for index, output in outputs.items()
                    if index in kept_indices or index < 0 or output.records
                }
        return Batch(indices, values, final, seconds, outputs)
