"""Warm pools, shutdown, workers that ignore Ctrl-C, native thread caps and initializers
(crashes and Ctrl-C of the parent: test_faults)."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import _helpers
import autopar
from _helpers import (
    initialized,
    native_threads,
    os_threads,
    remember,
    remember_and_count,
    run_inner_and_count,
    sleep_then,
    square,
    whoami,
)
from autopar import _backends, parallel_loop
from autopar._backends import MAX_WARM_POOLS
from conftest import run_script, worker_children


def test_pools_are_reused_across_calls() -> None:
    """A second loop with the same configuration runs on the same warm workers."""
    calc = parallel_loop(whoami, workers=2, chunksize=1)
    first = set(calc.map(range(20)))
    second = set(calc.map(range(20)))
    assert first == second and len(first) == 2


def test_shutdown_closes_every_pool_and_the_next_loop_starts_fresh() -> None:
    calc = parallel_loop(whoami, workers=2, chunksize=1)
    before = set(calc.map(range(10)))
    autopar.shutdown()
    assert not any(child.pid in before for child in worker_children())
    after = set(calc.map(range(10)))
    assert before.isdisjoint(after)


@pytest.mark.contract
def test_workers_ignore_sigint_so_the_parent_alone_decides() -> None:
    """A terminal's Ctrl-C reaches every process of the group; the workers ignore it (the
    parent stops the loop and kills them), so a SIGINT to the workers alone changes nothing."""
    results = parallel_loop(sleep_then, workers=2, chunksize=1).imap([0.3] * 6)
    assert next(results) == 0.3
    workers = worker_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    try:
        rest = list(results)
    except KeyboardInterrupt:  # caught, so that it fails this test, not the whole session
        pytest.fail("a worker's KeyboardInterrupt reached the parent")
    assert rest == [0.3] * 5


def test_thread_and_serial_backends_run_in_this_process() -> None:
    for backend in ("thread", "serial"):
        assert set(parallel_loop(lambda _: os.getpid(), backend=backend).map(range(4))) == {os.getpid()}
    assert list(parallel_loop(square, backend="thread", workers=3).map(range(5))) == [0, 1, 4, 9, 16]


def test_workers_cap_native_thread_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """workers x BLAS threads fits the CPUs, even for a BLAS the parent loaded before forking."""
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    from autopar._cpus import usable_cpu_count

    expected = max(1, usable_cpu_count() // 2)
    autopar.shutdown()
    env, pools = parallel_loop(native_threads, workers=2).map([0])[0]
    assert env == str(expected)
    assert all(threads <= expected for threads in pools)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="counts threads through /proc")
def test_capping_starts_no_native_thread_pool() -> None:
    """Capping an OpenBLAS the parent loaded leaves no pool thread spinning in a forked worker
    (setting its thread count restarts the pool, whose idle threads spin ~100 ms each): a
    worker holds its main thread and the parent watchdog only."""
    numpy = pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    numpy.ones((64, 64)) @ numpy.ones((64, 64))  # the parent's BLAS pool is up
    autopar.shutdown()
    try:
        counts = set(parallel_loop(os_threads, workers=2, start_method="fork", chunksize=1).map(range(4)))
    finally:
        autopar.shutdown()
    assert counts == {2}


def test_a_thread_count_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    autopar.shutdown()
    try:
        env, _ = parallel_loop(native_threads, workers=2).map([0])[0]
    finally:
        autopar.shutdown()
    assert env == "3"


def test_every_backend_runs_the_initializer_before_its_iterations(backend: dict[str, Any]) -> None:
    """A program written for processes keeps working on threads, or serially to debug it."""
    _helpers.remember(None)
    calc = parallel_loop(initialized, initializer=remember_and_count, initargs=("ready",), **backend)
    assert list(calc.map(range(4))) == ["ready"] * 4


def test_the_serial_backend_initializes_once_until_shutdown() -> None:
    _helpers.initializations.clear()
    calc = parallel_loop(initialized, backend="serial", initializer=remember_and_count, initargs=("serial",))
    calc.map(range(3))
    calc.map(range(3))
    assert _helpers.initializations == ["serial"], "warm, like a pool's workers"
    autopar.shutdown()
    calc.map(range(3))
    assert _helpers.initializations == ["serial", "serial"]


def test_a_failing_initializer_under_the_serial_backend_raises_here() -> None:
    def broken() -> None:
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model") as caught:
        parallel_loop(initialized, backend="serial", initializer=broken, on_error="collect").map(range(3))
    assert "raised by the initializer, which backend='serial' runs in this process" in caught.value.__notes__


def test_a_serial_initializer_may_run_a_loop_itself() -> None:
    """The initializer runs under a lock; a loop it starts with the same initializer neither
    waits for that lock nor runs the initializer again."""
    runs: list[list[int]] = []

    def load() -> None:
        runs.append(list(parallel_loop(square, backend="serial", initializer=load).map(range(3))))

    assert list(parallel_loop(square, backend="serial", initializer=load).map([2])) == [4]
    assert runs == [[0, 1, 4]]


def test_a_nested_loop_does_not_run_the_initializer_again(backend: dict[str, Any]) -> None:
    """The nested loop runs serially inside an iteration, where the initializer already ran
    (once per process or thread: a thread pool of 2 runs it twice in this process)."""
    autopar.shutdown()
    _helpers.initializations.clear()
    inner = parallel_loop(initialized, initializer=remember_and_count, initargs=("nested",))
    outer = parallel_loop(run_inner_and_count, initializer=remember_and_count, initargs=("nested",), **backend)
    counts = list(outer.map([inner] * 3))
    assert max(counts) <= (2 if backend["backend"] == "thread" else 1)


def test_initializer_arguments_may_be_lists_and_dicts(backend: dict[str, Any]) -> None:
    """Unhashable initargs key the warm pool by identity: the same objects, the same pool."""
    config = {"model": "m.bin"}
    calc = parallel_loop(initialized, initializer=remember, initargs=(config,), **backend)
    assert list(calc.map(range(3))) == [config] * 3
    assert list(calc.map(range(2))) == [config] * 2


def test_warm_pools_are_bounded_and_the_least_recently_used_is_closed() -> None:
    """A new partial initializer at every call makes a new pool each time: only the last
    MAX_WARM_POOLS stay warm, and a pool in use keeps its place."""
    autopar.shutdown()
    tracked = parallel_loop(whoami, workers=1)
    first = set(tracked.map(range(2)))

    def new_pools(count: int) -> None:
        for value in range(count):
            calc = parallel_loop(initialized, backend="thread", workers=1, initializer=partial(remember, value))
            assert list(calc.map([0])) == [value]

    new_pools(MAX_WARM_POOLS - 1)
    assert set(tracked.map(range(2))) == first, "used again: still warm"
    new_pools(MAX_WARM_POOLS - 1)
    assert set(tracked.map(range(2))) == first
    new_pools(MAX_WARM_POOLS)
    assert set(tracked.map(range(2))).isdisjoint(first), "the least recently used pool was closed"
    assert len(_backends._warm) == MAX_WARM_POOLS


@pytest.mark.parametrize("warm", [False, True])
def test_a_loop_in_an_atexit_handler_is_refused_saying_why(tmp_path: Path, warm: bool) -> None:
    """As concurrent.futures refuses new work then; the error said "can't register atexit
    after shutdown" (after starting a pool nothing would close), or blamed a thread."""
    source = f"""
    import atexit
    from autopar import parallel_loop

    def square(x):
        return x * x

    @atexit.register
    def at_exit():
        try:
            parallel_loop(square, workers=2).map(range(3))
        except RuntimeError as exc:
            print(exc)

    if __name__ == "__main__" and {warm!r}:
        parallel_loop(square, workers=2).map(range(2))
    """
    result = run_script(source, tmp_path)
    assert "no loop can start in an atexit handler" in result.stdout


@pytest.mark.timeout(20)
def test_a_loop_started_while_a_pool_is_being_made_does_not_deadlock() -> None:
    """Making a pool may run the garbage collector, and a __del__ a loop of its own, in the same
    thread: that loop waited forever for the lock held while the pool was made."""
    from concurrent.futures import ThreadPoolExecutor

    from autopar import _backends
    from autopar._pool import Pool

    key = ("test: made while making", object())
    made: list[ThreadPoolExecutor] = []

    def make_inner() -> Pool:
        made.append(ThreadPoolExecutor(1))
        return Pool(made[-1])

    def make_outer() -> Pool:
        _backends._cached(key, make_inner)  # as a __del__'s loop would, in the middle
        return make_inner()

    outer = _backends._cached(key, make_outer)
    assert outer.executor is made[-1] and _backends._warm[key] is outer
    _backends.retire(_backends.Backend(outer.executor, in_process=True, workers=1, pool=outer))
    made[0].shutdown()


def test_shutdown_called_inside_a_thread_iteration_does_not_fail_it() -> None:
    """Cleanup code reached from the loop body may call autopar.shutdown(): its thread cannot
    wait for itself ("cannot join current thread"); the loop goes on, on a new pool."""

    def work(x: int) -> int:
        if x == 2:
            autopar.shutdown()
        time.sleep(0.01)
        return x

    res = parallel_loop(work, backend="thread", workers=2, chunksize=1, on_error="collect").map(range(8))
    assert res.failures == [] and list(res) == list(range(8))


def test_a_loop_outlasts_shutdown_called_again_and_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pool it takes may be shut down by another thread before it sends a chunk there: it
    takes another, more than twice (RuntimeError "cannot schedule new futures after shutdown"
    escaped under load)."""
    from concurrent.futures import ThreadPoolExecutor

    submit = ThreadPoolExecutor.submit
    refusals = iter(range(5))

    def shut_down_meanwhile(self: ThreadPoolExecutor, *args: Any, **kwargs: Any) -> Any:
        if next(refusals, None) is not None:
            self.shutdown(wait=False)
            raise RuntimeError("cannot schedule new futures after shutdown")
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", shut_down_meanwhile)
    assert list(parallel_loop(_helpers.square, backend="thread", workers=1).map(range(3))) == [0, 1, 4]
