"""The dispatch engine: the only module that owns futures.

Data flow::

    calls (lazy iterator of (index, args))
      │  islice(next_size())              ChunkSizer: sizes from measured iteration cost
      ▼
    chunk ── encode_calls ──▶ Chunk(loop_id, chunk_id, function, broadcast, calls)
      │        │ an argument that cannot be pickled fails its own iteration here
      │        ▼
      │   executor.submit(run_chunk, Chunk)        out-of-process backends (one entry point)
      │   executor.submit(run_calls, fn, chunk)    in-process backends (threads, serial)
      │        │                                    at most `2 x workers` chunks in flight
      ▼        ▼
    in_flight {future: chunk} ◀── done callbacks ── SimpleQueue of finished futures
      │
      │  ChunkResult: values pickled one by one (a result that cannot be unpickled fails only
      │  itself), errors by position, the chunk's busy seconds
      │  a future that failed as a whole (worker died, executor error) fails its chunk
      │  a failed iteration with retries left goes back to the front of the line
      ▼
    Batch(indices, values, failures), in completion order ──▶ _collect (input order, errors)

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
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from autopar._backends import Backend, acquire, discard
from autopar._chunking import ChunkSizer
from autopar._errors import WorkerCrashed
from autopar._options import Options
from autopar._records import Batch, Call, Chunk, ChunkResult, Failed, Payload
from autopar._serialize import decode_error, decode_values, digest, split_unpicklable
from autopar._shared import pack, release
from autopar._worker import run_calls, run_chunk

__all__ = ["Dispatcher"]


class Dispatcher:
    """Runs one loop: feeds chunks to a backend and yields finished iterations in batches."""

    def __init__(
        self,
        function: Callable[..., Any],
        calls: Iterable[Call],
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
        self._retry: deque[Call] = deque()
        self._attempts: dict[int, int] = {}
        self._loop_id = uuid.uuid4().hex
        self._chunk_ids = itertools.count()
        self._wire: tuple[str, Payload, str, Payload] | None = None
        self._loop_segments: list[SharedMemory] = []
        self.chunksize = 0
        self.consumed = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def batches(self) -> Generator[Batch, None, None]:
        """Run the loop, yielding each finished chunk's iterations (completion order)."""
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        in_flight: dict[Future[Any], tuple[list[Call], Executor, SharedMemory | None]] = {}
        exhausted = False
        try:
            while True:
                while len(in_flight) < self._window and (self._retry or not exhausted):
                    chunk = self._next_chunk()
                    if not chunk:
                        exhausted = True
                        break
                    future, segment, refused = self._submit(chunk)
                    if refused is not None:
                        yield refused
                    if future is not None:
                        in_flight[future] = (chunk, self._backend_or_acquire().executor, segment)
                        future.add_done_callback(finished.put)
                if not in_flight:
                    if exhausted and not self._retry:
                        return
                    continue
                future = finished.get()
                chunk, executor, segment = in_flight.pop(future)
                release(segment)
                yield self._collect(future, chunk, executor)
        except KeyboardInterrupt:
            if self._backend is not None and self._backend.owned:
                discard(self._backend.executor, kill=True)
            raise
        finally:
            # A chunk still running may read its segments: those are removed, not kept for reuse.
            for future, (_, _, segment) in in_flight.items():
                future.cancel()
                release(segment, reuse=False)
            for segment in self._loop_segments:
                release(segment, reuse=not in_flight)

    def _next_chunk(self) -> list[Call]:
        if self._retry:
            return [self._retry.popleft()]
        chunk = list(itertools.islice(self._calls, self._sizer.next_size()))
        self.consumed += len(chunk)
        # Report the size the loop settled on, not the shrinking tail or the empty last read.
        self.chunksize = max(self.chunksize, len(chunk))
        return chunk

    def _backend_or_acquire(self) -> Backend:
        if self._backend is None:
            self._backend = acquire(self.options)
        return self._backend

    def _replace_broken_pool(self) -> None:
        if self._backend is not None and self._backend.owned:
            discard(self._backend.executor)
            self._backend = None

    def _submit(self, chunk: list[Call]) -> tuple[Future[Any] | None, SharedMemory | None, Batch | None]:
        """Submit a chunk: its future, the segment its large buffers went to (released when
        it comes back), and a batch of the calls whose arguments could not be pickled."""
        backend = self._backend_or_acquire()
        if backend.in_process:
            return backend.executor.submit(run_calls, self.function, chunk, self.broadcast), None, None
        refused = None
        try:
            payload, segment = pack(chunk, shared=backend.local)
        except Exception:
            good, failed = split_unpicklable(chunk)
            calls = dict(chunk)
            refused = Batch(
                [f.index for f in failed], [None] * len(failed), [((f.index, calls[f.index]), f) for f in failed], 0.0
            )
            chunk[:] = good
            if not chunk:
                return None, None, refused
            payload, segment = pack(chunk, shared=backend.local)
        function_key, function, broadcast_key, broadcast = self._wire_parts(backend)
        self.bytes_sent += _size(payload)
        task = Chunk(self._loop_id, next(self._chunk_ids), function_key, function, broadcast_key, broadcast, payload)
        try:
            try:
                return backend.executor.submit(run_chunk, task), segment, refused
            except BrokenExecutor:
                if not backend.owned:
                    raise
                # The pool broke before its failed chunk came back to us: replace it now.
                self._replace_broken_pool()
                return self._backend_or_acquire().executor.submit(run_chunk, task), segment, refused
        except BaseException:
            release(segment)
            raise

    def _wire_parts(self, backend: Backend) -> tuple[str, Payload, str, Payload]:
        """The function and broadcast arguments, pickled once per loop; what is large goes to
        shared memory once, for every worker to map."""
        if self._wire is None:
            parts: list[Any] = []
            for obj in (self.function, self.broadcast):
                payload, segment = pack(obj, shared=backend.local)
                if segment is not None:
                    self._loop_segments.append(segment)
                self.bytes_sent += _size(payload)
                key = f"{payload.segment}:{payload.use}" if payload.segment else digest(payload.data)
                parts += [key, payload]
            self._wire = (parts[0], parts[1], parts[2], parts[3])
        return self._wire

    def _collect(self, future: Future[Any], chunk: list[Call], executor: Executor) -> Batch:
        try:
            result: ChunkResult = future.result()
        except CancelledError:
            return Batch([], [], [], 0.0)
        except BrokenExecutor as exc:
            # The pool lost a worker: every chunk it held fails, and later chunks get a new pool
            # (unless an earlier failed chunk of the same pool already replaced it).
            if self._backend is not None and self._backend.executor is executor:
                self._replace_broken_pool()
            crashed = WorkerCrashed(
                f"a worker process died while this iteration was in its chunk ({exc}); the pool was replaced"
            )
            return self._chunk_failed(chunk, crashed, "")
        except Exception as exc:
            return self._chunk_failed(chunk, exc, "".join(traceback.format_exception(exc)))
        self._sizer.record(len(chunk), result.seconds)
        if self.in_process:
            values, failed = result.values, result.errors
        else:
            self.bytes_received += sum(map(len, result.values))
            values, failed = decode_values(result.values, chunk)
            for position, wire in result.errors.items():
                failed[position] = decode_error(chunk[position][0], wire)
        return self._settle(chunk, values, failed, result.seconds)

    def _chunk_failed(self, chunk: list[Call], exc: BaseException, tb_text: str) -> Batch:
        failed = {position: Failed(index, _fresh(exc), tb_text) for position, (index, _) in enumerate(chunk)}
        return self._settle(chunk, [None] * len(chunk), failed, 0.0)

    def _settle(self, chunk: list[Call], values: list[Any], failed: dict[int, Failed], seconds: float) -> Batch:
        """Send failed iterations with retries left back to the line; batch up the rest."""
        indices = [index for index, _ in chunk]
        if not failed:
            return Batch(indices, values, [], seconds)
        final: list[tuple[Call, Failed]] = []
        retried: set[int] = set()
        for position, failure in failed.items():
            call = chunk[position]
            failure.attempts = self._attempts.pop(call[0], 0) + 1
            if failure.attempts <= self.options.retries:
                self._attempts[call[0]] = failure.attempts
                self._retry.append(call)
                retried.add(position)
            else:
                final.append((call, failure))
        if retried:
            kept = [position for position in range(len(chunk)) if position not in retried]
            indices, values = [indices[p] for p in kept], [values[p] for p in kept]
        return Batch(indices, values, final, seconds)


def _size(payload: Payload) -> int:
    return len(payload.data) + sum(length for _, length in payload.spans)


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
