"""The dispatch engine: the only module that owns futures.

Data flow, and the module that does each step::

    calls (lazy iterator of (index, args))            _Input, here; ChunkSizer (_chunking):
      │  a chunk at a time, as a slot frees up           sizes from measured iteration cost
      ▼
    chunk ── Packer.pack (_sending) ──▶ Chunk(function, broadcast, calls) or a live call
      │        an argument that cannot be pickled fails its own iteration there; large
      │        buffers go to shared memory; to other machines, a large function or broadcast
      │        goes with the first chunks only, later ones name it by key
      ▼
    executor.submit(...)                              at most `plan.window` chunks in flight
      │                                               (`LoopPlan`, _plan)
    in_flight {future: _InFlight} ◀── done callbacks ── SimpleQueue of finished futures
      │   TimeoutWatcher (_timeouts): a thread that kills the worker of an overdue iteration
      │
      ├─ a result, or why there is none ── Outcomes.collect (_outcomes) ── Batch; a failed
      │  iteration with retries left, or a chunk to send again, goes back to `_resend`
      └─ our pool broke (a worker died, or was killed) ── post_mortem (_backends) ──
         Recovery.triage (_recovery): who failed, what to send again to a new pool
      ▼
    Batch(indices, values, failures), in completion order ──▶ _collect (input order, errors)

The input is pulled only when a chunk slot frees up, so memory stays flat for huge or endless
iterables. Closing the generator (the first failure under ``on_error="raise"``) cancels the
chunks that have not started; Ctrl-C also kills autopar's own worker processes.

The collector drives a `Dispatcher` through `batches` and these calls only: `stop_before`
(the first failure under "raise": read no more input), `delivered_up_to` (an ``imap``'s
consumer took results up to there: read ahead only so far), `runs_before`, `interrupt`, and
it reads `counters`, `plan`, `in_process` and `input_error`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import BrokenExecutor, Future
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
from autopar._errors import WorkerCrashed
from autopar._main_guard import raise_if_script_unguarded
from autopar._outcomes import Outcomes
from autopar._plan import Loop, LoopCounters, plan
from autopar._records import Batch, Calls
from autopar._recovery import Recovery
from autopar._sending import Packer, PartsByKey
from autopar._timeouts import TimeoutWatcher

__all__ = ["Dispatcher", "Loop"]

_chunk_ids = itertools.count()  # unique in this process, so that slots name chunks unambiguously
_loop_tokens = itertools.count(1)


class _InFlight(NamedTuple):
    """A chunk submitted and not yet back."""

    chunk_id: int
    calls: Calls
    backend: Backend
    segment: SharedMemory | None
    nbytes: int
    """Its pickled arguments, in bytes."""


class _Input:
    """A loop's calls, read a chunk at a time. A list, tuple or range of single arguments is
    cut into slices: a range slice pickles in a few bytes, a list slice is one copy, instead
    of an iterator step per iteration."""

    def __init__(self, loop: Loop, sizer: ChunkSizer, counters: LoopCounters) -> None:
        arguments = loop.arguments
        self._sequence = arguments if loop.single and isinstance(arguments, list | tuple | range) else None
        self._iterator = iter(arguments)
        self._loop = loop
        self.sizer = sizer
        self._counters = counters
        self.error: Exception | None = None
        """What the input iterator raised: the loop reads no further, finishes what it read
        before, then raises it."""

    def read(self) -> Calls:
        """The next chunk of calls (empty at the end, or once the input raised)."""
        size, start = self.sizer.next_size(), self._counters.consumed
        if self._sequence is not None:
            arguments: Sequence[Any] = self._sequence[start : start + size]
        else:
            arguments = []
            try:
                arguments.extend(itertools.islice(self._iterator, size))  # keeps what came before a raise
            except Exception as exc:
                self.error = exc
        loop = self._loop
        if loop.indices is None or not arguments:
            calls = Calls(arguments, start, single=loop.single)
        else:
            calls = Calls(
                arguments, loop.indices[start], list(loop.indices[start : start + len(arguments)]), loop.single
            )
        self._counters.consumed += len(calls)
        self._counters.chunksize = max(self._counters.chunksize, len(calls))
        return calls


class Dispatcher:
    """Runs one loop: feeds chunks to a backend and yields finished iterations in batches."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.plan = plan(loop.options)
        self.counters = LoopCounters()
        sizer = ChunkSizer(self.plan.fixed_chunksize, self.plan.workers, loop.total)
        self._input = _Input(loop, sizer, self.counters)
        self._backend: Backend | None = acquire(loop.options)
        backend = self._backend
        foreign = not (backend.local or backend.in_process)  # a Dask, loky, MPI... executor
        by_key = PartsByKey(backend.executor, self.plan.workers, self.plan.capacity or self.plan.workers)
        self._packer = Packer(loop, next(_loop_tokens), self.counters, by_key if foreign else None)
        self._resend: deque[Calls] = deque()  # chunks to send again, before new input
        self._recovery = Recovery(loop.options.timeout)
        self._outcomes = Outcomes(
            loop.options.retries,
            backend.in_process,
            self._resend,
            self.counters,
            sizer,
            self._recovery,
            self._packer.by_key,
        )
        self._in_flight: dict[Future[Any], _InFlight] = {}
        self._timeouts: TimeoutWatcher | None = None
        self._stop_at: int | None = None
        self._delivered: int | None = None
        self._driver: threading.Thread | None = None

    # --- what the collector sees ---

    @property
    def in_process(self) -> bool:
        """Iterations run in this process (threads, serial): values come back live."""
        return self._outcomes.in_process

    @property
    def input_error(self) -> Exception | None:
        return self._input.error

    @property
    def delivered(self) -> int | None:
        """How many results an in-order consumer (``imap``) took; None for ``map``."""
        return self._delivered

    def delivered_up_to(self, count: int) -> None:
        """An in-order consumer took the first ``count`` results: read ahead only so far."""
        self._delivered = count

    def stop_before(self, index: int) -> None:
        """The consumer will stop at ``index`` (the first failure under "raise"): read no
        more input, and finish only what comes before it."""
        self._stop_at = index if self._stop_at is None else min(self._stop_at, index)

    def runs_before(self, index: int) -> bool:
        """Whether an iteration earlier than ``index`` is still in flight or to be sent again."""
        chunks = [entry.calls for entry in self._in_flight.values()] + list(self._resend)
        return any(min(chunk.index_list()) < index for chunk in chunks)

    def batches(self) -> Generator[Batch, None, None]:
        """Run the loop, yielding each finished chunk's iterations (completion order)."""
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        in_flight = self._in_flight
        exhausted = False
        self._watch_timeouts()
        loop_started(self)
        try:
            while True:
                self._driver = threading.current_thread()  # whoever resumed the generator
                refill = len(in_flight) <= self.plan.refill_at
                while refill and self._may_send(exhausted):
                    calls = self._resend.popleft() if self._resend else self._input.read()
                    exhausted = exhausted or self._input.error is not None
                    if not calls:
                        exhausted = True
                        break
                    future, refused = self._submit(calls)
                    if future is not None:
                        future.add_done_callback(finished.put)
                    if refused is not None:
                        yield refused
                if not in_flight:
                    if (exhausted or self._stop_at is not None) and not self._resend:
                        if self._input.error is not None:
                            raise self._input.error  # now that what was read before it is done
                        return
                    continue
                future = finished.get()
                if future not in in_flight:
                    continue  # a chunk already sent again
                entry = in_flight.pop(future)
                if self._broke_our_pool(future, entry):
                    yield from self._recover(entry)
                else:
                    self._packer.release(entry.segment)
                    yield self._outcomes.collect(future, entry.calls, entry.nbytes, entry.backend)
        except KeyboardInterrupt:
            self.interrupt()
            raise
        finally:
            self._end()

    def interrupt(self) -> None:
        """Ctrl-C: kill autopar's own pool that this loop runs on, so nothing keeps running."""
        backend = self._backend
        if backend is not None and backend.owned:
            discard(backend, kill=True)
            post_mortem(backend)  # the report for other loops on it: stopped workers, no crash

    # --- what the process's exit sees (autopar._backends) ---

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
                entry.backend.slots.cancel(self._packer.token)  # queued already: skipped
            if entry.backend.owned:
                chunks.setdefault(id(entry.backend.executor), []).append(entry.chunk_id)
        return chunks

    # --- sending ---

    def _may_send(self, exhausted: bool) -> bool:
        """Whether the window has room and there is something to send: for ``imap``, new
        input only while the results waiting for a slow earlier one stay few (memory stays
        bounded behind a slow head)."""
        if len(self._in_flight) >= self.plan.window:
            return False
        if self._resend:
            return True
        if exhausted or self._stop_at is not None:
            return False
        if self._delivered is None or not self._in_flight:
            return True
        ahead = self.counters.consumed - self._delivered
        return ahead < self.plan.window * max(self._input.sizer.size, 1)

    def _submit(self, calls: Calls) -> tuple[Future[Any] | None, Batch | None]:
        """Submit a chunk. Returns its future, and a batch of the calls whose arguments could
        not be pickled (they fail here, alone)."""
        backend = self._backend_or_acquire()
        chunk_id = next(_chunk_ids)
        packed = self._packer.pack(backend, chunk_id, calls)
        refused = None
        if packed.refused is not None:
            refused_calls, failures = packed.refused
            refused = self._outcomes.settle(refused_calls, None, failures, 0.0)
        if not packed.calls:
            return None, refused
        try:
            sent = self._send(backend, packed.call)
        except BaseException:
            self._packer.release(packed.segment)
            raise
        if isinstance(sent, BrokenExecutor):  # a user's executor: its calls fail, the loop goes on
            self._packer.release(packed.segment)
            failed = self._outcomes.fail(
                packed.calls, WorkerCrashed(f"the executor cannot run this iteration: {sent}"), ""
            )
            return None, failed if refused is None else refused.joined(failed)
        future, backend = sent
        if self._packer.by_key is not None:
            self._packer.by_key.sent(packed.sent_as)
        self._in_flight[future] = _InFlight(chunk_id, packed.calls, backend, packed.segment, packed.nbytes)
        return future, refused

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
            running, exit_codes, _ = post_mortem(backend)  # closed once, for every loop on it
            self._forget(backend)
            raise_if_script_unguarded(exit_codes, running)
            backend = self._backend_or_acquire()

    def _backend_or_acquire(self) -> Backend:
        if self._backend is None:
            self._backend = acquire(self.loop.options)
        return self._backend

    def _forget(self, backend: Backend) -> None:
        """A pool that broke: the next submission takes a new one."""
        if self._backend is backend:
            self._backend = None

    # --- a worker died: find out which iteration did it, send the others again ---

    def _broke_our_pool(self, future: Future[Any], entry: _InFlight) -> bool:
        if future.cancelled() or entry.backend.slots is None:
            return False
        return isinstance(future.exception(), BrokenExecutor)

    def _recover(self, first: _InFlight) -> Generator[Batch, None, None]:
        """Our pool broke: every chunk it held is lost. Blame the iteration that killed its
        worker and send every other call again, to a new pool."""
        backend = first.backend
        lost = [first] + [self._in_flight.pop(f) for f, e in list(self._in_flight.items()) if e.backend is backend]
        report = post_mortem(backend)
        self._forget(backend)
        for entry in lost:
            self._packer.release(entry.segment)
        raise_if_script_unguarded(report.exit_codes, report.running)  # no iteration could ever run
        overdue = self._timeouts.stopped_on(id(backend.executor)) if self._timeouts is not None else {}
        triage = self._recovery.triage([(entry.chunk_id, entry.calls) for entry in lost], report, overdue)
        self._resend.extendleft(reversed(triage.resend))
        for calls, failed in triage.failed:
            yield self._outcomes.settle(calls, None, failed, 0.0)

    # --- the loop's end ---

    def _watch_timeouts(self) -> None:
        """With a timeout on autopar's own pool, a thread stops overdue iterations."""
        timeout, backend = self.loop.options.timeout, self._backend
        if timeout is not None and backend is not None and backend.slots is not None:
            self._timeouts = TimeoutWatcher(timeout, self.loop.name, lambda: self._backend, self._in_flight)

    def _end(self) -> None:
        """Whatever ended the loop: chunks that have not started are cancelled, chunks still
        running are abandoned (stopped at exit if need be), segments released, and pools
        whose initializer failed retired (the next loop starts new workers)."""
        loop_ended(self)
        if self._timeouts is not None:
            self._timeouts.loop_ended()
        in_flight = self._in_flight
        for backend in {id(entry.backend): entry.backend for entry in in_flight.values()}.values():
            if backend.slots is not None:
                backend.slots.cancel(self._packer.token)
                abandon(backend, [entry.chunk_id for entry in in_flight.values() if entry.backend is backend])
        for future in in_flight:
            future.cancel()
        self._packer.release_all(chunks_running=bool(in_flight))
        for backend in self._outcomes.failed_setup.values():
            retire(backend)
