"""What each worker of a process pool is running, in shared memory: the acknowledgement
that lets the parent blame a crash or a timeout on one iteration.

`concurrent.futures` cannot tell which task killed a pool. Here every worker claims a slot
when it starts and, before each iteration, writes which chunk and which position it is
running and since when (a few tens of nanoseconds). When a worker dies, or runs past the
timeout, the parent reads the slots to see what it was doing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from multiprocessing.context import BaseContext
from typing import Any, NamedTuple

__all__ = [
    "IDLE",
    "LOADING_ARGUMENTS",
    "SENDING_RESULTS",
    "UNTIMED",
    "Running",
    "WorkerSlots",
    "descendants",
    "process_exists",
]

IDLE = -1
"""Chunk id of a worker between chunks (chunk ids count up from 0)."""
LOADING_ARGUMENTS = -1
"""Position of a worker that is unpickling its chunk's arguments (positions count up from 0;
this is another field than the chunk id, so sharing the value -1 with `IDLE` is harmless)."""
SENDING_RESULTS = -2
"""Position of a worker that is pickling its chunk's results and exceptions."""

UNTIMED = 0
"""Start time of a stage no timeout applies to."""

_FIELDS = 4  # pid, chunk id, position, started (monotonic ns, the same clock in every process)
_CANCELLED = 16  # a ring of the last loops stopped early: their queued chunks are skipped


class Running(NamedTuple):
    """What one worker is doing: a position in a chunk (or a stage), since a monotonic time."""

    chunk_id: int
    position: int
    started_ns: int


class WorkerSlots:
    """One slot per worker process of a pool, in shared memory."""

    def __init__(self, count: int, context: BaseContext) -> None:
        self._array: Any = context.RawArray("q", count * _FIELDS + _CANCELLED + 1)
        self._lock: Any = context.Lock()
        self._count = count
        self._view: memoryview | None = None
        self._base = 0

    def __getstate__(self) -> dict[str, Any]:  # travels to workers when they are started
        return {"_array": self._array, "_lock": self._lock, "_count": self._count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _view=None, _base=0)

    # --- in the worker ---

    def claim(self) -> None:
        """Take a free slot for this process (one whose owner is gone, if none is unused)."""
        view = memoryview(self._array).cast("B").cast("q")
        with self._lock:
            for slot in range(self._count):
                owner = view[slot * _FIELDS]
                if owner == 0 or not process_exists(owner):
                    break
            else:
                return  # more workers than slots: this one goes unobserved
            base = slot * _FIELDS
            view[base : base + _FIELDS] = memoryview(bytearray(8 * _FIELDS)).cast("q")
            view[base] = os.getpid()
            view[base + 1] = IDLE
        self._view, self._base = view, base

    def running(self, chunk_id: int, position: int, *, timed: bool = True) -> None:
        """Record that this worker now runs ``position`` of chunk ``chunk_id``; ``timed=False``
        leaves it off the timeout's clock (a fresh worker importing the function's module)."""
        view = self._view
        if view is not None:
            base = self._base
            view[base + 3] = time.monotonic_ns() if timed else UNTIMED
            view[base + 2] = position
            view[base + 1] = chunk_id

    def position_writer(self) -> tuple[memoryview, int] | None:
        """Where the run loop writes the position it starts (``view[index] = position``),
        inline: a method call per iteration would cost more than a tiny iteration's tenth."""
        return None if self._view is None else (self._view, self._base + 2)

    def idle(self) -> None:
        if self._view is not None:
            self._view[self._base + 1] = IDLE

    def cancelled(self, loop_token: int) -> bool:
        """Whether the loop this chunk belongs to has stopped: skip it without running it."""
        view = self._view
        if view is None:
            return False
        start = self._count * _FIELDS
        return loop_token in view[start : start + _CANCELLED].tolist()

    # --- in the parent ---

    def cancel(self, loop_token: int) -> None:
        """Tell the workers that a loop has stopped (on_error="raise", a closed imap): its
        chunks still queued inside the executor, where ``Future.cancel`` cannot reach, are
        skipped rather than run."""
        view = memoryview(self._array).cast("B").cast("q")
        start = self._count * _FIELDS
        with self._lock:
            at = view[start + _CANCELLED]
            view[start + at] = loop_token
            view[start + _CANCELLED] = (at + 1) % _CANCELLED

    def snapshot(self) -> dict[int, Running]:
        """What every worker with a slot is running now, by pid (idle workers left out)."""
        view = memoryview(self._array).cast("B").cast("q")
        found: dict[int, Running] = {}
        for base in range(0, self._count * _FIELDS, _FIELDS):
            pid, chunk_id, position, started = view[base : base + _FIELDS].tolist()
            if pid and chunk_id != IDLE:
                found[pid] = Running(chunk_id, position, started)
        return found


def process_exists(pid: int) -> bool:
    """True while ``pid`` runs; a killed process its own parent has not reaped yet is a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return True  # no /proc here: trust kill()


def descendants(pids: Iterable[int]) -> list[int]:
    """The processes these started (an iteration's subprocess, say), and theirs: stopping a
    worker must not leave them running, re-parented to init. Read from /proc (Linux); none
    where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rpartition(b")")[2].split()  # after the name, which may hold ")"
            except OSError:
                continue  # ended meanwhile
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
