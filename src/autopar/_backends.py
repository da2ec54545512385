"""Turn options into an executor, and keep autopar's own pools warm between calls.

``"process"`` and ``"thread"`` pools live in a locked cache keyed by their configuration, so a
second loop with the same configuration reuses warm workers. They are closed by `shutdown`
and at interpreter exit (the ``atexit`` hook is registered when the first pool is made, so
importing autopar has no effect). An executor the user passes in is used as it is and never
shut down by autopar.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import traceback
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeVar

from autopar import _shared
from autopar._cpus import usable_cpu_count
from autopar._logs import parent_levels
from autopar._main_guard import naming_workers, refuse_while_importing_main
from autopar._options import Options
from autopar._serialize import dumps
from autopar._slots import Running, WorkerSlots, descendants, process_exists
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
    "forget_processes",
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
    through shared memory. ``owned`` executors were made by autopar and may be discarded.
    """

    executor: Executor
    in_process: bool
    owned: bool
    workers: int
    local: bool = False
    slots: WorkerSlots | None = None
    """What each worker runs (autopar's process pools only): lets a crash or timeout be blamed
    on one iteration, and a worker be killed."""

    def kill_worker(self, pid: int, grace: float) -> bool:
        """Stop one worker: SIGTERM, then SIGKILL if it is still there after ``grace`` seconds.
        False when there was nothing to stop: the worker is gone (its slot may still say it
        runs), or the pool is broken and its workers are being stopped anyway."""
        process = _processes_of.get(id(self.executor), {}).get(pid)
        if process is None or process.exitcode is not None or getattr(self.executor, "_broken", False):
            return False
        if not _mark_stopped(id(self.executor), [pid]):
            return False  # the pool is closed and forgotten already
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


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.kill(pid, signum)


SHUTTING_DOWN = (
    "the interpreter is shutting down, so no more iterations can start: a loop in a thread must "
    "end before the main thread does (join that thread), and no loop can start in an atexit handler"
)

_pools: dict[tuple[Any, ...], Executor] = {}
_slots_of: dict[int, WorkerSlots] = {}
_stopped_of: dict[int, set[int]] = {}
"""By pool: the workers a loop stopped on purpose (an iteration past its timeout)."""
_stopped_lock = threading.Lock()


def _mark_stopped(pool: int, pids: Iterable[int]) -> bool:
    """Note workers stopped on purpose, so that no loop on the pool takes them for crashes.
    False when the pool is closed and forgotten already."""
    with _stopped_lock:
        if pool not in _processes_of:
            return False
        _stopped_of.setdefault(pool, set()).update(pids)
        return True


_processes_of: dict[int, dict[int, BaseProcess]] = {}
_pools_lock = threading.RLock()  # making a pool may run the garbage collector, and a __del__ a loop
_pools_pid = os.getpid()
_atexit_registered = False


def acquire(options: Options) -> Backend:
    """The executor for a loop with these (resolved) options."""
    workers = options.workers or 1
    backend = options.backend
    if isinstance(backend, Executor):
        in_process = isinstance(backend, ThreadPoolExecutor | SerialExecutor)
        local = isinstance(backend, ProcessPoolExecutor)
        return Backend(backend, in_process=in_process, owned=False, workers=workers, local=local)
    if backend == "serial":
        _initialize_here(options)
        return Backend(SerialExecutor(), in_process=True, owned=False, workers=1)
    if backend == "thread":
        key: tuple[Any, ...] = ("thread", workers, *_initializer_key(options))
        initializer = None if options.initializer is None else initialize_thread
        initargs = (options.initializer, options.initargs)
        threads = functools.partial(ThreadPoolExecutor, workers, "autopar", initializer, initargs)
        return Backend(_cached(key, threads), True, True, workers)
    key = ("process", workers, options.start_method, *_initializer_key(options), _tasks_per_child(options))
    executor = _cached(key, lambda: _make_process_pool(options, workers))
    return Backend(executor, False, True, workers, local=True, slots=_slots_of.get(id(executor)))


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


def _make_process_pool(options: Options, workers: int) -> ProcessPoolExecutor:
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
    pool = ProcessPoolExecutor if options.max_tasks_per_worker is None else _ReplacingProcessPool
    executor = pool(
        max_workers=workers,
        mp_context=context,
        initializer=initialize_worker,
        initargs=(user_init, blas_threads, slots, os.getpid(), thread_pools, log_levels),
        max_tasks_per_child=_tasks_per_child(options),
    )
    _slots_of[id(executor)] = slots
    # Keep our own reference to the pool's process table: after a crash, concurrent.futures
    # drops it, and the exit codes in it say which worker died first.
    _processes_of[id(executor)] = executor._processes  # type: ignore[assignment]
    return executor


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


MAX_WARM_POOLS = 8
"""Pools kept warm at most; beyond it the least recently used one is closed (a loop that
makes a new ``partial`` initializer at every call would otherwise start pools without end)."""


_hook_pid = os.getpid()
_abandoned: dict[int, deque[int]] = {}
"""By pool: chunks of loops that ended while those chunks ran (the most recent ones)."""


class _Loop(Protocol):
    def pools_in_use(self) -> set[int]: ...

    def give_up(self) -> dict[int, list[int]]: ...


_live_loops: weakref.WeakSet[_Loop] = weakref.WeakSet()
_live_loops_lock = threading.Lock()


def loop_started(loop: _Loop) -> None:
    """A loop runs: at exit, the pools it uses are left alone (stopping a worker breaks the
    whole pool, and the loop could not resend its chunks once the interpreter shuts down)."""
    with _live_loops_lock:
        _live_loops.add(loop)


def loop_ended(loop: _Loop) -> None:
    with _live_loops_lock:
        _live_loops.discard(loop)


def abandon(backend: Backend, chunk_ids: list[int]) -> None:
    """A loop ended early (a failure raised, an imap closed or dropped, Ctrl-C in the code
    that consumed it) while these chunks of its may still run: nobody wants their results."""
    with _stopped_lock:
        if id(backend.executor) in _processes_of:  # not a pool already closed and forgotten
            _abandoned.setdefault(id(backend.executor), deque(maxlen=1024)).extend(chunk_ids)


def _stop_abandoned() -> None:
    """At interpreter exit, before `concurrent.futures` waits for the workers: stop those
    still running an abandoned chunk, or the exit would wait for it to end (an iteration a
    raised failure or Ctrl-C left behind can take minutes). Pools that loops of other
    threads still use are left alone."""
    if os.getpid() != _hook_pid:
        return  # a forked child's exit: the pools are its parent's
    try:
        with _live_loops_lock:
            loops = list(_live_loops)
        in_use = [loop.pools_in_use() for loop in loops]
        busy = set().union(*in_use)
        with _stopped_lock:
            abandoned = {pool: set(chunks) for pool, chunks in _abandoned.items() if pool not in busy}
        for loop, pools in zip(loops, in_use, strict=True):
            if not pools:  # none can go on with it (an imap the main thread left unfinished)
                for pool, left in loop.give_up().items():
                    if pool not in busy:
                        abandoned.setdefault(pool, set()).update(left)
        with _stopped_lock:
            processes = {pool: dict(_processes_of.get(pool, {})) for pool in abandoned}
        for pool, chunks in abandoned.items():
            slots = _slots_of.get(pool)
            if slots is None:
                continue
            for pid, running in slots.snapshot().items():
                process = processes[pool].get(pid)
                if running.chunk_id in chunks and process is not None and process.exitcode is None:
                    _mark_stopped(pool, [pid])  # no crash, for a loop that would still look
                    process.kill()
    except Exception:  # an error here would stop the interpreter from joining its threads
        traceback.print_exc()


def _cached(key: tuple[Any, ...], make: Callable[[], Executor]) -> Executor:
    global _atexit_registered, _pools_pid, _hook_pid
    with _pools_lock:
        if _pools_pid != os.getpid():  # a forked child must not use its parent's pools
            _pools.clear()
            with _stopped_lock:
                for table in (_slots_of, _processes_of, _stopped_of, _abandoned):
                    table.clear()
            _live_loops.clear()
            _pools_pid = _hook_pid = os.getpid()
        executor = _pools.pop(key, None)
        if executor is None:
            if getattr(threading, "_SHUTTING_DOWN", False):  # private; atexit handlers run then
                raise RuntimeError(SHUTTING_DOWN)  # before a pool is started, that nothing would close
            executor = make()
            if not _atexit_registered:
                atexit.register(shutdown)
                # Runs before concurrent.futures' own hook (registered earlier, run later),
                # which waits for running work items. A private API, which that module uses.
                getattr(threading, "_register_atexit", lambda hook: None)(_stop_abandoned)
                _atexit_registered, _hook_pid = True, os.getpid()
            if multiprocessing.parent_process() is not None and _finalizer_pid != os.getpid():
                _close_before_multiprocessing_joins_children()
        made_meanwhile = _pools.pop(key, None)  # by a loop in a __del__ that make() set off
        _pools[key] = executor  # last: the most recently used
        evicted = [_pools.pop(old) for old in list(_pools)[:-MAX_WARM_POOLS]]
        if made_meanwhile is not None and made_meanwhile is not executor:
            evicted.append(made_meanwhile)
    for old_executor in evicted:
        _retire_in_background(old_executor)
    return executor


def retire(executor: Executor) -> None:
    """Take a pool out of the warm ones, to be closed once the loops on it are done (its
    workers' initializer failed: the next loop must start new ones)."""
    _uncache(executor)
    _retire_in_background(executor)


def _uncache(executor: Executor) -> None:
    with _pools_lock:
        for key, cached in list(_pools.items()):
            if cached is executor:
                del _pools[key]


def _retire_in_background(executor: Executor) -> None:
    # In the background: a loop may still run on it (it finishes; that loop's next chunk goes
    # to a new pool, as after shutdown()).
    threading.Thread(target=_retire, args=(executor,), daemon=True).start()


_finalizer_pid = 0


def _close_before_multiprocessing_joins_children() -> None:
    """In a multiprocessing child (an ``mp.Process``, a joblib/loky worker): it ends without
    atexit hooks, after joining its child processes, which would wait forever for our idle
    workers. A finalizer that multiprocessing runs before that join closes our pools: before
    the finalizers of its queues too (priority 10), whose feeder threads carry the pools' stop
    messages."""
    global _finalizer_pid
    multiprocessing.util.Finalize(None, _close_at_child_exit, exitpriority=100)
    _finalizer_pid = os.getpid()


def _close_at_child_exit() -> None:
    _stop_abandoned()  # as at the exit of a main process: not waited for
    shutdown()


def _retire(executor: Executor) -> None:
    _close(executor)
    forget_processes(executor)


def discard(executor: Executor, *, kill: bool = False) -> None:
    """Drop a broken or interrupted pool from the cache and close it.

    With ``kill``, its worker processes are killed first (Ctrl-C: nothing may keep running);
    a thread pool's running iterations cannot be stopped, so it is not waited for.
    """
    _uncache(executor)
    _close(executor, kill=kill, wait=not (kill and isinstance(executor, ThreadPoolExecutor)))


_closing: dict[int, tuple[Executor, threading.Event]] = {}
_closing_lock = threading.Lock()


def _close(executor: Executor, *, kill: bool = False, wait: bool = True) -> None:
    """Shut ``executor`` down exactly once and wait for it (unless not ``wait``); a caller that
    comes while another is closing it waits for that close. (Two concurrent
    ``shutdown(wait=True)`` calls close the same pipe twice, and the second close can hit a
    descriptor a new pool already reuses.)"""
    if threading.current_thread() in getattr(executor, "_threads", ()):  # shutdown() in its iteration
        wait = False  # a thread cannot wait for itself to end
    if kill:  # at once, even while another thread is closing the pool (and waits for them)
        processes = list(_processes_of.get(id(executor), {}).values())
        pids = [p.pid for p in processes if p.pid]
        _mark_stopped(id(executor), pids)
        started = descendants(pids)  # by their iterations: nothing may keep running
        for process in processes:
            process.kill()
        _signal_all(started, signal.SIGKILL)
    with _closing_lock:
        known = _closing.get(id(executor))
        if known is not None and known[0] is executor:
            first, done = False, known[1]
        else:
            first, done = True, threading.Event()
            _closing[id(executor)] = (executor, done)
            for key, (_, closed) in list(_closing.items())[:-16]:
                if closed.is_set():
                    del _closing[key]
    if not first:
        if wait:
            done.wait()
        return
    try:
        executor.shutdown(wait=wait, cancel_futures=True)
    finally:
        done.set()


def forget_processes(executor: Executor) -> None:
    """Drop our references to a closed pool's processes and slots."""
    _slots_of.pop(id(executor), None)
    with _stopped_lock:
        _processes_of.pop(id(executor), None)
        _stopped_of.pop(id(executor), None)
        _abandoned.pop(id(executor), None)


class PostMortem(NamedTuple):
    """What a broken pool's workers were running when it broke, how each one ended, and
    which ones a loop stopped on purpose (timeouts: no crash, whichever loop it broke)."""

    running: dict[int, Running]
    exit_codes: dict[int, int | None]
    stopped: frozenset[int] = frozenset()


class _Report:
    """One pool's post-mortem, made by the first loop that asks, awaited by the others."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = PostMortem({}, {})


_post_mortems: OrderedDict[int, tuple[Executor, _Report]] = OrderedDict()
_post_mortems_lock = threading.Lock()


def post_mortem(backend: Backend) -> PostMortem:
    """Close a broken pool of ours (once) and say what its workers were doing and how they
    ended. Every loop that had chunks on it gets the same answer: each blames the culprits
    among its own chunks and sends the rest again."""
    executor = backend.executor
    with _post_mortems_lock:
        known = _post_mortems.get(id(executor))
        if known is not None and known[0] is executor:
            first, report = False, known[1]
        else:
            first, report = True, _Report()
            _post_mortems[id(executor)] = (executor, report)
            while len(_post_mortems) > 8:
                _post_mortems.popitem(last=False)
    if not first:
        report.done.wait()
        return report.value
    try:
        running = backend.slots.snapshot() if backend.slots is not None else {}
        # Hold on to the process table and the stopped set: a shutdown() closing this pool
        # in another thread forgets them as soon as it is done, maybe before we look.
        processes = _processes_of.get(id(executor), {})
        with _stopped_lock:
            stopped = _stopped_of.setdefault(id(executor), set())
        discard(executor)  # the workers left are stopped and reaped (outside any global lock)
        exit_codes = {pid: process.exitcode for pid, process in processes.items()}
        with _stopped_lock:
            report.value = PostMortem(running, exit_codes, frozenset(stopped))
    except BaseException:
        with _post_mortems_lock:  # interrupted: whoever asks next tries again
            if _post_mortems.get(id(executor), (None, None))[1] is report:
                del _post_mortems[id(executor)]
        raise
    finally:
        forget_processes(executor)
        report.done.set()
    return report.value


def shutdown() -> None:
    """Close every worker pool autopar has started; the next loop starts fresh ones."""
    with _pools_lock:
        executors = list(_pools.values()) if _pools_pid == os.getpid() else []
        _pools.clear()
    with _initialize_lock:
        _initialized_here.clear()
    for executor in executors:
        _close(executor)
        forget_processes(executor)
    with _closing_lock:  # and pools still closing in the background
        closing = [done for _, done in _closing.values()]
    for done in closing:
        done.wait()
    _shared.shutdown()
