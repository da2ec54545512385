"""The code that runs in the worker: one chunk of iterations, each in its own ``try``.

This module is imported in every worker process, so it stays light and knows nothing of
executors or futures. `run_chunk` is the single entry point that every out-of-process backend
receives; `run_calls` is the same loop for in-process backends (threads, serial), which need
no pickling and keep the live exception and its traceback.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from autopar._errors import SerializationError
from autopar._records import Call, Chunk, ChunkResult, Failed
from autopar._serialize import describe, encode_error, encode_values, format_worker_traceback, loads

__all__ = ["in_worker", "initialize_worker", "run_calls", "run_chunk"]

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


def run_chunk(chunk: Chunk) -> ChunkResult:
    """Run one chunk sent by the parent; every value and exception is pickled on its own.

    A failure to unpickle the function, the broadcast arguments or the calls raises here and
    so fails every iteration of the chunk; anything an iteration does fails only itself.
    """
    function = _unpickle_cached(chunk.function_key, chunk.function, "the function")
    broadcast = _unpickle_cached(chunk.broadcast_key, chunk.broadcast, "the keyword arguments")
    try:
        calls: list[Call] = loads(chunk.calls)
    except Exception as exc:
        raise SerializationError(
            f"arguments of this chunk could not be unpickled in the worker: {describe(exc)}"
        ) from exc
    values, errors, seconds = _run(function, calls, broadcast)
    wire_errors = {position: encode_error(exc, tb_text) for position, (exc, tb_text) in errors.items()}
    return ChunkResult(encode_values(values, calls, wire_errors), wire_errors, seconds)


def run_calls(function: Callable[..., Any], calls: list[Call], broadcast: dict[str, Any]) -> ChunkResult:
    """Run a chunk in this process, keeping live values and exceptions."""
    values, errors, seconds = _run(function, calls, broadcast)
    failed = {position: Failed(calls[position][0], exc, tb_text) for position, (exc, tb_text) in errors.items()}
    return ChunkResult(values, failed, seconds)


def _run(
    function: Callable[..., Any], calls: list[Call], broadcast: dict[str, Any]
) -> tuple[list[Any], dict[int, tuple[BaseException, str]], float]:
    values: list[Any] = []
    errors: dict[int, tuple[BaseException, str]] = {}
    _local.depth = getattr(_local, "depth", 0) + 1
    started = time.perf_counter()
    try:
        for position, (_, args) in enumerate(calls):
            try:
                values.append(function(*args, **broadcast))
            except (Exception, SystemExit) as exc:
                values.append(None)
                errors[position] = (exc, format_worker_traceback(exc))
    finally:
        _local.depth -= 1
    return values, errors, time.perf_counter() - started


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
