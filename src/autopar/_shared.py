"""Large buffers through shared memory: one copy in the parent, views in workers.

`pack` pickles with protocol 5 and takes every large contiguous buffer (a NumPy array's
data, a ``PickleBuffer``) out of the pickle stream into one shared-memory segment, and the
pickle itself too when it is large (a big dict, a closure holding an array); workers
`unpack` it by mapping the segment (read-only for what iterations share, copy-on-write for
an iteration's own arguments), so an array arrives as a view, not a copy, and a chunk
carries only the segment's name. Nothing here imports NumPy: any object that pickles
its data as a ``PickleBuffer`` benefits.

The parent owns every segment: it creates it (registered with multiprocessing's resource
tracker, which removes it even if the parent is killed) and `release`s it when the chunk or
the loop that needed it is over. Workers map segments without registering them, so a worker's
exit never removes a segment the parent still uses.

Fresh segments are slow to fill (the kernel zeroes and maps every page: about 75 ms for
100 MiB), so a released segment no worker can still be reading is kept for reuse, up to
`KEEP_BYTES` in all; `shutdown` removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import mmap
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from autopar._records import Payload
from autopar._serialize import dumps, loads

__all__ = ["KEEP_BYTES", "SHARE_ABOVE", "pack", "release", "segment_prefix", "shutdown", "unpack"]

SHARE_ABOVE = 64 * 1024
"""A buffer at least this large travels through shared memory; smaller ones stay in the pickle."""

KEEP_BYTES = 1 << 30
"""Released segments kept for reuse, in bytes at most."""

_ALIGN = 64
_DEV_SHM = "/dev/shm"
_free: list[SharedMemory] = []
_free_pid = os.getpid()
_free_lock = threading.Lock()
_uses = itertools.count()
_names = itertools.count()
_atexit_registered = False


def pack(obj: Any, *, shared: bool, owner: set[SharedMemory] | None = None) -> tuple[Payload, SharedMemory | None]:
    """Pickle ``obj``; with ``shared``, move its large buffers into a new segment.

    The caller owns the returned segment and must `release` it once workers are done; it is in
    ``owner`` from the moment it exists, so that a Ctrl-C on the way cannot strand it.
    """
    if not shared:
        return Payload(dumps(obj)), None
    buffers: list[memoryview] = []
    data = dumps(obj, buffer_callback=lambda buffer: _keep_in_band(buffer, buffers))
    pieces = buffers + ([memoryview(data)] if len(data) >= SHARE_ABOVE else [])  # a big pickle too
    if not pieces:
        return Payload(data), None
    spans: list[tuple[int, int]] = []
    offset = 0
    for raw in pieces:
        spans.append((offset, raw.nbytes))
        offset += -(-raw.nbytes // _ALIGN) * _ALIGN
    if not _room_for(offset):  # a small /dev/shm (containers): stay in the pickle
        return Payload(dumps(obj)), None
    with _interrupts_deferred():  # created and owned, or neither
        segment = _take(offset)
        if owner is not None:
            owner.add(segment)
    try:
        target = segment.buf
        assert target is not None
        for raw, (start, length) in zip(pieces, spans, strict=True):
            target[start : start + length] = raw
        if len(pieces) > len(buffers):  # the pickle itself is the last piece
            return Payload(b"", segment.name, tuple(spans[:-1]), next(_uses), spans[-1]), segment
        return Payload(data, segment.name, tuple(spans), next(_uses)), segment
    except BaseException:
        release(segment, owner=owner)
        raise


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C off while a segment is created and handed to its owner: landing inside
    SharedMemory(), before the resource tracker knew of it, it left the segment in /dev/shm
    until reboot. Python runs signal handlers in the main thread only: elsewhere there is
    nothing to hold off."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # another thread, or a handler set outside Python
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        raised: BaseException | None = None
        while True:  # signal.signal() first runs pending handlers: one that raises (a SIGALRM
            try:  # timeout's) must not leave Ctrl-C swallowed for good
                signal.signal(signal.SIGINT, previous)
                break
            except BaseException as exc:
                raised = raised or exc
        if received:
            signal.raise_signal(signal.SIGINT)  # to the handler it was meant for, now
        if raised is not None:
            raise raised


def _room_for(size: int) -> bool:
    """Whether a segment of ``size`` bytes leaves /dev/shm at least a quarter free: writing to
    a full tmpfs mapping kills the writer with SIGBUS."""
    try:
        stats = os.statvfs(_DEV_SHM)
    except OSError:
        return True  # no /dev/shm here: SharedMemory uses what the platform has
    return (stats.f_bavail * stats.f_frsize - size) >= stats.f_blocks * stats.f_frsize // 4


def _take(size: int) -> SharedMemory:
    """A segment of at least ``size`` bytes: a kept one not much larger, or a new one."""
    with _free_lock:
        for position, segment in enumerate(_free_here()):
            if size <= segment.size <= 2 * size:
                return _free.pop(position)
    while True:
        try:
            return SharedMemory(name=f"{segment_prefix()}{next(_names)}", create=True, size=size)
        except FileExistsError:  # left by an earlier process that had our pid
            continue


def segment_prefix(pid: int | None = None) -> str:
    """The name every segment this process (or ``pid``) creates starts with."""
    return f"autopar_{pid or os.getpid()}_"


def _keep_in_band(buffer: pickle.PickleBuffer, collected: list[memoryview]) -> bool:
    """The pickler's ``buffer_callback``: True keeps a buffer in the pickle stream."""
    try:
        raw = buffer.raw()
    except BufferError:  # not contiguous: pickle copies it in-band
        return True
    if raw.nbytes < SHARE_ABOVE:
        return True
    collected.append(raw)
    return False


def unpack(payload: Payload, *, private: bool = False) -> Any:
    """Unpickle a payload; buffers in shared memory arrive as views of it: read-only, or,
    ``private``, writable copy-on-write (a page is copied for this process when it is first
    written, never before; no write reaches the segment, the parent or another mapping).
    Arguments, each an iteration's own, are private: libraries that copy a read-only input
    before working (scipy.signal.convolve2d, 72 MB a call) no longer need to. The function
    and broadcast arguments, which iterations share, stay read-only."""
    if payload.segment is None:
        return loads(payload.data)
    view = _map(payload.segment, private)
    data: bytes | memoryview = payload.data
    if payload.pickle_span is not None:
        start, length = payload.pickle_span
        data = view[start : start + length]
    return pickle.loads(data, buffers=[view[start : start + length] for start, length in payload.spans])


def _map(name: str, private: bool) -> memoryview:
    if os.path.isdir(_DEV_SHM):
        fd = os.open(os.path.join(_DEV_SHM, name), os.O_RDONLY)
        try:
            return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ))
        finally:
            os.close(fd)
    # Elsewhere (macOS) attach through SharedMemory, which registers the segment with the
    # resource tracker as if this process owned it: take that back.
    segment = SharedMemory(name=name)
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    assert segment.buf is not None
    return segment.buf.toreadonly()


def release(segment: SharedMemory | None, *, reuse: bool = True, owner: set[SharedMemory] | None = None) -> None:
    """Give back a segment the parent created (and take it out of ``owner``). With ``reuse``
    (no worker can still read it) it may be kept for a later `pack`; otherwise, or when enough
    are kept, it is removed, and views workers still hold stay valid until they drop them."""
    if segment is None:
        return
    global _atexit_registered
    with _interrupts_deferred():  # given back and removed (or kept), or neither
        if owner is not None:
            owner.discard(segment)
        if reuse:
            with _free_lock:
                if sum(kept.size for kept in _free_here()) + segment.size <= _keep_limit():
                    _free.append(segment)
                    if not _atexit_registered:
                        atexit.register(shutdown)
                        _atexit_registered = True
                    return
        _remove(segment)


def _keep_limit() -> int:
    """`KEEP_BYTES`, or a quarter of /dev/shm where it is smaller (64 MiB in a container)."""
    try:
        stats = os.statvfs(_DEV_SHM)
    except OSError:
        return KEEP_BYTES
    return min(KEEP_BYTES, stats.f_blocks * stats.f_frsize // 4)


def _remove(segment: SharedMemory) -> None:
    with contextlib.suppress(BufferError):
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


def _free_here() -> list[SharedMemory]:
    """The kept segments, under ``_free_lock``; none in a forked child. The parent's kept
    segments are the parent's: a child that filled one would overwrite what the parent may be
    sending, and one that removed them at its exit would break the parent's next loop."""
    global _free_pid
    if _free_pid != os.getpid():
        _free.clear()  # dropped, not removed
        _free_pid = os.getpid()
    return _free


def shutdown() -> None:
    """Remove every kept segment."""
    with _free_lock:
        kept = list(_free_here())
        _free.clear()
    for segment in kept:
        _remove(segment)
