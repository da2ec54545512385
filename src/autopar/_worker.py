"""The code that runs in the worker: one chunk of iterations, each in its own ``try``.

This module is imported in every worker process, so it stays light and knows nothing of
executors or futures. `run_chunk` is the single entry point that every out-of-process backend
receives; `run_items` is the same loop for in-process backends (threads, serial), which need
no pickling and keep the live exception and its traceback.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from autopar._errors import SerializationError
from autopar._records import Chunk, Item, Outcome, WireOutcome
from autopar._serialize import describe, encode_error, encode_value, format_worker_traceback, loads

__all__ = ["in_worker", "initialize_worker", "run_chunk", "run_items"]

_CACHE_SIZE = 16
_cache: OrderedDict[str, Any] = OrderedDict()
_cache_lock = threading.Lock()
_local = threading.local()
_is_worker_process = False


def initialize_worker(user_initializer: bytes | None = None) -> None:
    """Run once in each new worker process: the parent owns Ctrl-C, loops nest serially, and
    the user's ``initializer(*initargs)`` (cloudpickled, so a lambda works) runs last."""
    global _is_worker_process
    _is_worker_process = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if user_initializer is not None:
        initializer, initargs = loads(user_initializer)
        initializer(*initargs)


def in_worker() -> bool:
    """True inside a worker process, or while this thread runs an iteration of a loop."""
    return _is_worker_process or getattr(_local, "depth", 0) > 0


def run_chunk(chunk: Chunk) -> list[WireOutcome]:
    """Run one chunk sent by the parent and return each iteration's outcome, pickled alone.

    A failure to unpickle the function, the broadcast arguments or the calls raises here and
    so fails every iteration of the chunk; anything an iteration does fails only itself.
    """
    function = _unpickle_cached(chunk.function_key, chunk.function, "the function")
    broadcast = _unpickle_cached(chunk.broadcast_key, chunk.broadcast, "the keyword arguments")
    try:
        calls: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = loads(chunk.items)
    except Exception as exc:
        raise SerializationError(
            f"arguments of this chunk could not be unpickled in the worker: {describe(exc)}"
        ) from exc
    return [_encode(outcome) for outcome in _run(function, map(Item._make, calls), broadcast)]


def run_items(function: Callable[..., Any], items: list[Item], broadcast: dict[str, Any]) -> list[Outcome]:
    """Run a chunk in this process, keeping live values and exceptions."""
    return list(_run(function, items, broadcast))


def _run(function: Callable[..., Any], items: Iterable[Item], broadcast: dict[str, Any]) -> Iterable[Outcome]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        for index, args, kwargs in items:
            call_kwargs = {**broadcast, **kwargs} if kwargs else broadcast
            started = time.perf_counter()
            try:
                value = function(*args, **call_kwargs)
            except (Exception, SystemExit) as exc:
                seconds = time.perf_counter() - started
                yield Outcome(index, exception=exc, traceback=format_worker_traceback(exc), seconds=seconds)
            else:
                yield Outcome(index, value=value, seconds=time.perf_counter() - started)
    finally:
        _local.depth -= 1


def _encode(outcome: Outcome) -> WireOutcome:
    if outcome.exception is not None:
        return WireOutcome(outcome.index, None, encode_error(outcome.exception, outcome.traceback), outcome.seconds)
    try:
        return WireOutcome(outcome.index, encode_value(outcome.value), None, outcome.seconds)
    except Exception as exc:
        error = SerializationError(f"result of iteration {outcome.index} could not be pickled: {describe(exc)}")
        return WireOutcome(outcome.index, None, encode_error(error, ""), outcome.seconds)


def _unpickle_cached(key: str, data: bytes, what: str) -> Any:
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        value = loads(data)
    except Exception as exc:
        raise SerializationError(f"{what} could not be unpickled in the worker: {describe(exc)}") from exc
    with _cache_lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value
