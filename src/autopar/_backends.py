"""Turn options into an executor, and keep autopar's own pools warm between calls.

``"process"`` and ``"thread"`` pools live in a locked cache keyed by their configuration, so a
second loop with the same configuration reuses warm workers; each is a `Pool` record, which
the engine reaches through its `Backend`. They are closed by `shutdown` and at interpreter
exit (`_exit` installs the hooks when the first pool is made, so importing autopar has no
effect). An executor the user passes in is used as it is and never shut down by autopar.

Imports, one way: `_engine` imports this module; this module imports `_pool` (the record of
each pool, and the verbs of its end) and `_exit` (what the process's exit does to the pools,
which `_exit.install` hands it as functions: `_exit` does not import this module).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from autopar import _exit, _returns, _shared
from autopar._cpus import usable_cpu_count
from autopar._exit import loop_ended, loop_started
from autopar._logs import parent_levels
from autopar._main_guard import naming_workers, refuse_while_importing_main
from autopar._options import Options
from autopar._pool import Pool, PostMortem
from autopar._serialize import dumps
from autopar._slots import WorkerSlots
from autopar._worker import BLAS_THREAD_VARIABLES, initialize_thread, initialize_worker, thread_pool_controller

__all__ = [
    "MAX_WARM_POOLS",
    "SHUTTING_DOWN",
    "abandon",
    "Backend",
    "PostMortem",
    "SerialExecutor",
    "acquire",
    "discard",
    "retire",
    "loop_ended",
    "loop_started",
    "post_mortem",
    "shutdown",
]

P = ParamSpec("P")
T = TypeVar("T")


class SerialExecutor(Executor):
    """Runs each call at ``submit`` in the calling thread, so a debugger stops inside it."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future


@dataclass(frozen=True)
class Backend:
    """An executor and how the engine must talk to it.

    ``in_process`` backends share memory with the parent: chunks travel as live objects,
    unpickled. ``local`` process backends run on this machine, so large buffers can travel
    through shared memory. A ``pool`` is autopar's own: it may be closed, and its workers
    stopped.
    """

    executor: Executor
    in_process: bool
    workers: int
    local: bool = False
    pool: Pool | None = None
    """autopar's own pool (processes or threads); None for the serial backend and the user's executors."""

    @property
    def owned(self) -> bool:
        """Whether autopar made this executor, and may close it."""
        return self.pool is not None

    @property
    def slots(self) -> WorkerSlots | None:
        """What each worker runs (autopar's process pools only): lets a crash or timeout be
        blamed on one iteration, and a worker be killed."""
        return None if self.pool is None else self.pool.slots

    def kill_worker(self, pid: int, grace: float) -> bool:
        """`Pool.stop_worker` (an iteration past its timeout); False for a pool not ours."""
        return self.pool is not None and self.pool.stop_worker(pid, grace)


SHUTTING_DOWN = (
    "the interpreter is shutting down, so no more iterations can start: a loop in a thread must "
    "end before the main thread does (join that thread), and no loop can start in an atexit handler"
)

MAX_WARM_POOLS = 8
"""Pools kept warm at most; beyond it the least recently used one is closed (a loop that
makes a new ``partial`` initializer at every call would otherwise start pools without end)."""

_warm: dict[tuple[Any, ...], Pool] = {}
"""The pools loops may take, by configuration, the most recently used last."""
_made: weakref.WeakSet[Pool] = weakref.WeakSet()
"""Every pool made here and not yet garbage: warm, or still closing, or still used by a loop."""
_lock = threading.RLock()  # making a pool may run the garbage collector, and a __del__ a loop


def acquire(options: Options) -> Backend:
    """The executor for a loop with these (resolved) options."""
    workers = options.workers or 1
    backend = options.backend
    if isinstance(backend, Executor):
        in_process = isinstance(backend, ThreadPoolExecutor | SerialExecutor)
        local = isinstance(backend, ProcessPoolExecutor)
        return Backend(backend, in_process=in_process, workers=workers, local=local)
    if backend == "serial":
        _initialize_here(options)
        return Backend(SerialExecutor(), in_process=True, workers=1)
    if backend == "thread":
        key: tuple[Any, ...] = ("thread", workers, *_initializer_key(options))
        initializer = None if options.initializer is None else initialize_thread
        initargs = (options.initializer, options.initargs)
        threads = functools.partial(ThreadPoolExecutor, workers, "autopar", initializer, initargs)
        pool = _cached(key, lambda: Pool(threads()))
        return Backend(pool.executor, in_process=True, workers=workers, pool=pool)
    key = ("process", workers, options.start_method, *_initializer_key(options), _tasks_per_child(options))
    pool = _cached(key, lambda: _make_process_pool(options, workers))
    return Backend(pool.executor, in_process=False, workers=workers, local=True, pool=pool)


_initialized_here: set[tuple[Any, ...]] = set()
_initialize_lock = threading.RLock()  # an initializer may itself run a (serial) loop


def _initialize_here(options: Options) -> None:
    """The serial backend's one worker is this process: run the initializer here, once until
    `shutdown`, as a pool runs it once in each new worker (a program that works on processes
    keeps working when switched to ``backend="serial"`` to debug it)."""
    if options.initializer is None:
        return
    key = _initializer_key(options)
    with _initialize_lock:
        if key in _initialized_here:
            return
        _initialized_here.add(key)  # first: a loop the initializer runs must not run it again
        try:
            options.initializer(*options.initargs)
        except BaseException as exc:
            _initialized_here.discard(key)
            exc.add_note("raised by the initializer, which backend='serial' runs in this process")
            raise


class _Same:
    """Stands for an unhashable object in a cache key, by identity (and keeps it alive, so
    that its id is not reused while the key exists)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def _initializer_key(options: Options) -> tuple[Any, Any]:
    """The initializer and its arguments as part of a cache key: pools run their initializer
    once, so a pool serves only loops with the same one. A list or dict among the arguments
    (unhashable) counts by identity, as the object the pool was started with."""

    def hashable(obj: Any) -> Any:
        try:
            hash(obj)
        except TypeError:
            return _Same(obj)
        return obj

    return hashable(options.initializer), tuple(map(hashable, options.initargs))


def _tasks_per_child(options: Options) -> int | None:
    """Chunks a worker runs before it is replaced, so that it runs at most
    ``max_tasks_per_worker`` iterations (chunks are then of a fixed size)."""
    if options.max_tasks_per_worker is None:
        return None
    chunksize = min(options.chunksize or 1, options.max_tasks_per_worker)  # as the engine caps it
    return max(1, options.max_tasks_per_worker // chunksize)


def _make_process_pool(options: Options, workers: int) -> Pool:
    user_init = dumps((options.initializer, options.initargs)) if options.initializer else None
    # What the initializer logs goes with each worker's first chunk, under this process's
    # levels as they are now (a pool serves later loops too).
    log_levels = parent_levels() if options.initializer and options.forward_logging else None
    start_method = options.start_method
    if options.max_tasks_per_worker is not None and start_method is None:
        # concurrent.futures replaces workers only when they are not forked.
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(start_method)
    if context.get_start_method() not in multiprocessing.get_all_start_methods():
        # Another library's default context (joblib's loky, in its workers): the platform's own.
        context = multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])
    refuse_while_importing_main(context.get_start_method())
    context = naming_workers(context)
    blas_threads = _blas_threads(workers)
    thread_pools = None
    if blas_threads is not None and context.get_start_method() == "fork":
        thread_pools = thread_pool_controller()  # forked workers inherit it: no pickling
    slots = WorkerSlots(4 * workers, context)
    _returns.prepare()  # the resource tracker the workers share, before the first one starts
    pool = ProcessPoolExecutor if options.max_tasks_per_worker is None else _ReplacingProcessPool
    executor = pool(
        max_workers=workers,
        mp_context=context,
        initializer=initialize_worker,
        initargs=(user_init, blas_threads, slots, os.getpid(), thread_pools, log_levels),
        max_tasks_per_child=_tasks_per_child(options),
    )
    return Pool(executor, slots)


class _ReplacingProcessPool(ProcessPoolExecutor):
    """A pool whose worker that exited at ``max_tasks_per_child`` is always replaced.

    concurrent.futures before 3.15 may leave it unreplaced (CPython gh-115634): it asks its
    idle-worker semaphore first, which can hold a token from a task finished while a backlog
    was queued, and then the queued chunks wait forever (two threads looping on one such pool
    hung). As in the fix upstream, the manager thread replaces an exited worker whenever the
    pool is short of one.
    """

    def _adjust_process_count(self) -> None:
        manager: object = self._executor_manager_thread
        if threading.current_thread() is manager and len(self._processes) < self._max_workers:  # type: ignore[attr-defined]
            self._spawn_process()  # type: ignore[attr-defined]
        else:
            super()._adjust_process_count()


def _blas_threads(workers: int) -> int | None:
    """Native threads per worker, so that workers x threads fits the CPUs; None when the user
    set a thread count in the environment (they asked for it: keep it)."""
    if any(variable in os.environ for variable in BLAS_THREAD_VARIABLES):
        return None
    return max(1, usable_cpu_count() // workers)


def _cached(key: tuple[Any, ...], make: Callable[[], Pool]) -> Pool:
    """The warm pool for ``key``, made if there is none; the least recently used beyond
    `MAX_WARM_POOLS` is retired."""
    with _lock:
        _forget_if_forked()
        pool = _warm.pop(key, None)
        if pool is None:
            if getattr(threading, "_SHUTTING_DOWN", False):  # private; atexit handlers run then
                raise RuntimeError(SHUTTING_DOWN)  # before a pool is started, that nothing would close
            pool = make()
            _made.add(pool)
            _exit.install(shutdown, _every_pool)
        made_meanwhile = _warm.pop(key, None)  # by a loop in a __del__ that make() set off
        _warm[key] = pool  # last: the most recently used
        evicted = [_warm.pop(old) for old in list(_warm)[:-MAX_WARM_POOLS]]
        if made_meanwhile is not None and made_meanwhile is not pool:
            evicted.append(made_meanwhile)
    for old in evicted:
        old.retire()
    return pool


def _forget_if_forked() -> None:
    """In a child forked since the pools were made (under ``_lock``): they are the parent's,
    not to be used, closed or waited for."""
    if _exit.forked():
        _warm.clear()
        _made.clear()


def _every_pool() -> list[Pool]:
    """The pools whose workers the process's exit may stop."""
    with _lock:
        return list(_made)


def _uncache(pool: Pool) -> None:
    with _lock:
        for key, cached in list(_warm.items()):
            if cached is pool:
                del _warm[key]


# The engine's verbs for a backend's end: autopar's own pool leaves the cache first, so that
# the next loop takes a new one. Nothing to do for the user's executors and the serial one.


def retire(backend: Backend) -> None:
    """Take a pool out of the warm ones, to be closed once the loops on it are done (its
    workers' initializer failed: the next loop must start new ones)."""
    if backend.pool is not None:
        _uncache(backend.pool)
        backend.pool.retire()


def discard(backend: Backend, *, kill: bool = False) -> None:
    """Drop an interrupted pool from the cache and close it; with ``kill``, its workers are
    killed first (Ctrl-C: nothing may keep running)."""
    if backend.pool is not None:
        _uncache(backend.pool)
        backend.pool.close(kill=kill)


def post_mortem(backend: Backend) -> PostMortem:
    """Drop a broken pool from the cache, close it (once), and say what its workers were
    doing and how they ended. Every loop that had chunks on it gets the same answer: each
    blames the culprits among its own chunks and sends the rest again."""
    if backend.pool is None:
        return PostMortem({}, {})
    _uncache(backend.pool)
    return backend.pool.post_mortem()


def abandon(backend: Backend, chunk_ids: Iterable[int]) -> None:
    """`Pool.abandon`: a loop ended early while these chunks of its may still run."""
    if backend.pool is not None:
        backend.pool.abandon(chunk_ids)


def shutdown() -> None:
    """Close every worker pool autopar has started; the next loop starts fresh ones."""
    with _lock:
        _forget_if_forked()
        warm = list(_warm.values())
        _warm.clear()
        others = [pool for pool in _made if pool not in warm]  # retired ones, closing maybe: wait
    with _initialize_lock:
        _initialized_here.clear()
    for pool in warm + others:
        pool.close()
    _shared.shutdown()
    _returns.sweep()  # results of workers that died before they were read
