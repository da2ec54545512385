"""The progress option: a tqdm bar when tqdm is installed, a warning and no bar otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _helpers import square
from autopar import parallel_loop
from autopar._progress import progress_bar


def test_progress_bar_counts_every_iteration(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    res = parallel_loop(square, workers=2, progress=True).map(range(50))
    assert list(res) == [x * x for x in range(50)]
    err = capsys.readouterr().err
    assert "square" in err
    assert "50/50" in err


@pytest.mark.parametrize(
    ("blocked", "message"),
    [
        ("tqdm", r"progress=True needs tqdm \(pip install tqdm, or autopar's progress extra\)"),
        ("tqdm.auto", r"progress=True could not import tqdm \(import of tqdm.auto halted"),  # a broken install
    ],
)
def test_without_tqdm_a_warning_says_why(monkeypatch: pytest.MonkeyPatch, blocked: str, message: str) -> None:
    if blocked == "tqdm":  # not installed: nothing on the path, nothing imported yet
        monkeypatch.setattr(sys, "path", [])
        for name in [name for name in sys.modules if name.split(".")[0] == "tqdm"]:
            monkeypatch.delitem(sys.modules, name)
    else:
        monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.warns(UserWarning, match=message):
        bar = progress_bar(True, 10, "f")
    bar.update(3)
    bar.close()


def test_no_progress_means_no_output(capsys: pytest.CaptureFixture[str]) -> None:
    parallel_loop(square, workers=2).map(range(5))
    assert capsys.readouterr().err == ""


def test_an_imap_closed_before_its_first_result_closes_its_bar() -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    results = parallel_loop(square, workers=2, progress=True).imap(range(5))
    results.close()
    assert not [bar for bar in list(tqdm._instances) if bar.desc == "square"]


# --- Where users see the bar: a terminal, as a real script's merged stdout and stderr show it ---

PROGRESS_SCRIPT = """
    import sys, time
    from autopar import parallel_loop

    def talk(x):
        time.sleep(0.01 * ((7 - x) % 4))  # later iterations often finish first
        print("line", x, end="")  # a line in two writes: whole once the iteration ends
        print(" of the loop")
        print("err", x, file=sys.stderr)
        return x

    def count(x):  # a line over five iterations, as `print(x, end=" ")` loops write them
        time.sleep(0.01)
        print(x, end=" " if x % 5 != 4 else "\\n")
        return x

    def inner(y):
        time.sleep(0.005)
        return y

    def outer(x):
        return sum(parallel_loop(inner, backend=sys.argv[3], workers=2, progress=True).map(range(8)))

    if __name__ == "__main__":
        mode = sys.argv[1]
        loop = parallel_loop(talk, workers=2, capture_output=True, progress=True)
        if mode == "map":
            loop.map(range(20))
        elif mode == "as_completed":
            for _ in loop.as_completed(range(20)):
                pass
        elif mode == "imap":  # consumed slowly: the bar follows what the consumer collected
            for _ in loop.imap(range(20)):
                time.sleep(0.02)
        elif mode == "partial":
            parallel_loop(count, workers=2, capture_output=True, progress=True).map(range(20))
        elif mode == "nested":
            parallel_loop(outer, backend=sys.argv[2], workers=2, capture_output=True, progress=True).map(range(6))
"""

BAR = re.compile(r"^(\w+): +(\d+)%\|")


def run_in_terminal(tmp_path: Path, *args: str) -> list[str]:
    """The screen a terminal shows for the script's stdout and stderr, merged as a terminal
    merges them: each ``\\r`` goes back to the start of the line, to be written over. Its
    stdout is a pipe (block-buffered), as under ``| tee log``."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(PROGRESS_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONIOENCODING": "utf-8"}
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
        env=env,
        check=False,
    )
    output = result.stdout.decode()  # as bytes: text mode would turn each \r into a \n
    assert result.returncode == 0, output
    screen: list[str] = []
    line: list[str] = []
    column = 0
    for char in output:
        if char == "\n":
            screen.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column : column + 1] = [char]
            column += 1
    if line:
        screen.append("".join(line).rstrip())
    return screen


def assert_one_finished_bar(screen: list[str], name: str, total: int) -> None:
    """The last line is the bar, at 100%; no other line is, or holds, a bar."""
    assert [line for line in screen if "%|" in line] == [screen[-1]], screen
    match = BAR.match(screen[-1])
    assert match is not None, screen
    assert match.groups() == (name, "100"), screen
    assert f"| {total}/{total} [" in screen[-1]


@pytest.mark.parametrize("mode", ["map", "imap"])
def test_printed_lines_stay_whole_above_one_bar(mode: str, tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    screen = run_in_terminal(tmp_path, mode)
    assert screen[:-1] == [line for x in range(20) for line in (f"line {x} of the loop", f"err {x}")]
    assert_one_finished_bar(screen, "talk", 20)


def test_as_completed_draws_one_bar_under_whole_lines(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    screen = run_in_terminal(tmp_path, "as_completed")
    pairs = [tuple(screen[i : i + 2]) for i in range(0, len(screen) - 1, 2)]
    assert sorted(pairs, key=lambda pair: int(pair[0].split()[1])) == [
        (f"line {x} of the loop", f"err {x}") for x in range(20)
    ]
    assert_one_finished_bar(screen, "talk", 20)


def test_a_line_printed_over_several_iterations_is_not_drawn_over(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    screen = run_in_terminal(tmp_path, "partial")
    assert screen[:-1] == [" ".join(str(x) for x in range(first, first + 5)) for first in range(0, 20, 5)]
    assert_one_finished_bar(screen, "count", 20)


@pytest.mark.parametrize(
    ("outer", "inner"),
    [("process", "process"), ("thread", "thread"), ("thread", "process"), ("serial", "thread")],
)
def test_a_loop_inside_an_iteration_draws_no_bar(outer: str, inner: str, tmp_path: Path) -> None:
    """Only the outer loop's bar: a nested loop's would be drawn in a worker (or captured
    there and echoed here as text), or by each of the outer loop's threads at once."""
    pytest.importorskip("tqdm")
    screen = run_in_terminal(tmp_path, "nested", outer, inner)
    assert screen[-1:] == screen, screen
    assert_one_finished_bar(screen, "outer", 6)


def test_a_nested_loop_resolves_to_no_bar() -> None:
    from autopar._options import Options, resolve

    assert resolve(Options(progress=True)).progress
    seen = parallel_loop(_nested_progress, backend="serial").map(range(2))
    assert list(seen) == [False, False]


def _nested_progress(x: int) -> bool:
    from autopar._options import Options, resolve

    return resolve(Options(progress=True, backend="process")).progress
