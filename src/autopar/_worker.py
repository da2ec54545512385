"""The code that runs in the worker: one chunk of iterations, each in its own ``try``.

This module is imported in every worker process, so it stays light and knows nothing of
executors or futures. `run_chunk` is the single entry point that every out-of-process backend
receives; `run_calls` is the same loop for in-process backends (threads, serial), which need
no pickling and keep the live exception and its traceback.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import select
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from autopar import _logs, _returns
from autopar._capture import Observer
from autopar._errors import ChunkArgumentsError, IterationTimeout, NotCachedHere
from autopar._random import fresh_worker_streams, seeded_chunk
from autopar._records import BY_KEY, Calls, Chunk, ChunkResult, Failed, IterationOutput, Payload, Settings, WireError
from autopar._serialize import (
    describe,
    encode_error,
    encode_values,
    format_worker_traceback,
    loads,
    stage_error,
)
from autopar._shared import unpack
from autopar._slots import LOADING_ARGUMENTS, SENDING_RESULTS, WorkerSlots, process_exists

__all__ = [
    "BLAS_THREAD_VARIABLES",
    "in_iteration",
    "in_shipped_iteration",
    "in_worker_process",
    "initialize_thread",
    "initialize_worker",
    "run_calls",
    "run_chunk",
    "thread_pool_controller",
]


class _Cache(OrderedDict[str, Any]):
    """What a worker keeps between chunks, least recently used first, ``limit`` at most."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit


_functions = _Cache(16)  # by content: warm for later loops
_broadcasts = _Cache(2)  # by loop: a finished loop's (maybe a big array) must not linger
_shared = _Cache(2)  # anything viewing shared memory keeps its segment mapped
_cache_lock = threading.Lock()
_local = threading.local()
_is_worker_process = False
_slots: WorkerSlots | None = None
_initialized_globals: dict[Any, tuple[dict[str, Any], list[str]]] = {}
"""By module name: the initializer's globals, and the names it assigned in them."""
_initializer_failed: WireError | None = None
"""What the user's initializer raised in this worker, if it did."""
_identity = uuid.uuid4().hex
"""This process's name on every result: unique across machines, and new after a fork."""


def _new_identity() -> None:
    global _identity
    _identity = uuid.uuid4().hex


os.register_at_fork(after_in_child=_new_identity)


BLAS_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def initialize_worker(
    user_initializer: bytes | None = None,
    blas_threads: int | None = None,
    slots: WorkerSlots | None = None,
    parent: int | None = None,
    thread_pools: Any = None,
    log_levels: _logs.Levels | None = None,
) -> None:
    """Run once in each new worker process: the parent owns Ctrl-C, loops nest serially, the
    worker exits with its parent, claims its progress slot, caps BLAS/OpenMP pools at
    ``blas_threads`` (so that workers x threads does not exceed the CPUs), and the user's
    ``initializer(*initargs)`` (cloudpickled, so a lambda works) runs last. ``parent`` is the
    process that made the pool (under forkserver, not this worker's parent process);
    ``thread_pools``, a forked worker's inherited `thread_pool_controller`. ``log_levels``
    (``forward_logging``): the parent's, under which what the initializer logs is kept and
    sent with the worker's first chunk."""
    global _is_worker_process, _slots
    _is_worker_process = True
    if slots is not None:
        slots.claim()
        _slots = slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fresh_worker_streams()
    # A SIGTERM handler inherited from the parent by fork (sys.exit in it, say) would turn the
    # stop of an overdue iteration into that iteration's own exception, raised in the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A bare thread: threading.Thread.start() waits until the new thread runs, which cost a
    # cold start 1-5 ms per worker on a busy machine. The watchdog only ever exits the process.
    _thread.start_new_thread(_exit_with_parent, (parent or os.getppid(),))
    _returns.enable(parent or os.getppid())
    if blas_threads is not None:
        _cap_thread_pools(blas_threads, thread_pools)
    if user_initializer is not None:
        if log_levels is not None:
            _logs.begin_setup(log_levels)
        try:
            initializer, initargs = loads(user_initializer)
            _run_initializer(initializer, initargs)
        except BaseException as exc:  # sys.exit() too
            # Raised, it would end this worker and break the pool, again and again, hiding
            # why: the worker stays, and each iteration it is given fails with this (the
            # engine then retires the pool, so the next loop's workers try again).
            global _initializer_failed
            _initializer_failed = encode_error(*_setup_failure(exc, f"worker process {os.getpid()}"))
        finally:
            if log_levels is not None:
                _logs.end_setup()


def _setup_failure(exc: BaseException, where: str) -> tuple[BaseException, str]:
    """What the initializer raised, noted as such, and its traceback: each iteration this
    worker (``where``) is given fails with it."""
    exc.add_note(f"in the initializer, in {where}: the iteration did not run")
    return exc, format_worker_traceback(exc)


def _run_initializer(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    """Run the user's initializer and note which globals of its module it assigned.

    A function from a script's ``__main__`` travels by value, with its own copy of the
    globals it reads, taken in the parent: without this, ``MODEL = load()`` in the
    initializer would stay invisible to a loop function that reads ``MODEL`` (its copy says
    ``None``), where with plain multiprocessing both share the module. See `_callable_here`.
    """
    namespace = _globals_of(initializer)
    before = dict(namespace) if namespace is not None else {}
    initializer(*initargs)
    if namespace is not None:
        assigned = [name for name, value in namespace.items() if name not in before or before[name] is not value]
        if assigned:
            _initialized_globals[namespace.get("__name__")] = (namespace, assigned)


def _globals_of(callable_: Any) -> dict[str, Any] | None:
    """The module globals a callable's code runs with: a function's (or a method's), a
    partial's function's, a callable object's ``__call__``'s."""
    while isinstance(callable_, functools.partial):
        callable_ = callable_.func
    namespace = getattr(callable_, "__globals__", None)
    if namespace is None:
        methods = (vars(cls).get("__call__") for cls in type(callable_).__mro__)  # a callable object
        namespace = getattr(next((m for m in methods if m is not None), None), "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


def _callable_here(loop_function: Any) -> Any:
    """What a worker calls for a loop function it has just unpickled: the bare function,
    given the globals its module's initializer assigned in this worker (when it travelled by
    value, with its own copy of the module's globals)."""
    function = getattr(loop_function, "_autopar_unwrapped", loop_function)
    namespace = _globals_of(function)
    if namespace is not None:
        source, names = _initialized_globals.get(namespace.get("__name__"), (namespace, []))
        if source is not namespace:
            for name in names:
                namespace[name] = source[name]
    return function


def thread_pool_controller() -> Any:
    """threadpoolctl's handle on the native thread pools (BLAS, OpenMP) loaded in this
    process, or None without threadpoolctl. Made in the parent when it forks a pool, so that
    each worker inherits it instead of scanning its libraries again (~3 ms per worker, at every
    cold start)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _cap_thread_pools(threads: int, controller: Any = None) -> None:
    """Cap native thread pools: the variables for libraries loaded later, threadpoolctl (when
    installed) for those already loaded, as under fork after the parent imported NumPy."""
    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if controller is None:
        controller = thread_pool_controller()
    if controller is None:
        return
    controller.limit(limits=threads)
    for library in controller.lib_controllers:
        # Setting OpenBLAS's thread count starts its thread pool (after a fork, the pool is
        # gone), and idle pool threads spin for ~100 ms: a cold pool of 2 workers lost 200 ms
        # of CPU to them. Stop the pool again; OpenBLAS restarts it when a call needs threads.
        stop_pool = getattr(getattr(library, "dynlib", None), "blas_thread_shutdown_", None)
        if library.internal_api == "openblas" and stop_pool is not None:
            stop_pool()


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Exit when the process that made the pool is gone (killed outright, it could not stop
    us): nothing is left orphaned. Pipes cannot tell: sibling workers hold them open too, and
    under forkserver every worker holds the fork server's own lifeline. Linux tells through a
    pidfd, which becomes readable when the process ends; elsewhere, look every ``interval``."""
    try:
        poller = select.poll()
        poller.register(os.pidfd_open(parent), select.POLLIN)  # poll: any fd number works
        poller.poll()
    except (AttributeError, OSError, ValueError):
        parent_of_this_process = os.getppid()
        while os.getppid() == parent_of_this_process and process_exists(parent):
            time.sleep(interval)
    os._exit(1)


def in_worker_process() -> bool:
    """True inside one of autopar's worker processes."""
    return _is_worker_process


def in_iteration() -> bool:
    """True while this thread runs an iteration of a loop (in any process)."""
    return getattr(_local, "depth", 0) > 0


def in_shipped_iteration() -> bool:
    """True while this thread runs an iteration sent to it as a `Chunk` (by any executor)."""
    return getattr(_local, "shipped", 0) > 0


def run_chunk(chunk: Chunk) -> ChunkResult | NotCachedHere:
    """Run one chunk sent by the parent; every value and exception is pickled on its own.

    A failure to unpickle the function, the broadcast arguments or the calls raises here and
    so fails every iteration of the chunk; anything an iteration does fails only itself.
    A function or broadcast sent by key that this worker lacks is *returned* as
    `NotCachedHere`, nothing run: raised, an executor would log a failed task (Dask does).
    """
    if _initializer_failed is not None:  # every iteration fails with it, none runs
        failing: Calls = unpack(chunk.calls)
        failed = dict.fromkeys(range(len(failing)), _initializer_failed)
        setup_logged = _logs.pending_setup_records() if chunk.settings.log_levels is not None else ()
        outputs = {-1: IterationOutput(records=setup_logged)} if setup_logged else None
        values = encode_values([None] * len(failing), failing, failed)
        return ChunkResult(values, failed, 0.0, _identity, True, outputs)
    slots = _slots
    if slots is not None:
        if slots.cancelled(chunk.loop_token):  # the loop stopped while this chunk was queued
            return ChunkResult([], {}, 0.0)
        # Loading the function may import its module in a fresh worker: setup, like the
        # initializer, not the iteration the timeout is for. The arguments count.
        slots.running(chunk.chunk_id, LOADING_ARGUMENTS, timed=False)
    try:
        try:
            function = _unpickle_cached(chunk.function_key, chunk.function, "the function", _functions, _callable_here)
            broadcast = _unpickle_cached(chunk.broadcast_key, chunk.broadcast, "the keyword arguments", _broadcasts)
        except NotCachedHere as missing:
            return missing
        if slots is not None:
            slots.running(chunk.chunk_id, LOADING_ARGUMENTS)
        try:
            calls: Calls = unpack(chunk.calls, private=True)  # each iteration's own: writable
        except Exception as exc:
            raise ChunkArgumentsError(
                f"arguments of this chunk could not be unpickled in the worker: {describe(exc)}"
            ) from exc  # a subclass, which the engine answers by resending call by call
        _local.shipped = getattr(_local, "shipped", 0) + 1
        settings = chunk.settings
        own_process = _is_worker_process or settings.own_process
        try:
            with (
                seeded_chunk(settings.seed, global_generators=own_process) as begin,
                _observed(settings, own_process) as observer,
            ):
                target = _call_target(function, broadcast, settings.keywords)
                values, errors, seconds = _run(target, calls, settings.timeout, slots, begin, observer)
        finally:
            _local.shipped -= 1
        if slots is not None:
            slots.running(chunk.chunk_id, SENDING_RESULTS)
        wire_errors = {position: encode_error(exc, tb_text) for position, (exc, tb_text) in errors.items()}
        outputs = observer.outputs() if observer is not None else None
        encoded, returned = _returns.encode(values, calls, wire_errors)  # large buffers: shared memory
        return ChunkResult(encoded, wire_errors, seconds, _identity, outputs=outputs, returned=returned)
    finally:
        if slots is not None:
            slots.idle()


def initialize_thread(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    """A ``"thread"`` pool's initializer, run in each of its threads. As in a worker process,
    a failure does not break the pool (every chunk would then fail with `WorkerCrashed`, the
    cause only logged): each iteration the thread is given fails with it instead."""
    try:
        initializer(*initargs)
    except BaseException as exc:  # sys.exit() too
        _local.initializer_failed = _setup_failure(exc, f"thread {threading.current_thread().name!r}")


def run_calls(
    function: Callable[..., Any], calls: Calls, broadcast: dict[str, Any], settings: Settings, serial: bool = False
) -> ChunkResult:
    """Run a chunk in this process, keeping live values and exceptions. ``serial``: no other
    iteration runs meanwhile, so the process's global random generators may be seeded."""
    setup_failed: tuple[BaseException, str] | None = getattr(_local, "initializer_failed", None)
    if setup_failed is not None:  # this thread's initializer failed: none runs
        failing = {position: Failed(index, *setup_failed) for position, (index, _) in enumerate(calls)}
        return ChunkResult([None] * len(calls), failing, 0.0, setup_failed=True)
    target = _call_target(function, broadcast, settings.keywords)
    with seeded_chunk(settings.seed, global_generators=serial) as begin, _observed(settings, False) as observer:
        values, errors, seconds = _run(target, calls, settings.timeout, None, begin, observer)
    failed = {position: Failed(calls.index_of(position), exc, tb_text) for position, (exc, tb_text) in errors.items()}
    outputs = observer.outputs() if observer is not None else None
    return ChunkResult(values, failed, seconds, outputs=outputs)


@contextlib.contextmanager
def _observed(settings: Settings, own_process: bool) -> Iterator[Observer | None]:
    """The chunk's `Observer`, when its output or logs are to be captured."""
    if own_process and settings.log_levels is None:
        _logs.standalone()  # this process's logging is its own again, if a loop took it over
    if not settings.capture_output and (settings.log_levels is None or not own_process):
        yield None  # in this process, log records go to its loggers as they are emitted
        return
    with Observer(settings, own_process) as observer:
        yield observer


def _call_target(function: Callable[..., Any], broadcast: dict[str, Any], keywords: tuple[str, ...]) -> Any:
    """What each call's arguments are given to: the function with the broadcast keyword
    arguments, taking the last ``len(keywords)`` arguments by those names (`each`)."""
    target = functools.partial(function, **broadcast) if broadcast else function
    if not keywords:
        return target
    count = len(keywords)

    def call(*args: Any) -> Any:
        return target(*args[:-count], **dict(zip(keywords, args[-count:], strict=True)))

    return call


def _run(
    target: Callable[..., Any],
    calls: Calls,
    timeout: float | None,
    slots: WorkerSlots | None,
    begin: Callable[[int], None] | None,
    observer: Observer | None = None,
) -> tuple[list[Any], dict[int, tuple[BaseException, str]], float]:
    """Run each call in its own ``try``, telling ``slots`` which one runs (and since when,
    for timeouts), and ``begin`` (seeded loops) which iteration starts. An iteration that
    overran ``timeout`` without being stopped (threads, executors that cannot kill a
    worker) fails once it returns.

    A log record emitted meanwhile finds its iteration in this frame's locals ``position``
    and ``calls`` (`autopar._logs`): keep those names."""
    values: list[Any] = []
    errors: dict[int, tuple[BaseException, str]] = {}
    where = slots.position_writer() if slots is not None else None
    view, at = where if where is not None else (None, 0)
    stamp_starts = view is not None and timeout is not None
    single = calls.single
    if observer is not None and not observer.per_iteration:
        observer = None  # log records find their iteration from this frame's locals (see _logs)
    _local.depth = getattr(_local, "depth", 0) + 1
    started = previous = time.perf_counter()
    try:
        for position, args in enumerate(calls.args):
            if view is not None:  # inline: this loop is the hot path of tiny iterations
                if stamp_starts:
                    view[at + 1] = time.monotonic_ns()
                view[at] = position
            if begin is not None:
                begin(calls.index_of(position))
            if observer is not None:
                observer.begin(position)
            try:
                values.append(target(args) if single else target(*args))
            except KeyboardInterrupt as exc:
                if not _is_worker_process and threading.current_thread() is threading.main_thread():
                    raise  # Ctrl-C in a serial loop stops it; elsewhere the iteration raised it
                values.append(None)
                errors[position] = (exc, format_worker_traceback(exc))
            except BaseException as exc:  # SystemExit, asyncio.CancelledError...: still one iteration's
                values.append(None)
                errors[position] = (exc, format_worker_traceback(exc))
            if observer is not None:
                observer.end(position)
            if timeout is not None:
                now = time.perf_counter()
                if now - previous > timeout and position not in errors:
                    values[-1] = None
                    errors[position] = (_overran(now - previous, timeout, stoppable=slots is not None), "")
                previous = now
    finally:
        _local.depth -= 1
    return values, errors, time.perf_counter() - started


def _depth() -> int:
    """How many chunks this thread is running (a nested serial loop runs one inside another)."""
    return int(getattr(_local, "depth", 0))


_logs.watch_iterations(_run.__code__, _depth)


def _overran(seconds: float, timeout: float, *, stoppable: bool) -> IterationTimeout:
    why = (
        "it returned before its worker could be stopped"
        if stoppable
        else "this backend cannot stop a running iteration, so it ran to the end"
    )
    return IterationTimeout(f"iteration ran {seconds:.3g} s, past timeout={timeout:g} s; {why}; its result was dropped")


def _unpickle_cached(
    key: str, payload: Payload, what: str, cache: _Cache, prepare: Callable[[Any], Any] | None = None
) -> Any:
    """Unpickle a function or broadcast arguments once per worker (per content, or per
    shared-memory segment), so that a warm worker skips the work on later chunks and loops.

    Objects viewing shared memory keep their segment mapped, so at most a few are kept: the
    segment of a finished loop is freed once the last view of it goes.
    """
    if payload.segment is not None:
        cache = _shared
    with _cache_lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    if payload == BY_KEY:
        raise NotCachedHere(f"{what} ({key}) is not cached in worker process {os.getpid()}", _identity)
    try:
        value = unpack(payload)
    except Exception as exc:
        raise stage_error(f"{what} could not be unpickled in the worker", exc) from exc
    if prepare is not None:
        value = prepare(value)
    with _cache_lock:
        cache[key] = value
        while len(cache) > cache.limit:
            cache.popitem(last=False)
    return value
