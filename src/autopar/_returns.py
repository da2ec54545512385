"""Large results back through shared memory: the way home for arrays, not the pipe.

A worker of autopar's own process pool pickles a chunk's results with every contiguous buffer
of at least `SHARE_ABOVE` bytes (a NumPy array's data, any ``PickleBuffer``) left out of the
pickles, and writes those buffers into one new file in /dev/shm, each from a page boundary
(by ``write``, not a mapping: a full /dev/shm is an error to fall back from, not a SIGBUS;
with less than a quarter of it free, results stay in the pickles, as arguments do). The
chunk's result carries the file's name and the pickles; small results travel as before.
Through the pipe, 200 results of 1 MiB took 0.46 s on 2 cores; this way 0.24 s (serial 0.30).

Who owns a segment, from first to last:

- The worker names it with the *parent's* prefix, ``autopar_<parent>_r<worker>_<n>``, and
  registers it with multiprocessing's resource tracker *before* creating it. A pool's
  workers share the parent's tracker (inherited under fork, passed to the child under spawn
  and forkserver; `prepare` starts it before the pool's first worker exists): if every process
  dies, the tracker removes the segment.
- The parent claims it while *unpickling* the result, in the executor's thread that reads
  results (`claim`, the ``__reduce__`` of `Returned`): it opens the file, unlinks it and
  unregisters it, then maps each buffer on its own, private copy-on-write (no copy: reading a
  page maps the worker's; writing one copies it for this process alone, and a process forked
  later gets its own copy, as with any memory). All this happens before the result reaches a
  future, so a result nobody collects (Ctrl-C, an abandoned ``imap``, a loop that raised)
  leaves nothing behind. The file has no name any more: an array the user keeps is writable,
  outlives the loop and `autopar.shutdown()`, and its pages go when it does (until then they
  count as /dev/shm's, like a kept segment's). `claim` never raises (that would break the
  pool): a segment already gone fails the chunk's iterations instead.
- A worker that dies after writing, before its result is read, leaves a segment no one will
  claim: `sweep` removes the segments of a pool's workers when the pool is closed (broken,
  interrupted or shut down), and every segment of this process at `autopar.shutdown()` and at
  exit. A parent killed outright leaves them to the tracker, which removes them once the
  workers (which exit with their parent) are gone too.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import mmap
import os
from collections.abc import Iterable, Sequence
from multiprocessing import resource_tracker
from typing import Any

from autopar._errors import SerializationError
from autopar._records import Calls, ChunkResult, Failed, WireError
from autopar._serialize import OutOfBand, decode_values, describe, encode_values
from autopar._shared import SHARE_ABOVE, _room_for, segment_prefix

__all__ = ["Received", "Returned", "claim", "decode", "enable", "encode", "prepare", "sweep"]

_DEV_SHM = "/dev/shm"
_IOV_MAX = 1024
_PAGE = mmap.PAGESIZE
_PADDING = memoryview(bytes(_PAGE))
_parent: int | None = None
"""In a worker of autopar's pool that shares its parent's resource tracker: the parent's pid."""
_count = 0
_exit_sweep_for: int | None = None


def prepare() -> None:
    """In the parent, before a process pool starts: the resource tracker its workers will
    share, and the sweep of what is left of results at exit."""
    global _exit_sweep_for
    if not os.path.isdir(_DEV_SHM):
        return
    resource_tracker.ensure_running()
    if _exit_sweep_for != os.getpid():
        _exit_sweep_for = os.getpid()
        atexit.register(sweep)


def enable(parent: int) -> None:
    """In a new worker of autopar's pool: send large results to ``parent`` through shared
    memory, if this worker shares its resource tracker (else a crash could strand them)."""
    global _parent
    if os.path.isdir(_DEV_SHM) and getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
        _parent = parent


class Returned:
    """A chunk's large buffers, written to a segment; unpickled in the parent, it claims them."""

    __slots__ = ("counts", "lengths", "name")

    def __init__(self, name: str, lengths: tuple[int, ...], counts: tuple[int, ...] | None) -> None:
        self.name, self.lengths, self.counts = name, lengths, counts

    def __reduce__(self) -> tuple[Any, ...]:
        return claim, (self.name, self.lengths, self.counts)


class Received:
    """A chunk's large buffers, in the parent: fresh memory, the segment already gone."""

    __slots__ = ("buffers", "counts", "error", "nbytes")

    def __init__(
        self, buffers: list[mmap.mmap], counts: tuple[int, ...] | None, nbytes: int, error: str | None = None
    ) -> None:
        self.buffers, self.counts, self.nbytes, self.error = buffers, counts, nbytes, error


def encode(values: list[Any], calls: Calls, errors: dict[int, WireError]) -> tuple[bytes | list[bytes], Any]:
    """In a worker: the results' pickles, and the `Returned` that carries their large buffers
    (None when they have none, or when they travel in the pickles: not autopar's pool, or no
    room in /dev/shm)."""
    if _parent is None:
        return encode_values(values, calls, errors), None
    out = OutOfBand(SHARE_ABOVE)
    blobs = encode_values(values, calls, errors, out)
    if not out.buffers:
        return blobs, None
    returned = _write(out)
    if returned is None:  # no room: in the pickles, as before
        return encode_values(values, calls, errors), None
    return blobs, returned


def _write(out: OutOfBand) -> Returned | None:
    global _count
    assert _parent is not None
    lengths = tuple(buffer.nbytes for buffer in out.buffers)
    if not _room_for(sum(lengths)):
        return None
    for _ in range(100):
        _count += 1
        name = f"{segment_prefix(_parent)}r{os.getpid()}_{_count}"
        # Registered before it exists: killed at any point from here, the tracker has it.
        resource_tracker.register("/" + name, "shared_memory")
        try:
            fd = os.open(os.path.join(_DEV_SHM, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:  # left by an earlier worker that had our pid
            resource_tracker.unregister("/" + name, "shared_memory")
            continue
        except OSError:
            resource_tracker.unregister("/" + name, "shared_memory")
            return None
        try:
            _write_aligned(fd, out.buffers)
        except OSError:  # /dev/shm filled up meanwhile (ENOSPC): the pipe
            _forget(name)
            return None
        finally:
            os.close(fd)
        return Returned(name, lengths, None if out.counts is None else tuple(out.counts))
    return None


def _write_aligned(fd: int, buffers: list[memoryview]) -> None:
    """Write ``buffers`` one after the other, each from a page boundary (for the parent to
    map each on its own), however short each ``os.writev`` comes back."""
    views: list[memoryview] = []
    for buffer in buffers:
        views.append(buffer)  # PickleBuffer.raw(): contiguous bytes
        if buffer.nbytes % _PAGE:
            views.append(_PADDING[: _PAGE - buffer.nbytes % _PAGE])
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        if done <= 0:
            raise OSError("nothing written to the shared-memory segment")
        while done and views:
            if done >= views[0].nbytes:
                done -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][done:]
                done = 0


def claim(name: str, lengths: tuple[int, ...], counts: tuple[int, ...] | None) -> Received:
    """In the parent, as the result is unpickled: the buffers, each mapped on its own, the
    segment's name removed. Never raises (the thread that reads results would mark the pool
    broken)."""
    nbytes = sum(lengths)
    try:
        fd = os.open(os.path.join(_DEV_SHM, name), os.O_RDONLY)
    except Exception as exc:
        return Received([], counts, nbytes, describe(exc))
    try:
        _forget(name)  # the open descriptor keeps the data; each mapping, its own pages
        buffers: list[mmap.mmap] = []
        offset = 0
        for length in lengths:
            buffers.append(mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset))
            offset += -(-length // _PAGE) * _PAGE
        return Received(buffers, counts, nbytes)
    except Exception as exc:
        return Received([], counts, nbytes, describe(exc))
    finally:
        os.close(fd)


def _forget(name: str) -> None:
    """Remove a segment and tell the tracker, once: whoever removes it unregisters it."""
    try:
        os.unlink(os.path.join(_DEV_SHM, name))
    except FileNotFoundError:
        return
    with contextlib.suppress(Exception):
        resource_tracker.unregister("/" + name, "shared_memory")


def decode(result: ChunkResult, calls: Calls) -> tuple[list[Any], dict[int, Failed], int]:
    """In the parent: a chunk's values, its iterations that failed to come back (by
    position), and the bytes that came back (pickles and shared memory)."""
    blobs = result.values
    nbytes = len(blobs) if isinstance(blobs, bytes) else sum(map(len, blobs))
    received = result.returned
    if not isinstance(received, Received):
        return (*decode_values(blobs, calls), nbytes)
    nbytes += received.nbytes
    if received.error is not None:
        lost = SerializationError(f"the results of this chunk were lost on their way back: {received.error}")
        return [None] * len(calls), {p: Failed(i, copy.copy(lost)) for p, i in enumerate(calls.index_list())}, nbytes
    return (*decode_values(blobs, calls, received.buffers, received.counts), nbytes)


def sweep(pids: Iterable[int] | None = None) -> None:
    """Remove the result segments left for this process by the workers ``pids`` (by every
    worker when None): results whose worker died before they were read."""
    prefix = f"{segment_prefix()}r"
    wanted: Sequence[str] | None = None if pids is None else [f"{pid}_" for pid in pids]
    if wanted is not None and not wanted:
        return
    try:
        names = os.listdir(_DEV_SHM)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and (wanted is None or name[len(prefix) :].startswith(tuple(wanted))):
            _forget(name)
