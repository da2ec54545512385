"""The verbs of a pool's end of life, on real pools of one worker: closed exactly once, one
post-mortem for every loop, workers stopped on purpose or at exit, retired out of the cache."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Future
from typing import Any

import pytest

from autopar import _backends, _exit, _worker
from autopar._options import Options
from autopar._pool import Pool, PostMortem

pytestmark = pytest.mark.timeout(20)

START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
ONE_WORKER = Options(workers=1, start_method=START_METHOD)


@pytest.fixture
def pool() -> Iterator[Pool]:
    """A process pool of one worker, outside the cache."""
    made = _backends._make_process_pool(ONE_WORKER, 1)
    yield made
    made.close(kill=True)


def run_as_chunk(chunk_id: int, seconds: float) -> None:
    """In the worker: show ``chunk_id`` in its slot, as a chunk of a loop would, and sleep."""
    assert _worker._slots is not None
    _worker._slots.running(chunk_id, 0)
    time.sleep(seconds)


def worker_running(pool: Pool, chunk_id: int) -> int:
    """The pid of the worker once it shows ``chunk_id`` in its slot."""
    assert pool.slots is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid, running in pool.slots.snapshot().items():
            if running.chunk_id == chunk_id:
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no worker ran chunk {chunk_id}")


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads started at once; their results, in order."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(position: int) -> None:
        start.wait()
        results[position] = calls[position]()

    threads = [threading.Thread(target=run, args=(position,)) for position in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_closers_shut_the_pool_down_once_and_both_wait_for_it(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    shutdown = pool.executor.shutdown

    def counted(**kwargs: Any) -> None:
        calls.append(kwargs)
        shutdown(**kwargs)

    monkeypatch.setattr(pool.executor, "shutdown", counted)
    running = pool.executor.submit(run_as_chunk, 1, 0.5)
    worker_running(pool, 1)

    def close() -> float:
        pool.close()
        return time.monotonic()

    ended = together(close, close)
    assert len(calls) == 1, "shut down twice"
    assert running.done() and running.exception() is None, "the running iteration finished first"
    assert pool.closed
    assert min(ended) >= max(ended) - 0.1, "a closer returned before the pool was closed"


def test_closing_with_kill_does_not_wait_for_the_running_iteration(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 2, 30)
    pid = worker_running(pool, 2)
    started = time.monotonic()
    pool.close(kill=True)
    assert time.monotonic() - started < 5
    assert isinstance(running.exception(), BrokenExecutor)
    assert pool.post_mortem().stopped == {pid}, "killed on purpose: no crash"


def test_the_post_mortem_is_made_once_for_every_loop_that_asks(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pool.slots is not None
    running = pool.executor.submit(run_as_chunk, 3, 30)
    pid = worker_running(pool, 3)
    snapshots: list[int] = []
    snapshot = pool.slots.snapshot

    def slow_snapshot() -> Any:
        snapshots.append(1)
        time.sleep(0.2)  # the second loop asks meanwhile
        return snapshot()

    monkeypatch.setattr(pool.slots, "snapshot", slow_snapshot)
    os.kill(pid, signal.SIGKILL)
    assert isinstance(running.exception(timeout=10), BrokenExecutor)
    first, second = together(pool.post_mortem, pool.post_mortem)
    assert first is second and len(snapshots) == 1
    assert first.running[pid].chunk_id == 3
    assert first.exit_codes == {pid: -signal.SIGKILL}
    assert first.stopped == frozenset(), "a crash, not a worker stopped on purpose"
    assert pool.closed
    assert pool.post_mortem() is first, "a loop that asks later gets the same"


def test_an_interrupted_post_mortem_is_made_again_by_the_next_loop(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pool.slots is not None

    def interrupted() -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(pool.slots, "snapshot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.post_mortem()
    monkeypatch.undo()
    assert isinstance(pool.post_mortem(), PostMortem)
    assert pool.closed


def test_a_worker_stopped_past_its_timeout_is_no_crash(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 4, 30)
    pid = worker_running(pool, 4)
    assert pool.stop_worker(pid, grace=0.5)
    assert isinstance(running.exception(timeout=10), BrokenExecutor)
    report = pool.post_mortem()
    assert report.stopped == {pid} and report.exit_codes[pid] == -signal.SIGTERM
    assert not pool.stop_worker(pid, grace=0.5), "nothing left to stop"


def test_at_exit_only_the_workers_running_abandoned_chunks_are_stopped(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 5, 30)
    pid = worker_running(pool, 5)
    pool.abandon([6])
    pool.stop_abandoned()
    time.sleep(0.1)
    assert not running.done(), "chunk 5 is not abandoned: its worker runs on"
    pool.abandon([5])
    pool.stop_abandoned()
    assert isinstance(running.exception(timeout=10), BrokenExecutor)
    assert pool.post_mortem().stopped == {pid}


def test_chunks_a_loop_gave_up_at_exit_are_stopped_too(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 7, 30)
    worker_running(pool, 7)
    pool.stop_abandoned([7])
    assert isinstance(running.exception(timeout=10), BrokenExecutor)


class _Loop:
    """A running loop as `_exit` sees it."""

    def __init__(self, in_use: set[int], left: dict[int, list[int]]) -> None:
        self.in_use, self.left = in_use, left

    def pools_in_use(self) -> set[int]:
        return self.in_use

    def give_up(self) -> dict[int, list[int]]:
        return self.left


def test_at_exit_a_pool_a_running_loop_uses_is_left_alone(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 9, 30)
    worker_running(pool, 9)
    pool.abandon([9])
    loop = _Loop({id(pool.executor)}, {})
    _exit.loop_started(loop)
    try:
        _exit._stop_abandoned(lambda: [pool])
        time.sleep(0.1)
        assert not running.done(), "stopping a worker would break the pool under the loop"
    finally:
        _exit.loop_ended(loop)
    _exit._stop_abandoned(lambda: [pool])
    assert isinstance(running.exception(timeout=10), BrokenExecutor)


def test_at_exit_the_chunks_of_a_loop_no_thread_can_go_on_with_are_stopped(pool: Pool) -> None:
    running = pool.executor.submit(run_as_chunk, 10, 30)
    worker_running(pool, 10)
    loop = _Loop(set(), {id(pool.executor): [10]})  # an imap the main thread left unfinished
    _exit.loop_started(loop)
    try:
        _exit._stop_abandoned(lambda: [pool])
    finally:
        _exit.loop_ended(loop)
    assert isinstance(running.exception(timeout=10), BrokenExecutor)


def test_retire_takes_the_pool_out_of_the_cache_and_closes_it_once_its_loops_end() -> None:
    backend = _backends.acquire(ONE_WORKER)
    assert backend.pool is not None
    assert _backends.acquire(ONE_WORKER).pool is backend.pool, "warm: taken again"
    running: Future[None] = backend.executor.submit(run_as_chunk, 8, 0.3)
    worker_running(backend.pool, 8)
    _backends.retire(backend)
    assert backend.pool not in _backends._warm.values()
    replacement = _backends.acquire(ONE_WORKER)
    assert replacement.pool is not backend.pool, "the next loop takes a new pool"
    assert running.result(timeout=10) is None, "the iteration running on it ends first"
    deadline = time.monotonic() + 10
    while not backend.pool.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.pool.closed
    _backends.discard(replacement)
    assert replacement.pool not in _backends._warm.values()
