"""One pool autopar made, with what it must know of it until its end, and the verbs of that end.

A `Pool` is a process or thread pool of autopar's own. It keeps what concurrent.futures does
not: which worker runs which iteration (the slots), the process table after a crash, the
workers stopped on purpose, the chunks that loops abandoned on it. Its end of life is a few
verbs, each safe to call from any thread, any number of times: `Pool.close` (shut down
exactly once), `Pool.retire` (closed in the background), `Pool.post_mortem` (made once, for
every loop), `Pool.abandon`, `Pool.stop_worker` and, at interpreter exit,
`Pool.stop_abandoned`.

Imports: of autopar's modules only `_slots`. `_backends` (which caches pools) and `_exit`
(which stops their workers at exit) import this module; it knows neither of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.process import BaseProcess
from typing import NamedTuple

from autopar import _returns
from autopar._slots import Running, WorkerSlots, descendants, process_exists

__all__ = ["Pool", "PostMortem"]


class PostMortem(NamedTuple):
    """What a broken pool's workers were running when it broke, how each one ended, and
    which ones a loop stopped on purpose (timeouts: no crash, whichever loop it broke)."""

    running: dict[int, Running]
    exit_codes: dict[int, int | None]
    stopped: frozenset[int] = frozenset()


class Pool:
    """A pool autopar made and closes: its executor, and what autopar knows of it."""

    def __init__(self, executor: Executor, slots: WorkerSlots | None = None) -> None:
        self.executor = executor
        self.slots = slots
        """What each worker runs (process pools): lets a crash or a timeout be blamed on one
        iteration, and a worker be stopped."""
        # Our own reference to the process table: after a crash, concurrent.futures drops it,
        # and the exit codes in it say which worker died first.
        processes = executor._processes if isinstance(executor, ProcessPoolExecutor) else {}
        self._processes: Mapping[int, BaseProcess] = processes
        self._lock = threading.Lock()  # for the fields below
        self._stopped: set[int] = set()  # workers a loop stopped on purpose
        self._abandoned: deque[int] = deque(maxlen=1024)  # chunks of ended loops (the latest)
        self._closing = False
        self._closed = threading.Event()
        self._report: Future[PostMortem] | None = None

    @property
    def closed(self) -> bool:
        """Whether the pool is shut down (its workers reaped, unless it was not waited for)."""
        return self._closed.is_set()

    def close(self, *, kill: bool = False) -> None:
        """Shut the pool down exactly once and wait for it: at `shutdown`, and when it broke or
        was interrupted. A second caller waits for the first. With ``kill`` (Ctrl-C), its
        workers and what they started are killed at once, even while another caller closes it;
        a thread pool's running iterations cannot be stopped, so it is not waited for then."""
        # A thread cannot wait for itself to end: shutdown() called in an iteration of this pool.
        wait = threading.current_thread() not in getattr(self.executor, "_threads", ())
        if kill:
            self._kill_workers()
            wait = wait and not isinstance(self.executor, ThreadPoolExecutor)
        with self._lock:
            first, self._closing = not self._closing, True
        if not first:
            if wait:
                self._closed.wait()
            return
        # Once: two concurrent shutdown(wait=True) calls close the same pipe twice, and the
        # second close can hit a descriptor a new pool already reuses.
        try:
            self.executor.shutdown(wait=wait, cancel_futures=True)
        finally:
            _returns.sweep(list(self._processes))  # results written by workers that died unread
            self._closed.set()

    def retire(self) -> None:
        """Close the pool in the background, once the iterations running on it end: when it
        has left the cache (evicted, or its initializer failed) while a loop may still use it
        (that loop's next chunk goes to a new pool, as after `shutdown`)."""
        threading.Thread(target=self.close, daemon=True).start()

    def post_mortem(self) -> PostMortem:
        """When the pool broke (or was shut down) under a loop: close it, and say what its
        workers were running and how they ended. The first loop that asks makes it; every
        other loop that had chunks on it waits and gets the same answer."""
        with self._lock:
            report, first = self._report, self._report is None
            if report is None:
                report = self._report = Future()
        if not first:
            return report.result()
        try:
            running = self.slots.snapshot() if self.slots is not None else {}
            self.close()  # the workers left are stopped and reaped
            exit_codes = {pid: process.exitcode for pid, process in self._processes.items()}
            with self._lock:
                found = PostMortem(running, exit_codes, frozenset(self._stopped))
        except BaseException:
            with self._lock:  # interrupted: whoever asks next tries again
                if self._report is report:
                    self._report = None
            report.set_result(PostMortem({}, {}))  # those waiting go on, knowing nothing
            raise
        report.set_result(found)
        return found

    def abandon(self, chunk_ids: Iterable[int]) -> None:
        """A loop ended early (a failure raised, an imap closed or dropped, Ctrl-C) while these
        chunks of its may still run: nobody wants their results, and exit need not wait."""
        with self._lock:
            self._abandoned.extend(chunk_ids)

    def stop_worker(self, pid: int, grace: float) -> bool:
        """Stop a worker running an iteration past its timeout: SIGTERM, then SIGKILL if it is
        still there after ``grace`` seconds. False when there was nothing to stop: the worker
        is gone (its slot may still say it runs), or the pool broke and is being closed."""
        process = self._processes.get(pid)
        if process is None or process.exitcode is not None or getattr(self.executor, "_broken", False):
            return False
        self._note_stopped([pid])
        started = descendants([pid])  # by the iteration: they go with it
        process.terminate()
        _signal_all(started, signal.SIGTERM)

        def kill_if_still_there() -> None:
            if process.exitcode is None:  # the pid is not reused before the pool reaps it
                process.kill()
            _signal_all([child for child in started if process_exists(child)], signal.SIGKILL)

        timer = threading.Timer(grace, kill_if_still_there)
        timer.daemon = True
        timer.start()
        return True

    def stop_abandoned(self, chunk_ids: Iterable[int] = ()) -> None:
        """At interpreter exit, before concurrent.futures waits for the workers: kill those
        still running an abandoned chunk (or one of ``chunk_ids``), which it would wait for."""
        if self.slots is None:
            return
        with self._lock:
            chunks = set(self._abandoned).union(chunk_ids)
            processes = dict(self._processes)
        for pid, running in self.slots.snapshot().items():
            process = processes.get(pid)
            if running.chunk_id in chunks and process is not None and process.exitcode is None:
                self._note_stopped([pid])  # no crash, for a loop that would still look
                process.kill()

    def _kill_workers(self) -> None:
        processes = list(self._processes.values())
        pids = [process.pid for process in processes if process.pid]
        self._note_stopped(pids)
        started = descendants(pids)  # by their iterations: nothing may keep running
        for process in processes:
            process.kill()
        _signal_all(started, signal.SIGKILL)

    def _note_stopped(self, pids: Iterable[int]) -> None:
        """Workers stopped on purpose: no loop on the pool takes them for crashes."""
        with self._lock:
            self._stopped.update(pids)


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.kill(pid, signum)
