"""The dispatch engine: the only module that owns futures.

Data flow::

    calls (lazy iterator of Item(index, args, kwargs))
      │  islice(next_size())              ChunkSizer: sizes from measured iteration cost
      ▼
    chunk ── encode_items ──▶ Chunk(loop_id, chunk_id, function, broadcast, items)
      │        │ an argument that cannot be pickled fails its own iteration here
      │        ▼
      │   executor.submit(run_chunk, Chunk)        out-of-process backends (one entry point)
      │   executor.submit(run_items, fn, chunk)    in-process backends (threads, serial)
      │        │                                    at most `2 x workers` chunks in flight
      ▼        ▼
    in_flight {future: chunk} ◀── done callbacks ── SimpleQueue of finished futures
      │
      │  decode_outcome per iteration (a result that cannot be unpickled fails only itself)
      │  a future that failed as a whole (worker died, executor error) fails its chunk
      │  a failed iteration with retries left goes back to the front of the line
      ▼
    batches of (Item, Outcome), in completion order ──▶ _collect (input order, errors)

The input is pulled only when a chunk slot frees up, so memory stays flat for huge or endless
iterables. Closing the generator (the first failure under ``on_error="raise"``) cancels the
chunks that have not started; Ctrl-C also kills autopar's own worker processes.
"""

from __future__ import annotations

import copy
import itertools
import queue
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import BrokenExecutor, CancelledError, Future
from typing import Any

from autopar._backends import Backend, acquire, discard
from autopar._chunking import ChunkSizer
from autopar._errors import WorkerCrashed
from autopar._options import Options
from autopar._records import Chunk, Item, Outcome
from autopar._serialize import decode_outcome, digest, dumps, encode_items
from autopar._worker import run_chunk, run_items

__all__ = ["Batch", "Dispatcher"]

Batch = list[tuple[Item, Outcome]]


class Dispatcher:
    """Runs one loop: feeds chunks to a backend and yields finished iterations in batches."""

    def __init__(
        self,
        function: Callable[..., Any],
        calls: Iterable[Item],
        broadcast: dict[str, Any],
        options: Options,
        total: int | None = None,
    ) -> None:
        self.function = function
        self.broadcast = broadcast
        self.options = options
        self._calls = iter(calls)
        self._backend: Backend | None = acquire(options)
        self.in_process = self._backend.in_process
        self.workers = 1 if options.backend == "serial" else options.workers or 1
        # In-process serial runs one iteration at a time, interleaved with its consumer, like
        # the old loop: chunks buy nothing without a process boundary to amortize.
        fixed = options.chunksize or (1 if options.backend == "serial" else None)
        self._sizer = ChunkSizer(fixed, self.workers, total)
        self._window = 1 if options.backend == "serial" else 2 * self.workers
        self._retry: deque[Item] = deque()
        self._attempts: dict[int, int] = {}
        self._loop_id = uuid.uuid4().hex
        self._chunk_ids = itertools.count()
        self._wire: tuple[str, bytes, str, bytes] | None = None
        self.chunksize = 0
        self.consumed = 0

    def batches(self) -> Generator[Batch, None, None]:
        """Run the loop, yielding each finished chunk's iterations (completion order)."""
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        in_flight: dict[Future[Any], list[Item]] = {}
        exhausted = False
        try:
            while True:
                while len(in_flight) < self._window and (self._retry or not exhausted):
                    chunk = self._next_chunk()
                    if not chunk:
                        exhausted = True
                        break
                    future, refused = self._submit(chunk)
                    if refused:
                        yield refused
                    if future is not None:
                        in_flight[future] = chunk
                        future.add_done_callback(finished.put)
                if not in_flight:
                    if exhausted and not self._retry:
                        return
                    continue
                future = finished.get()
                batch = self._collect(future, in_flight.pop(future))
                if batch:
                    yield batch
        except KeyboardInterrupt:
            if self._backend is not None and self._backend.owned:
                discard(self._backend.executor, kill=True)
            raise
        finally:
            for future in in_flight:
                future.cancel()

    def _next_chunk(self) -> list[Item]:
        if self._retry:
            return [self._retry.popleft()]
        size = self._sizer.next_size()
        self.chunksize = size
        chunk = list(itertools.islice(self._calls, size))
        self.consumed += len(chunk)
        return chunk

    def _submit(self, chunk: list[Item]) -> tuple[Future[Any] | None, Batch]:
        if self._backend is None:
            self._backend = acquire(self.options)
        backend = self._backend
        if backend.in_process:
            return backend.executor.submit(run_items, self.function, chunk, self.broadcast), []
        items, failed = encode_items(chunk)
        refused: Batch = []
        if failed:
            by_index = {item.index: item for item in chunk}
            refused = [(by_index.pop(outcome.index), outcome) for outcome in failed]
            chunk[:] = by_index.values()
            if not chunk:
                return None, refused
        function_key, function, broadcast_key, broadcast = self._wire_parts()
        task = Chunk(self._loop_id, next(self._chunk_ids), function_key, function, broadcast_key, broadcast, items)
        return backend.executor.submit(run_chunk, task), refused

    def _wire_parts(self) -> tuple[str, bytes, str, bytes]:
        """The function and broadcast arguments, pickled once per loop."""
        if self._wire is None:
            function, broadcast = dumps(self.function), dumps(self.broadcast)
            self._wire = (digest(function), function, digest(broadcast), broadcast)
        return self._wire

    def _collect(self, future: Future[Any], chunk: list[Item]) -> Batch:
        try:
            result = future.result()
        except CancelledError:
            return []
        except BrokenExecutor as exc:
            # The pool lost a worker: every chunk it held fails, and later chunks get a new pool.
            if self._backend is not None and self._backend.owned:
                discard(self._backend.executor)
                self._backend = None
            crashed = WorkerCrashed(
                f"a worker process died while this iteration was in its chunk ({exc}); the pool was replaced"
            )
            return self._settle([(item, Outcome(item.index, exception=_fresh(crashed))) for item in chunk])
        except Exception as exc:
            tb_text = "".join(traceback.format_exception(exc))
            return self._settle(
                [(item, Outcome(item.index, exception=_fresh(exc), traceback=tb_text)) for item in chunk]
            )
        outcomes: list[Outcome] = result if self.in_process else [decode_outcome(w) for w in result]
        self._sizer.record(len(outcomes), sum(outcome.seconds for outcome in outcomes))
        by_index = {item.index: item for item in chunk}
        return self._settle([(by_index[outcome.index], outcome) for outcome in outcomes])

    def _settle(self, batch: Batch) -> Batch:
        """Send failed iterations with retries left back to the line; keep the rest."""
        settled: Batch = []
        for item, outcome in batch:
            attempts = self._attempts.get(item.index, 0) + 1
            outcome.attempts = attempts
            if outcome.exception is not None and attempts <= self.options.retries:
                self._attempts[item.index] = attempts
                self._retry.append(item)
            else:
                self._attempts.pop(item.index, None)
                settled.append((item, outcome))
        return settled


def _fresh(exc: BaseException) -> BaseException:
    """A copy of a chunk-wide exception for one iteration, so that notes do not pile up."""
    try:
        fresh = copy.copy(exc)
    except Exception:
        return exc
    if hasattr(fresh, "__notes__"):
        fresh.__notes__ = list(fresh.__notes__)
    fresh.__cause__, fresh.__traceback__ = exc.__cause__, exc.__traceback__
    return fresh
