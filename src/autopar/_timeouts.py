"""``timeout=`` on autopar's own pool: a thread of the loop stops the workers that run one of
its iterations past the deadline, whether or not the consumer is waiting (``imap`` hands
control back between results). The slots say who runs what since when; the pool then breaks,
and `Recovery` blames the overdue iteration, from what this watcher noted before the kill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from autopar._backends import Backend
from autopar._slots import UNTIMED, Running

__all__ = ["TimeoutWatcher"]

_KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for an overdue worker


class _Chunk(Protocol):
    @property
    def chunk_id(self) -> int: ...
    @property
    def backend(self) -> Backend: ...


class TimeoutWatcher:
    """Stops one loop's overdue iterations; remembers what each stopped worker was running.

    ``backend()`` is the pool the loop uses now (a broken one is replaced); ``in_flight``, the
    loop's chunks in flight, by future, read (never changed) from the watching thread. An
    iteration may outlive its loop (``on_error="raise"`` stops at the first failure, an
    ``imap`` may be closed): the watch goes on until none of the loop's chunks runs, so that
    a hung one does not hold its worker, or `shutdown`, forever."""

    def __init__(
        self, timeout: float, name: str, backend: Callable[[], Backend | None], in_flight: Mapping[Future[Any], _Chunk]
    ) -> None:
        self.timeout = timeout
        self._backend = backend
        self._in_flight = in_flight
        self._loop_over = threading.Event()
        # By (pool, pid): a pid alone could name a new worker after the pool is replaced.
        self._overdue: dict[tuple[int, int], Running] = {}
        threading.Thread(target=self._watch, name=f"autopar timeouts of {name}", daemon=True).start()

    def loop_ended(self) -> None:
        self._loop_over.set()

    def stopped_on(self, pool: int) -> dict[int, Running]:
        """By pid, what each worker of ``pool`` (an executor's id) that this watcher stopped
        was running; forgotten here, as the pool is gone."""
        return {pid: self._overdue.pop((at, pid)) for at, pid in list(self._overdue) if at == pool}

    def _watch(self) -> None:
        wait = self.timeout
        while not self._loop_over.wait(wait):
            wait = self._stop_overdue()
        while any(not future.done() for future in list(self._in_flight)):  # one C-level copy
            time.sleep(self._stop_overdue())  # until the next deadline, not a polling interval

    def _stop_overdue(self) -> float:
        """Kill the workers running one of our iterations past the timeout; return how long
        until the next one could be overdue."""
        backend = self._backend()
        if backend is None or backend.slots is None:
            return self.timeout
        timeout_ns = int(self.timeout * 1e9)
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
