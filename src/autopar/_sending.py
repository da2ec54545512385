"""What a loop's chunks carry, and the shared memory they use.

For in-process backends a chunk is the call itself, live objects. For the others it is a
`Chunk`: the function and broadcast keyword arguments, pickled once per loop (what is large
goes to shared memory once, for every worker to map, and chunks carry only its name), and the
chunk's calls, pickled per chunk (an argument that cannot be pickled fails its own iteration
here, not the chunk). To an executor autopar shares no memory with (Dask, loky, MPI), a large
function or broadcast goes with the first chunks only; later ones name it by key.

The `Packer` owns every segment the loop creates, from creation to release: ``pack`` adds a
segment to its set at once, so a Ctrl-C landing on the way to the chunk's bookkeeping leaves
none to no one.
"""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections.abc import Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from autopar._backends import Backend
from autopar._culprit import pickling_error, unpicklable_error
from autopar._errors import SerializationError
from autopar._logs import index_records, parent_levels
from autopar._plan import Loop, LoopCounters
from autopar._records import BY_KEY, Calls, Chunk, Failed, Payload, Settings
from autopar._serialize import digest, split_unpicklable
from autopar._shared import SHARE_ABOVE, pack, release
from autopar._worker import run_calls, run_chunk

__all__ = ["Packed", "Packer"]


@dataclass(frozen=True)
class Packed:
    """One chunk, ready to submit: ``executor.submit(*call)``. ``calls`` are those it carries;
    ``refused``, those whose arguments could not be pickled (they fail here, alone)."""

    call: tuple[Any, ...]
    calls: Calls
    refused: tuple[Calls, dict[int, Failed]] | None
    segment: SharedMemory | None = None
    nbytes: int = 0
    """The pickled arguments, in bytes."""
    sent_as: str = ""
    """How the function and broadcast went: "full", "key", or "" (nothing large)."""


class Packer:
    """Packs one loop's chunks for its backends, and owns the segments it makes for them."""

    def __init__(self, loop: Loop, token: int, counters: LoopCounters, by_key: PartsByKey | None) -> None:
        self.loop = loop
        self.token = token
        """A small number naming the loop, for workers to skip the chunks of a stopped loop."""
        self.by_key = by_key
        self._counters = counters
        self._loop_id = uuid.uuid4().hex
        self._wire: tuple[str, Payload, str, Payload] | None = None
        options = loop.options
        if options.forward_logging:
            index_records()  # again, if the program replaced the record factory since import
        self.settings = Settings(
            options.timeout,
            options.seed,
            loop.keywords,
            isinstance(options.backend, ProcessPoolExecutor),  # one chunk at a time per process
            options.capture_output,
            parent_levels() if options.forward_logging else None,
        )
        """How the workers run each call: the same for every chunk."""
        self._loop_segments: set[SharedMemory] = set()  # the function and broadcast arguments
        self._chunk_segments: set[SharedMemory] = set()

    def pack(self, backend: Backend, chunk_id: int, calls: Calls) -> Packed:
        """The submission of ``calls`` as chunk ``chunk_id`` to ``backend``."""
        loop, options = self.loop, self.loop.options
        if backend.in_process:
            serial = options.backend == "serial"
            return Packed((run_calls, loop.function, calls, loop.broadcast, self.settings, serial), calls, None)
        # The function and keyword arguments first: if they cannot be pickled, no chunk ever
        # can, and no segment of this chunk is left behind.
        function_key, function, broadcast_key, broadcast = self._wire_parts(backend)
        sent_as = ""
        if self.by_key is not None:
            function, broadcast, sent_as = self.by_key.choose(function, broadcast)
        started = time.perf_counter()
        refused = None
        try:
            payload, segment = pack(calls, shared=backend.local, owner=self._chunk_segments)
        except Exception:
            good, failed = split_unpicklable(calls)
            arguments = dict(calls)
            refused = Calls.of((f.index, arguments[f.index]) for f in failed), dict(enumerate(failed))
            calls = Calls.of(good)
            if not calls:
                return Packed((), calls, refused)
            payload, segment = pack(calls, shared=backend.local, owner=self._chunk_segments)
        self._counters.pickle_seconds += time.perf_counter() - started
        nbytes = _size(payload)
        self._counters.bytes_sent += nbytes + len(function.data) + len(broadcast.data)
        task = Chunk(
            self._loop_id,
            chunk_id,
            function_key,
            function,
            broadcast_key,
            broadcast,
            payload,
            self.settings,
            self.token,
        )
        return Packed((run_chunk, task), calls, refused, segment, nbytes, sent_as)

    def release(self, segment: SharedMemory | None, *, reuse: bool = True) -> None:
        """A chunk is done with its segment (none: nothing to do)."""
        release(segment, reuse=reuse, owner=self._chunk_segments)

    def release_all(self, *, chunks_running: bool) -> None:
        """The loop is over. A chunk still running may read its segments: those are removed,
        not kept for reuse."""
        for segment in list(self._chunk_segments):  # in flight, or caught by Ctrl-C on the way
            self.release(segment, reuse=False)
        for segment in list(self._loop_segments):
            release(segment, reuse=not chunks_running, owner=self._loop_segments)

    def _wire_parts(self, backend: Backend) -> tuple[str, Payload, str, Payload]:
        """The function and broadcast arguments, pickled once per loop.

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
                self._counters.bytes_sent += _size(payload) - len(payload.data)  # inline data: per chunk
                key = f"{payload.segment}:{payload.use}" if payload.segment else digest(payload.data)
                parts += [key, payload]
            self._wire = (parts[0], parts[1], f"{self._loop_id}:{parts[2]}", parts[3])
        return self._wire


_new_worker_per_task: weakref.WeakSet[Executor] = weakref.WeakSet()
"""Executors seen to run each task in a new worker process: sending by key cannot pay there."""


class PartsByKey:
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


def _unpicklable(loop: Loop, obj: Any, exc: Exception) -> SerializationError:
    """The error for a loop whose function or keyword arguments (``obj``) cannot be pickled: it
    names the keyword argument that fails, and the part of it or of the function."""
    what, culprit = f"the function {loop.name}", obj
    if obj is loop.broadcast:
        failing: Iterable[tuple[str, Any]] = (
            (name, value) for name, value in obj.items() if pickling_error(value) is not None
        )
        name, culprit = next(iter(failing), ("", obj))
        what = f"keyword argument {name!r}" if name else "the keyword arguments"
    return unpicklable_error(f"{what} could not be pickled, so no iteration can run", culprit, exc)


def _size(payload: Payload) -> int:
    """Bytes a payload moves: its pickle (inline or in shared memory) and its buffers."""
    in_segment = payload.pickle_span[1] if payload.pickle_span is not None else 0
    return len(payload.data) + in_segment + sum(length for _, length in payload.spans)
