"""Warm pools, shutdown, crashes that replace the pool, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import _helpers
import autopar
from _helpers import die, initialized, native_threads, os_threads, remember_and_count, square, whoami
from autopar import WorkerCrashed, parallel_loop
from conftest import worker_children


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
def test_a_dead_worker_fails_its_iterations_and_the_pool_is_replaced(start_method: str) -> None:
    """A worker that exits fails only its iteration with WorkerCrashed; the next loop works."""
    calc = parallel_loop(die, workers=2, on_error="collect", start_method=start_method)
    res = calc.map(range(6))
    assert [f.index for f in res.failures] == [1]
    crashed = res.failures[0].exception
    assert isinstance(crashed, WorkerCrashed)
    assert crashed.exitcode == 3
    assert "exited with code 3" in str(crashed)
    assert [res[i] for i in (0, 2, 3, 4, 5)] == [0, 2, 3, 4, 5]
    assert list(calc.map([0, 2, 3])) == [0, 2, 3]


def test_keyboard_interrupt_stops_the_loop_and_leaves_no_worker(tmp_path: Path) -> None:
    """Ctrl-C in the parent re-raises KeyboardInterrupt promptly and kills the workers."""
    script = tmp_path / "interrupted.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, time, psutil
            from autopar import parallel_loop

            @parallel_loop(workers=2, chunksize=1)
            def slow(x):
                time.sleep(30)

            if __name__ == "__main__":
                print("ready", flush=True)
                try:
                    slow.map(range(8))
                except KeyboardInterrupt:
                    time.sleep(0.5)
                    alive = [c for c in psutil.Process().children(recursive=True) if c.status() != "zombie"]
                    workers = [c for c in alive if "resource_tracker" not in " ".join(c.cmdline())]
                    print("interrupted, children left:", len(workers), flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert "interrupted, children left: 0" in out
    assert time.monotonic() - started < 5


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
