"""Large results come back through shared memory, and leave no segment behind on any fault."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import autopar
from _helpers import (
    RESULT_ITEMS,
    after_writing_results,
    big_result,
    big_then_die,
    dev_shm_nearly_full,
    mixed_results,
)
from autopar import SerializationError, WorkerCrashed, parallel_loop
from autopar._shared import segment_prefix

np = pytest.importorskip("numpy")
DEV_SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm")
METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


def result_segments(pid: int | None = None) -> set[str]:
    """The result segments left for this process (or ``pid``)."""
    prefix = f"{segment_prefix(pid)}r"
    return {p.name for p in DEV_SHM.iterdir() if p.name.startswith(prefix)}


@pytest.fixture
def shared_returns(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each chunk the parent decodes: whether its large buffers came through shared memory."""
    from autopar import _returns

    seen: list[bool] = []
    decode = _returns.decode

    def watched(result: Any, calls: Any) -> Any:
        seen.append(isinstance(result.returned, _returns.Received))
        return decode(result, calls)

    monkeypatch.setattr(_returns, "decode", watched)
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_large_results_come_back_through_shared_memory_and_outlive_shutdown(
    method: str, shared_returns: list[bool]
) -> None:
    res = parallel_loop(big_result, workers=2, start_method=method).map(range(12))
    values = list(res)
    assert shared_returns and all(shared_returns)
    assert res.stats.bytes_received >= 12 * RESULT_ITEMS * 8  # the segments' bytes count
    assert result_segments() == set()
    autopar.shutdown()
    for i, value in enumerate(values):
        assert value.flags.writeable
        assert np.array_equal(value, np.full(RESULT_ITEMS, float(i)))
        value[:] = -1.0  # the user's own memory
        assert value.sum() == -RESULT_ITEMS
    assert result_segments() == set()


def test_small_results_keep_the_pipe(shared_returns: list[bool]) -> None:
    res = parallel_loop(lambda i: np.full(100, float(i)), workers=2).map(range(8))
    assert [float(v.sum()) for v in res] == [100.0 * i for i in range(8)]
    assert shared_returns and not any(shared_returns)


def test_results_pickled_one_by_one_each_get_their_own_buffers(shared_returns: list[bool]) -> None:
    """A chunk of results of every kind: each value gets back its own buffers, and the one
    that cannot be pickled fails alone."""
    res = parallel_loop(mixed_results, workers=2, chunksize=8, on_error="collect").map(range(8))
    assert any(shared_returns)
    assert sorted(f.index for f in res.failures) == [2, 6]
    assert all(isinstance(f.exception, SerializationError) for f in res.failures)
    for i in (0, 4):
        value = res[i]
        assert np.array_equal(value["a"], np.full(RESULT_ITEMS, float(i)))
        assert np.array_equal(value["b"], np.arange(10))
        assert np.array_equal(value["c"], np.full(RESULT_ITEMS // 2, 1.0))
    assert res[1] == ("small", 1) and res[5] == ("small", 5)
    for i in (3, 7):
        assert np.array_equal(res[i][0], np.full(RESULT_ITEMS, float(i))) and res[i][1] == "x"
    assert result_segments() == set()


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_killed_after_writing_its_results_leaves_no_segment(method: str) -> None:
    """The segment is written, the worker dies before the parent reads its result: the
    iteration fails as a crash, and the broken pool's close removes the segment."""
    calc = parallel_loop(
        big_result,
        workers=2,
        chunksize=1,
        start_method=method,
        on_error="collect",
        initializer=after_writing_results,
        initargs=("die",),
    )
    res = calc.map([3])
    assert [type(f.exception) for f in res.failures] == [WorkerCrashed]
    assert result_segments() == set()


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_killed_in_the_chunk_after_a_large_result_leaves_no_segment(method: str) -> None:
    res = parallel_loop(big_then_die, workers=2, chunksize=2, start_method=method, on_error="collect").map([0, 1])
    assert [f.index for f in res.failures] == [1]
    assert np.array_equal(res[0], np.full(RESULT_ITEMS, 0.0))
    assert result_segments() == set()


@pytest.mark.parametrize("method", METHODS)
def test_a_nearly_full_dev_shm_sends_results_through_the_pipe(method: str, shared_returns: list[bool]) -> None:
    calc = parallel_loop(big_result, workers=2, start_method=method, initializer=dev_shm_nearly_full)
    values = list(calc.map(range(6)))
    assert shared_returns and not any(shared_returns)
    for i, value in enumerate(values):
        assert value.flags.writeable and np.array_equal(value, np.full(RESULT_ITEMS, float(i)))
    assert result_segments() == set()


SCRIPT = """
    import sys
    from _helpers import after_writing_results, big_result
    from autopar import parallel_loop

    calc = parallel_loop(
        big_result, workers=2, chunksize=1, start_method={method!r},
        initializer=after_writing_results, initargs=("stall",),
    )
    if __name__ == "__main__":
        print("ready", flush=True)
        calc.map(range(8))
"""


def _start(tmp_path: Path, method: str) -> subprocess.Popen[bytes]:
    """A script whose workers write their results and stall before sending them; returns
    once its segments are there."""
    script = tmp_path / "returns.py"
    script.write_text(textwrap.dedent(SCRIPT.format(method=method)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 30
    while not result_segments(proc.pid):
        assert time.monotonic() < deadline, "no result segment was written"
        time.sleep(0.05)
    return proc


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while result_segments(pid) or any(p.name.startswith(segment_prefix(pid)) for p in DEV_SHM.iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_while_results_wait_in_shared_memory_leaves_no_segment(tmp_path: Path, method: str) -> None:
    proc = _start(tmp_path, method)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert b"KeyboardInterrupt" in err
    assert _gone(proc.pid, 5), f"left: {result_segments(proc.pid)}"


@pytest.mark.parametrize("method", METHODS)
def test_a_parent_killed_outright_leaves_no_segment(tmp_path: Path, method: str) -> None:
    """The workers exit with their parent; the resource tracker they shared removes the rest."""
    proc = _start(tmp_path, method)
    proc.kill()
    proc.communicate(timeout=30)
    assert _gone(proc.pid, 15), f"left: {result_segments(proc.pid)}"
