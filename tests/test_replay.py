"""failure.replay(), err.failure, res.retry_failures() and on_error="debug"."""

from __future__ import annotations

import os
import pickle
import pty
import random
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

import _debughook
from autopar import AutoparError, Failure, each, parallel_loop


def fragile(x: int, limit: int = 3) -> int:
    if x >= limit:
        raise ValueError(f"{x} is too large")
    return x * 2


def seeded_then_fails(x: int) -> float:
    value = random.random()
    if x == 2:
        raise KeyError(value)
    return value


def fails_until_marker(x: int, marker: str) -> int:
    if x == 1 and not os.path.exists(marker):
        raise RuntimeError("not yet")
    return x + 100


def slow_when(x: int, slow: int = 1) -> int:
    if x == slow:
        time.sleep(5)
    return x


def test_replay_returns_the_value_or_raises_live(backend: dict[str, Any]) -> None:
    res = parallel_loop(fragile).options(on_error="collect", **backend).map(range(5))
    failure = res.failures[0]
    with pytest.raises(ValueError, match="3 is too large") as caught:
        failure.replay()
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert frames[-1].name == "fragile"  # a real traceback, down to where it raised
    assert frames[-1].filename == __file__
    # With other arguments the same function returns: replay uses this iteration's own.
    moved = Failure(failure.index, (1,), {}, failure.exception, "", 1, _rerun=failure._rerun)
    assert moved.replay() == 2


def test_raise_carries_the_failure_to_replay(backend: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        parallel_loop(fragile).options(**backend).map(range(5), limit=2)
    failure = caught.value.failure  # type: ignore[attr-defined]
    assert (failure.index, failure.args, failure.kwargs) == (2, (2,), {"limit": 2})
    with pytest.raises(ValueError, match="2 is too large"):
        failure.replay()


def test_replay_draws_the_iterations_own_random_numbers() -> None:
    res = parallel_loop(seeded_then_fails).options(on_error="collect", workers=2, seed=21).map(range(4))
    (failure,) = res.failures
    with pytest.raises(KeyError) as caught:
        failure.replay()
    assert caught.value.args == failure.exception.args  # the same draw as in the worker


def test_replay_with_each_keywords() -> None:
    res = parallel_loop(fragile).options(on_error="collect", workers=2).map([1, 2], limit=each([5, 1]))
    (failure,) = res.failures
    assert failure.kwargs == {"limit": 1}
    with pytest.raises(ValueError, match="2 is too large"):
        failure.replay()


def test_replay_debug_stops_where_it_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONBREAKPOINT", "_debughook.set_trace")
    _debughook.STOPPED.clear()
    res = parallel_loop(fragile).options(on_error="collect", workers=2).map(range(5))
    with pytest.raises(ValueError):
        res.failures[0].replay(debug=True)
    ((name, _, local_names),) = _debughook.STOPPED
    assert name == "fragile"
    assert local_names["x"] == 3


def test_replay_refuses_a_non_bool_debug() -> None:
    res = parallel_loop(fragile).options(on_error="collect", backend="serial").map(range(5))
    with pytest.raises(TypeError, match="debug='yes'"):
        res.failures[0].replay(debug="yes")  # type: ignore[arg-type]


def test_debug_without_a_terminal_acts_as_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONBREAKPOINT", "_debughook.set_trace")
    _debughook.STOPPED.clear()
    with pytest.raises(ValueError, match="3 is too large") as caught:
        parallel_loop(fragile).options(on_error="debug", workers=2).map(range(5))
    assert _debughook.STOPPED == []  # pytest's stdin is no terminal: nobody to answer a debugger
    assert list(caught.value.partial_result[:3]) == [0, 2, 4]  # type: ignore[attr-defined]


def test_debug_at_a_terminal_opens_pdb_where_the_iteration_raised(tmp_path: Path) -> None:
    """A real pdb on a real terminal (a pseudo-terminal), driven as a person would."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            from autopar import parallel_loop

            @parallel_loop(workers=2, on_error="debug")
            def calc(x):
                secret = x * 7
                return 1 / (x - 3)

            if __name__ == "__main__":
                try:
                    calc.map(range(6))
                except ZeroDivisionError as err:
                    print("RAISED", err.failure.index)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONBREAKPOINT": ""}
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(script)], stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    os.write(primary, b"p secret\nq\n")
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the other side closed: the script ended
            break
        if not data:
            break
        output += data
    process.wait(timeout=30)
    os.close(primary)
    text = output.decode(errors="replace")
    assert "running it again in this process under the debugger" in text
    assert "(Pdb)" in text
    assert "return 1 / (x - 3)" in text  # stopped at the line that raised
    assert "21" in text  # `p secret` printed the local of iteration 3
    assert "RAISED 3" in text  # then the loop's own exception, as with "raise"
    assert process.returncode == 0


def test_retry_failures_reruns_only_the_failed_ones_with_new_options(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    loop = parallel_loop(fails_until_marker).options(on_error="collect", workers=2, retries=1)
    res = loop.map(range(4), marker=str(marker))
    assert [f.index for f in res.failures] == [1]
    assert res.failures[0].attempts == 2
    marker.write_text("")
    again = res.retry_failures(backend="serial")
    assert again.ok
    assert list(again) == [100, 101, 102, 103]
    assert list(res) == [100, None, 102, 103]  # the original is unchanged
    assert len(res.failures) == 1


def test_retry_failures_keeps_those_that_fail_again_counting_every_try() -> None:
    res = parallel_loop(fragile).options(on_error="collect", workers=2).map(range(6), limit=each([9, 9, 9, 3, 4, 9]))
    assert [f.index for f in res.failures] == [3, 4]
    again = res.retry_failures(retries=2)
    assert [f.index for f in again.failures] == [3, 4]
    assert [f.attempts for f in again.failures] == [4, 4]  # 1 try, then 1 + 2 retries
    assert again.failures[0].kwargs == {"limit": 3}
    assert "iteration 3: fragile(3, limit=3)" in again.failures[0].exception.__notes__[-1]
    assert list(again) == [0, 2, 4, None, None, 10]
    third = again.retry_failures(on_error="collect")  # options add up, as .options() does: retries=2 still
    assert [f.attempts for f in third.failures] == [7, 7]


def test_retry_failures_of_a_result_without_failures_is_a_copy() -> None:
    res = parallel_loop(fragile).options(backend="serial").map(range(3))
    again = res.retry_failures()
    assert list(again) == list(res)
    assert again is not res


def test_retry_failures_refuses_a_bad_option() -> None:
    res = parallel_loop(fragile).options(on_error="collect", backend="serial").map(range(5))
    with pytest.raises(TypeError, match="unknown option 'worker'"):
        res.retry_failures(worker=2)


def test_retry_failures_with_a_timeout(backend: dict[str, Any]) -> None:
    if backend["backend"] != "process":
        pytest.skip("only the process backend stops an overdue iteration")
    res = parallel_loop(slow_when).options(on_error="collect", timeout=0.5, **backend).map(range(3))
    assert [f.index for f in res.failures] == [1]
    again = res.retry_failures(timeout=None, backend="serial")
    assert again.ok
    assert list(again) == [0, 1, 2]


def test_a_pickled_failure_replays_where_its_function_can_be_found() -> None:
    res = parallel_loop(fragile).options(on_error="collect", backend="serial").map(range(5))
    loaded = pickle.loads(pickle.dumps(res))
    with pytest.raises(ValueError, match="3 is too large"):
        loaded.failures[0].replay()
    assert list(loaded.retry_failures(on_error="collect")) == [0, 2, 4, None, None]


def test_replay_says_so_when_the_function_cannot_be_found_any_more(tmp_path: Path) -> None:
    module = tmp_path / "vanishing_module.py"
    module.write_text("def divide(x):\n    return 1 / x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_module

        res = parallel_loop(vanishing_module.divide).options(on_error="collect", backend="serial").map([1, 0])
        data = pickle.dumps(res)
        del vanishing_module.divide  # renamed, removed, or another process without it
        loaded = pickle.loads(data)  # the result still loads
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_module", None)
    assert list(loaded) == [1.0, None]
    with pytest.raises(
        AutoparError, match=r"cannot replay iteration 1 of divide: its function cannot be found any more"
    ):
        loaded.failures[0].replay()
    with pytest.raises(AutoparError, match="cannot retry the failed iterations of divide"):
        loaded.retry_failures()


def test_a_failure_made_by_hand_cannot_be_replayed() -> None:
    failure = Failure(0, (1,), {}, ValueError("x"), "")
    with pytest.raises(AutoparError, match="cannot run iteration 0 again: this record was not made by an autopar loop"):
        failure.replay()
