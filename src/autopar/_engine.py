"""The dispatch engine: the only module that owns futures.

Data flow::

    calls (lazy iterator of (index, args))
      │  islice(next_size())              ChunkSizer: sizes from measured iteration cost
      ▼
    chunk ── pack ──▶ Chunk(loop_id, chunk_id, function, broadcast, calls)
      │        │ an argument that cannot be pickled fails its own iteration here;
      │        │ large buffers go to shared memory; to other machines, a large function or
      │        │ broadcast goes with the first chunks only, later ones name it by key
      │        ▼
      │   executor.submit(run_chunk, Chunk)          out-of-process backends (one entry point)
      │   executor.submit(run_calls, fn, chunk)      in-process backends (threads, serial)
      │        │                                      at most `2 x workers` chunks in flight,
      │        │                                      refilled `workers` at a time
      ▼        ▼
    in_flight {future: _InFlight} ◀── done callbacks ── SimpleQueue of finished futures
      │                                    ▲
      │   timeouts: slots say who runs what│since when ── kill the overdue worker
      │
      ├─ ChunkResult: values pickled one by one (one that cannot be unpickled fails only
      │  itself), errors by position, the chunk's busy seconds
      ├─ the pool broke (a worker died or was killed): the slots and exit codes say which
      │  iteration did it; it fails (WorkerCrashed / IterationTimeout), every other call in
      │  flight is sent again to a new pool
      ├─ a chunk whose arguments a worker could not unpickle is sent again call by call,
      │  one whose function or broadcast a worker lacks (NotCachedHere), with them
      └─ a failed iteration with retries left is sent again, before any new input
      ▼
    Batch(indices, values, failures), in completion order ──▶ _collect (input order, errors)

The input is pulled only when a chunk slot frees up, so memory stays flat for huge or endless
iterables. Closing the generator (the first failure under ``on_error="raise"``) cancels the
chunks that have not started; Ctrl-C also kills autopar's own worker processes.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import signal
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple

from autopar._backends import (
    SHUTTING_DOWN,
    Backend,
    abandon,
    acquire,
    discard,
    loop_ended,
    loop_started,
    post_mortem,
    retire,
)
from autopar._chunking import ChunkSizer
from autopar._culprit import pickling_error, unpicklable_error
from autopar._errors import (
    ChunkArgumentsError,
    IterationTimeout,
    NotCachedHere,
    SerializationError,
    WorkerCrashed,
    fresh_copy,
)
from autopar._main_guard import raise_if_script_unguarded
from autopar._options import Options, executor_capacity
from autopar._records import BY_KEY, Batch, Call, Calls, Chunk, ChunkResult, Failed, Payload
from autopar._results import Rerunner
from autopar._serialize import decode_error, decode_values, digest, split_unpicklable
from autopar._shared import SHARE_ABOVE, pack, release
from autopar._slots import LOADING_ARGUMENTS, SENDING_RESULTS, UNTIMED, Running
from autopar._worker import run_calls, run_chunk

__all__ = ["Dispatcher", "Loop"]

_chunk_ids = itertools.count()  # unique in this process, so that slots name chunks unambiguously
_loop_tokens = itertools.count(1)
_KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for an overdue worker
_SUSPICIONS = 3  # pool breaks an iteration may be present at, unexplained, before it is blamed
_FRUITLESS_BREAKS = 3  # pool breaks with nobody running before the loop gives up


class _InFlight(NamedTuple):
    chunk_id: int
    calls: Calls
    backend: Backend
    segment: SharedMemory | None
    nbytes: int = 0  # the pickled arguments


@dataclass(frozen=True)
class Loop:
    """One loop to run: what to call (``name`` in messages), with which positional
    ``arguments`` each time (tuples, or bare values when ``single``), with which broadcast
    keyword arguments and options."""

    function: Callable[..., Any]
    name: str
    arguments: Iterable[tuple[Any, ...]]
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


class Dispatcher:
    """Runs one loop: feeds chunks to a backend and yields finished iterations in batches."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.options = options = loop.options
        total = loop.total
        arguments = loop.arguments
        # A list, tuple or range of single arguments is cut into slices: a range slice pickles
        # in a few bytes, a list slice is one copy, instead of an iterator step per iteration.
        self._sequence = arguments if loop.single and isinstance(arguments, list | tuple | range) else None
        self._arguments = iter(arguments)
        self._backend: Backend | None = acquire(options)
        self.in_process = self._backend.in_process
        self.workers = 1 if options.backend == "serial" else options.workers or 1
        capacity = executor_capacity(options.backend) if isinstance(options.backend, Executor) else None
        if capacity is not None and capacity < self.workers:
            self.workers = capacity  # an executor runs no more than it has, whatever was asked
        # In-process serial runs one iteration at a time, interleaved with its consumer, like
        # the old loop: chunks buy nothing without a process boundary to amortize. Workers
        # replaced every N iterations need chunks of a known size.
        fixed = options.chunksize
        if fixed is None and (options.backend == "serial" or options.max_tasks_per_worker is not None):
            fixed = 1
        if fixed is not None and options.max_tasks_per_worker is not None:
            fixed = min(fixed, options.max_tasks_per_worker)
        self._sizer = ChunkSizer(fixed, self.workers, total)
        self._window = 1 if options.backend == "serial" else 2 * self.workers
        # Refill the window only once a worker's worth of chunks has come back: every
        # submission wakes the executor's threads, and one wake-up can carry several chunks.
        self._refill_at = max(self._window - self.workers, 0)
        if capacity is not None and capacity > self.workers:
            # An executor with more workers would run every chunk in flight at once: to run
            # `workers` iterations at a time, keep only that many chunks in flight.
            self._window, self._refill_at = self.workers, self.workers - 1
        self._pending: deque[Calls] = deque()  # chunks to send again, before new input
        self._attempts: dict[int, int] = {}
        self._suspicions: dict[int, int] = {}
        self._fruitless_breaks = 0
        # What each worker we stopped past the timeout was running, by (pool, pid): a pid
        # alone could name a new worker after the pool is replaced.
        self._overdue: dict[tuple[int, int], Running] = {}
        self._in_flight: dict[Future[Any], _InFlight] = {}
        self._loop_id = uuid.uuid4().hex
        self._loop_token = next(_loop_tokens)
        self._wire: tuple[str, Payload, str, Payload] | None = None
        backend = self._backend
        foreign = not (backend.local or backend.in_process)  # a Dask, loky, MPI... executor
        self._by_key = _PartsByKey(backend.executor, self.workers, capacity or self.workers) if foreign else None
        # Segments this loop created and has not released (pack adds them at once: a Ctrl-C
        # landing on the way to the chunk's bookkeeping leaves none to no one).
        self._loop_segments: set[SharedMemory] = set()  # the function and broadcast arguments
        self._chunk_segments: set[SharedMemory] = set()
        self._failed_setup: dict[int, Backend] = {}  # our pools whose initializer failed
        self.chunksize = 0
        self.consumed = 0
        self.delivered: int | None = None  # set by an in-order consumer (imap): results it took
        self._driver: threading.Thread | None = None
        self.stop_before: int | None = None
        """Set by a consumer that will stop at this index (the first failure under "raise"):
        read no more input, and finish only what comes before it."""
        self.input_error: Exception | None = None
        """What the input iterator raised: the loop reads no further, finishes what it read
        before, then raises it."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pickle_seconds = 0.0  # in this process: arguments pickled, results unpickled

    def batches(self) -> Generator[Batch, None, None]:
        """Run the loop, yielding each finished chunk's iterations (completion order)."""
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        in_flight = self._in_flight
        exhausted = False
        watching = self._watch_timeouts()
        loop_started(self)
        try:
            while True:
                self._driver = threading.current_thread()  # whoever resumed the generator
                refill = len(in_flight) <= self._refill_at
                while refill and self._may_send(exhausted):
                    chunk = self._next_chunk()
                    exhausted = exhausted or self.input_error is not None
                    if not chunk:
                        exhausted = True
                        break
                    future, entry, refused = self._submit(chunk)
                    if future is not None and entry is not None:
                        in_flight[future] = entry  # before yielding: a close() must see it
                        future.add_done_callback(finished.put)
                    if refused is not None:
                        yield refused
                if not in_flight:
                    if (exhausted or self.stop_before is not None) and not self._pending:
                        if self.input_error is not None:
                            raise self.input_error  # now that what was read before it is done
                        return
                    continue
                future = finished.get()
                if future not in in_flight:
                    continue  # a chunk already sent again
                entry = in_flight.pop(future)
                if self._broke_our_pool(future, entry):
                    yield from self._recover(entry)
                else:
                    self._release(entry.segment)
                    yield self._collect(future, entry)
        except KeyboardInterrupt:
            self.interrupt()
            raise
        finally:
            loop_ended(self)
            if watching is not None:
                watching.set()
            # A chunk still running may read its segments: those are removed, not kept for reuse.
            for backend in {id(entry.backend): entry.backend for entry in in_flight.values()}.values():
                if backend.slots is not None:
                    backend.slots.cancel(self._loop_token)
                    abandon(backend, [entry.chunk_id for entry in in_flight.values() if entry.backend is backend])
            for future in in_flight:
                future.cancel()
            for segment in list(self._chunk_segments):  # in flight, or caught by Ctrl-C on the way
                self._release(segment, reuse=False)
            for segment in list(self._loop_segments):
                release(segment, reuse=not in_flight, owner=self._loop_segments)
            for backend in self._failed_setup.values():
                retire(backend)  # the next loop starts new workers, whose initializer may work

    def pools_in_use(self) -> set[int]:
        """Our pools this loop runs on now (by id), read at exit from the main thread: none
        when no thread that could go on with it is left (an imap held, paused, by the main
        thread, or by a thread that has ended)."""
        driver = self._driver
        if driver is None or driver is threading.main_thread() or not driver.is_alive():
            return set()
        backends = [entry.backend for entry in list(self._in_flight.values())] + [self._backend]
        return {id(backend.executor) for backend in backends if backend is not None and backend.owned}

    def give_up(self) -> dict[int, list[int]]:
        """At exit, when no thread can go on with this loop: cancel its chunks that have not
        started, and return those that may run on our pools, by pool (its id), to be stopped."""
        chunks: dict[int, list[int]] = {}
        for future, entry in list(self._in_flight.items()):
            future.cancel()
            if entry.backend.slots is not None:
                entry.backend.slots.cancel(self._loop_token)  # queued already: skipped
            if entry.backend.owned:
                chunks.setdefault(id(entry.backend.executor), []).append(entry.chunk_id)
        return chunks

    def interrupt(self) -> None:
        """Ctrl-C: kill autopar's own pool that this loop runs on, so nothing keeps running."""
        backend = self._backend
        if backend is not None and backend.owned:
            discard(backend, kill=True)
            post_mortem(backend)  # the report for other loops on it: stopped workers, no crash

    # --- sending ---

    def _may_send(self, exhausted: bool) -> bool:
        """Whether the window has room and there is something to send."""
        reading = not exhausted and self.stop_before is None and self._may_read()
        return len(self._in_flight) < self._window and (bool(self._pending) or reading)

    def runs_before(self, index: int) -> bool:
        """Whether an iteration earlier than ``index`` is still in flight or to be sent again."""
        chunks = [entry.calls for entry in self._in_flight.values()] + list(self._pending)
        return any(min(chunk.index_list()) < index for chunk in chunks)

    def _may_read(self) -> bool:
        """Whether to read more input: always for map; for imap, only while the results
        waiting for a slow earlier one stay few (memory stays bounded behind a slow head)."""
        if self.delivered is None or not self._in_flight:
            return True
        return self.consumed - self.delivered < self._window * max(self._sizer.size, 1)

    def _next_chunk(self) -> Calls:
        if self._pending:
            return self._pending.popleft()
        size, start = self._sizer.next_size(), self.consumed
        if self._sequence is not None:
            arguments: Sequence[Any] = self._sequence[start : start + size]
        else:
            arguments = []
            try:
                arguments.extend(itertools.islice(self._arguments, size))  # keeps what came before a raise
            except Exception as exc:
                self.input_error = exc
        indices = self.loop.indices
        if indices is None or not arguments:
            chunk = Calls(arguments, start, single=self.loop.single)
        else:
            chunk = Calls(arguments, indices[start], list(indices[start : start + len(arguments)]), self.loop.single)
        self.consumed += len(chunk)
        # Report the size the loop settled on, not the shrinking tail or the empty last read.
        self.chunksize = max(self.chunksize, len(chunk))
        return chunk

    def _release(self, segment: SharedMemory | None, *, reuse: bool = True) -> None:
        release(segment, reuse=reuse, owner=self._chunk_segments)

    def _backend_or_acquire(self) -> Backend:
        if self._backend is None:
            self._backend = acquire(self.options)
        return self._backend

    def _submit(self, chunk: Calls) -> tuple[Future[Any] | None, _InFlight | None, Batch | None]:
        """Submit a chunk. Returns its future and bookkeeping, and a batch of the calls whose
        arguments could not be pickled (they fail here, alone)."""
        backend = self._backend_or_acquire()
        chunk_id = next(_chunk_ids)
        refused, segment, nbytes, sent_as = None, None, 0, ""
        if backend.in_process:
            loop = self.loop
            options = self.options
            serial = options.backend == "serial"
            call: tuple[Any, ...] = (
                run_calls,
                loop.function,
                chunk,
                loop.broadcast,
                options.timeout,
                options.seed,
                loop.keywords,
                serial,
            )
        else:
            # The function and keyword arguments first: if they cannot be pickled, no chunk
            # ever can, and no segment of this chunk is left behind.
            function_key, function, broadcast_key, broadcast = self._wire_parts(backend)
            if self._by_key is not None:
                function, broadcast, sent_as = self._by_key.choose(function, broadcast)
            started = time.perf_counter()
            try:
                payload, segment = pack(chunk, shared=backend.local, owner=self._chunk_segments)
            except Exception:
                good, failed = split_unpicklable(chunk)
                calls = dict(chunk)
                refused = self._settle(
                    Calls.of((f.index, calls[f.index]) for f in failed), None, dict(enumerate(failed)), 0.0
                )
                chunk = Calls.of(good)
                if not chunk:
                    return None, None, refused
                payload, segment = pack(chunk, shared=backend.local, owner=self._chunk_segments)
            self.pickle_seconds += time.perf_counter() - started
            nbytes = _size(payload)
            self.bytes_sent += nbytes + len(function.data) + len(broadcast.data)
            task = Chunk(
                self._loop_id,
                chunk_id,
                function_key,
                function,
                broadcast_key,
                broadcast,
                payload,
                self.options.timeout,
                self._loop_token,
                self.options.seed,
                self.loop.keywords,
            )
            call = (run_chunk, task)
        try:
            sent = self._send(backend, call)
        except BaseException:
            self._release(segment)
            raise
        if isinstance(sent, BrokenExecutor):  # a user's executor: its calls fail, the loop goes on
            self._release(segment)
            error = WorkerCrashed(f"the executor cannot run this iteration: {sent}")
            return None, None, _merge(refused, self._chunk_failed(chunk, error, ""))
        future, backend = sent
        if self._by_key is not None:
            self._by_key.sent(sent_as)
        return future, _InFlight(chunk_id, chunk, backend, segment, nbytes), refused

    def _send(self, backend: Backend, call: tuple[Any, ...]) -> tuple[Future[Any], Backend] | BrokenExecutor:
        """``backend.executor.submit(*call)``. Our own pool, broken by a crash or shut down by
        autopar.shutdown() in another thread, is replaced and the call sent to the new one;
        a user's broken executor is returned as the error its calls fail with."""
        broken, shut = 2, 10  # new pools to try: one that breaks at once may break again; one
        while True:  # shut down by a shutdown() called again and again is soon left alone
            try:
                return backend.executor.submit(*call), backend
            except BrokenExecutor as exc:
                if not backend.owned:
                    return exc
                if not broken:
                    raise
                broken -= 1
            except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
                if "interpreter shutdown" in str(exc):  # concurrent.futures refuses for good
                    raise RuntimeError(SHUTTING_DOWN) from exc
                if not backend.owned or not shut:
                    raise
                shut -= 1
            self._replace_pool(backend)
            backend = self._backend_or_acquire()

    def _replace_pool(self, backend: Backend) -> None:
        """Our pool broke (a crash in this or another loop sharing it) or was shut down:
        close it (once, for every loop) and let the next submission take a new one."""
        running, exit_codes, _ = post_mortem(backend)
        if self._backend is backend:
            self._backend = None
        raise_if_script_unguarded(exit_codes, running)

    def _wire_parts(self, backend: Backend) -> tuple[str, Payload, str, Payload]:
        """The function and broadcast arguments, pickled once per loop; what is large goes to
        shared memory once, for every worker to map, and chunks carry only its name.

        Workers cache what these unpickle to: the function by content, so a warm worker
        skips it on the next loop; the broadcast arguments for this loop only, so that one
        an iteration mutated is not handed to the next loop."""
        if self._wire is None:
            parts: list[Any] = []
            for obj in (self.loop.function, self.loop.broadcast):
                try:
                    payload, _ = pack(obj, shared=backend.local, owner=self._loop_segments)
                except Exception as exc:
                    raise _unpicklable(self.loop, obj, exc)  # noqa: B904 (its cause: the part that fails)
                self.bytes_sent += _size(payload) - len(payload.data)  # inline data: per chunk
                key = f"{payload.segment}:{payload.use}" if payload.segment else digest(payload.data)
                parts += [key, payload]
            self._wire = (parts[0], parts[1], f"{self._loop_id}:{parts[2]}", parts[3])
        return self._wire

    # --- waiting, and stopping overdue iterations ---

    def _watch_timeouts(self) -> threading.Event | None:
        """With a timeout on autopar's own pool, start a thread that stops overdue iterations,
        whether or not the consumer is waiting (``imap`` hands control back between results).
        Returns the event to set when the loop is over; None when there is nothing to watch.

        An iteration may outlive its loop (on_error="raise" stops at the first failure, an
        imap may be closed): the thread goes on until none of the loop's iterations runs, so
        that a hung one does not hold its worker, or `shutdown`, forever."""
        timeout = self.options.timeout
        if timeout is None or self._backend is None or self._backend.slots is None:
            return None
        loop_over = threading.Event()

        def stop_overdue() -> float:
            backend = self._backend  # a broken pool is replaced: watch the current one
            return self._stop_overdue(backend) if backend is not None and backend.slots is not None else timeout

        def watch() -> None:
            wait = timeout
            while not loop_over.wait(wait):
                wait = stop_overdue()
            while any(not future.done() for future in list(self._in_flight)):
                time.sleep(stop_overdue())  # until the next deadline, not a polling interval

        threading.Thread(target=watch, name=f"autopar timeouts of {self.loop.name}", daemon=True).start()
        return loop_over

    def _stop_overdue(self, backend: Backend) -> float:
        """Kill the workers running one of our iterations past the timeout; return how long
        until the next one could be overdue. Runs in the watching thread: it only reads the
        engine's state, through operations that are atomic."""
        assert backend.slots is not None
        assert self.options.timeout is not None
        timeout_ns = int(self.options.timeout * 1e9)
        entries = list(self._in_flight.values())  # one C-level copy: the loop thread may be adding
        ours = {entry.chunk_id for entry in entries if entry.backend is backend}
        now = time.monotonic_ns()
        wait_ns = timeout_ns
        pool = id(backend.executor)
        for pid, running in backend.slots.snapshot().items():
            if running.chunk_id not in ours or running.started_ns == UNTIMED or (pool, pid) in self._overdue:
                continue
            left = running.started_ns + timeout_ns - now
            if left > 0:
                wait_ns = min(wait_ns, left)
                continue
            # Noted before the kill: the loop thread may see the pool break at once.
            self._overdue[pool, pid] = running
            if not backend.kill_worker(pid, _KILL_GRACE):  # a dead worker's stale slot
                self._overdue.pop((pool, pid), None)
        return max(wait_ns / 1e9, 0.001)

    # --- collecting ---

    def _collect(self, future: Future[Any], entry: _InFlight) -> Batch:
        chunk = entry.calls
        try:
            result: ChunkResult | NotCachedHere = future.result()
        except CancelledError:
            # Not by us (we cancel only when the loop ends): autopar.shutdown() in another
            # thread closed the pool under this loop. Send the chunk again, to a new pool.
            self._pending.appendleft(chunk)
            return Batch([], [], [], 0.0)
        except ChunkArgumentsError as exc:
            if len(chunk) > 1:  # send the calls again one by one: only the culprit will fail
                self._pending.extendleft(Calls.of([call]) for call in reversed(chunk))
                return Batch([], [], [], 0.0)
            return self._chunk_failed(chunk, exc, "".join(traceback.format_exception(exc)))
        except BrokenExecutor as exc:
            # A pool that is not autopar's own lost a worker: what it held fails.
            crashed = WorkerCrashed(f"the executor lost a worker while this iteration was in its chunk ({exc})")
            return self._chunk_failed(chunk, crashed, "")
        except Exception as exc:
            if type(exc).__name__ != "KilledWorker":  # Dask's, after the chunk's workers died
                return self._chunk_failed(chunk, exc, "".join(traceback.format_exception(exc)))
            crashed = WorkerCrashed(f"the executor lost the workers that ran this iteration's chunk ({exc})")
            crashed.__cause__ = exc
            return self._chunk_failed(chunk, crashed, "")
        if isinstance(result, NotCachedHere):
            assert self._by_key is not None
            self._by_key.missed(result.worker)  # and one more chunk, this one, goes in full
            self._pending.appendleft(chunk)
            return Batch([], [], [], 0.0)
        if self._by_key is not None:
            self._by_key.ran_on(result.worker)
        if result.setup_failed and entry.backend.owned:
            self._failed_setup[id(entry.backend.executor)] = entry.backend
        self._fruitless_breaks = 0
        received = 0
        if self.in_process:
            values, failed = result.values, result.errors
        else:
            blobs = result.values
            received = len(blobs) if isinstance(blobs, bytes) else sum(map(len, blobs))
            self.bytes_received += received
            started = time.perf_counter()
            values, failed = decode_values(result.values, chunk)
            for position, wire in result.errors.items():
                failed[position] = decode_error(chunk[position][0], wire)
            self.pickle_seconds += time.perf_counter() - started
        # Big results bound the chunk too: the worker, the pipe and an imap buffer hold them.
        self._sizer.record(len(chunk), result.seconds, entry.nbytes + received)
        return self._settle(chunk, values, failed, result.seconds)

    def _chunk_failed(self, chunk: Calls, exc: BaseException, tb_text: str) -> Batch:
        failed = {position: Failed(index, fresh_copy(exc), tb_text) for position, (index, _) in enumerate(chunk)}
        return self._settle(chunk, None, failed, 0.0)

    def _settle(self, chunk: Calls, values: list[Any] | None, failed: dict[int, Failed], seconds: float) -> Batch:
        """Send failed iterations with retries left back to the line; batch up the rest."""
        indices = chunk.index_list()
        if values is None:
            values = [None] * len(chunk)
        if self._attempts or self._suspicions:  # forget what is known of calls now settled
            for position, index in enumerate(indices):
                if position not in failed:
                    self._attempts.pop(index, None)
                    self._suspicions.pop(index, None)
        if not failed:
            return Batch(indices, values, [], seconds)
        final: list[tuple[Call, Failed]] = []
        retried: set[int] = set()
        for position, failure in failed.items():
            call = chunk[position]
            failure.attempts = self._attempts.pop(call[0], 0) + 1
            if failure.attempts <= self.options.retries:
                self._attempts[call[0]] = failure.attempts
                self._pending.append(Calls.of([call]))
                retried.add(position)
            else:
                final.append((call, failure))
        if retried:
            kept = [position for position in range(len(chunk)) if position not in retried]
            indices, values = [indices[p] for p in kept], [values[p] for p in kept]
        return Batch(indices, values, final, seconds)

    # --- a worker died: find out which iteration did it, send the others again ---

    def _broke_our_pool(self, future: Future[Any], entry: _InFlight) -> bool:
        if future.cancelled() or entry.backend.slots is None:
            return False
        return isinstance(future.exception(), BrokenExecutor)

    def _recover(self, first: _InFlight) -> Generator[Batch, None, None]:
        """Our pool broke: every chunk it held is lost. Blame the iteration that killed its
        worker (the slots say what each worker ran, the exit codes who died first) and send
        every other call again, to a new pool."""
        backend = first.backend
        lost = [first] + [self._in_flight.pop(f) for f, e in list(self._in_flight.items()) if e.backend is backend]
        running, exit_codes, stopped = post_mortem(backend)
        if self._backend is backend:
            self._backend = None
        for entry in lost:
            self._release(entry.segment)
        raise_if_script_unguarded(exit_codes, running)  # no iteration could ever run
        pool = id(backend.executor)  # forget every worker of this pool we stopped
        overdue = {pid: self._overdue.pop((at, pid)) for at, pid in list(self._overdue) if at == pool}
        blamed: dict[int, dict[int, Failed]] = {}
        for pid, exit_code in exit_codes.items():
            where = overdue.get(pid) if pid in stopped else None
            if where is not None:
                doing = _STAGES.get(where.position, "the iteration")  # pickling: a hung __reduce__ too
                error: BaseException = IterationTimeout(
                    f"{doing} ran longer than timeout={self.options.timeout:g} s; "
                    f"its worker (pid {pid}) was stopped and replaced"
                )
            elif pid in stopped:
                continue  # stopped on purpose by another loop: its timeout, or Ctrl-C
            elif exit_code is not None and exit_code != -signal.SIGTERM and pid in running:
                where = running[pid]
                error = WorkerCrashed(_death(pid, exit_code, where.position), exit_code, pid)
            else:
                continue
            blamed.setdefault(where.chunk_id, {})[where.position] = Failed(-1, error)
        if not blamed and stopped:  # another loop stopped a worker on purpose: no crash
            self._pending.extendleft(entry.calls for entry in reversed(lost))
            return
        if not blamed:  # nobody to blame, in this loop or another one sharing the pool
            yield from self._suspect(lost, running)
            return
        self._fruitless_breaks = 0
        for entry in lost:
            culprits = blamed.get(entry.chunk_id)
            if not culprits:
                self._pending.appendleft(entry.calls)
                continue
            calls = entry.calls
            stage = min(culprits)
            if stage < 0 and len(calls) > 1:  # died around the chunk, not in a call: isolate
                self._pending.extendleft(Calls.of([call]) for call in reversed(calls))
                continue
            positions = [stage] if stage < 0 else [p for p in culprits if p >= 0]
            failed = {max(p, 0): culprits[p] for p in positions}
            for position, failure in failed.items():
                failure.index = calls[position][0]
            rest = [call for position, call in enumerate(calls) if position not in failed]
            if rest:
                self._pending.appendleft(Calls.of(rest))
            yield self._settle(Calls.of(calls[p] for p in failed), None, dict(enumerate(failed.values())), 0.0)

    def _suspect(self, lost: list[_InFlight], running: dict[int, Running]) -> Generator[Batch, None, None]:
        """The pool broke and no exit code points at anyone (a worker killed from outside with
        SIGTERM, an initializer that failed): send everything again, but blame an iteration
        present at too many such breaks, and give up on pools that break with nobody working."""
        by_chunk = {entry.chunk_id: entry for entry in lost}
        present = [(by_chunk[r.chunk_id], r.position) for r in running.values() if r.chunk_id in by_chunk]
        if not present:
            self._fruitless_breaks += 1
        blamed: dict[int, set[int]] = {}
        for entry, position in present:
            index = entry.calls[max(position, 0)][0]
            self._suspicions[index] = self._suspicions.get(index, 0) + 1
            if self._suspicions[index] >= _SUSPICIONS and (position >= 0 or len(entry.calls) == 1):
                blamed.setdefault(entry.chunk_id, set()).add(max(position, 0))
        for entry in lost:
            if self._fruitless_breaks >= _FRUITLESS_BREAKS:
                error = WorkerCrashed(
                    f"the worker pool broke {self._fruitless_breaks} times with no iteration running "
                    "(does the initializer fail, are workers killed from outside, or, under spawn or "
                    "forkserver, does the script start this loop again when a worker imports it, "
                    'without `if __name__ == "__main__":`?)'
                )
                yield self._chunk_failed(entry.calls, error, "")
                continue
            positions = blamed.get(entry.chunk_id, set())
            rest = [call for position, call in enumerate(entry.calls) if position not in positions]
            if rest:
                self._pending.appendleft(Calls.of(rest))
            if positions:
                error = WorkerCrashed(
                    f"its worker died {_SUSPICIONS} times while running it, killed from outside or by SIGTERM"
                )
                yield self._chunk_failed(Calls.of(entry.calls[p] for p in sorted(positions)), error, "")


_new_worker_per_task: weakref.WeakSet[Executor] = weakref.WeakSet()
"""Executors seen to run each task in a new worker process: sending by key cannot pay there."""


class _PartsByKey:
    """What the chunks of one loop carry to an executor autopar shares no memory with (Dask,
    loky, MPI). A large function or broadcast goes in full with the first chunk for each
    worker; later chunks name it by key (`BY_KEY`) and the worker takes it from its cache.
    A worker that lacks it returns `NotCachedHere`, and one more chunk goes in full (another
    worker may take it: a worker can miss more than once).

    A miss by a worker new to the loop is expected. By key stops paying when workers that
    ran a chunk of the loop keep lacking it (their cache does not hold: the rest of the loop
    goes in full), or when no worker ever runs a second chunk (a process per task: every
    later loop on that executor goes in full too)."""

    def __init__(self, executor: Executor, workers: int, capacity: int) -> None:
        self.executor = executor
        self.workers = workers
        self.capacity = capacity  # calls the executor runs at once: at least its processes
        self.full_sends = 0
        self.misses = 0
        self.results = 0
        self.holders: set[str] = set()  # workers that ran a chunk of this loop
        self.lost = 0  # misses by holders

    def choose(self, function: Payload, broadcast: Payload) -> tuple[Payload, Payload, str]:
        """The parts to send, and how: "full", "key", or "" (nothing large)."""
        large = [len(part.data) >= SHARE_ABOVE for part in (function, broadcast)]
        if not any(large):
            return function, broadcast, ""
        if self.full_sends < self.workers + self.misses or not self._pays():
            return function, broadcast, "full"
        return (BY_KEY if large[0] else function), (BY_KEY if large[1] else broadcast), "key"

    def _pays(self) -> bool:
        if self.lost > self.workers:
            return False
        # More results than twice the executor's processes, each from a new one: none stays.
        if self.results > 2 * self.capacity and len(self.holders) == self.results:
            with contextlib.suppress(TypeError):  # an executor that takes no weak reference
                _new_worker_per_task.add(self.executor)
            return False
        try:
            return self.executor not in _new_worker_per_task
        except TypeError:
            return True

    def sent(self, how: str) -> None:
        """A chunk was handed to the executor, its parts sent ``how``."""
        self.full_sends += how == "full"

    def ran_on(self, worker: str) -> None:
        self.results += 1
        self.holders.add(worker)

    def missed(self, worker: str) -> None:
        self.misses += 1
        self.lost += worker in self.holders


def _death(pid: int, exit_code: int, position: int) -> str:
    """``worker process 123 died while running this iteration: killed by SIGKILL (...)``."""
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        how = f"killed by {name}{_SIGNAL_HINTS.get(name, '')}"
    else:
        how = f"exited with code {exit_code}"
    return f"worker process {pid} died while {_STAGES.get(position, 'running this iteration')}: {how}"


_STAGES = {
    LOADING_ARGUMENTS: "unpickling this iteration's arguments",
    SENDING_RESULTS: "pickling this iteration's result",
}
"""What a worker does around an iteration, by the position its slot shows then."""


_SIGNAL_HINTS = {
    "SIGKILL": ": out of memory? (the kernel's OOM killer sends SIGKILL)",
    "SIGSEGV": ": a crash in native code (segmentation fault)",
    "SIGBUS": ": a crash in native code (bus error)",
    "SIGABRT": ": aborted, often a failed assertion in native code",
    "SIGFPE": ": a floating-point exception in native code",
}


def _merge(first: Batch | None, second: Batch) -> Batch:
    if first is None:
        return second
    return Batch(
        [*first.indices, *second.indices],
        first.values + second.values,
        first.failures + second.failures,
        first.seconds + second.seconds,
    )


def _unpicklable(loop: Loop, obj: Any, exc: Exception) -> SerializationError:
    """The error for a loop whose function or keyword arguments (``obj``) cannot be pickled: it
    names the keyword argument that fails, and the part of it or of the function."""
    what, culprit = f"the function {loop.name}", obj
    if obj is loop.broadcast:
        failing = ((name, value) for name, value in obj.items() if pickling_error(value) is not None)
        name, culprit = next(failing, ("", obj))
        what = f"keyword argument {name!r}" if name else "the keyword arguments"
    return unpicklable_error(f"{what} could not be pickled, so no iteration can run", culprit, exc)


def _size(payload: Payload) -> int:
    """Bytes a payload moves: its pickle (inline or in shared memory) and its buffers."""
    in_segment = payload.pickle_span[1] if payload.pickle_span is not None else 0
    return len(payload.data) + in_segment + sum(length for _, length in payload.spans)
