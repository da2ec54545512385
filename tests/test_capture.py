"""capture_output=True: each iteration's printed text, written here in input order as results
are collected, and kept on its Failure. The parent's real streams matter, so most checks
run a real script in a subprocess."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from autopar import parallel_loop
from conftest import START_METHODS, run_script

SCRIPT = """
    import sys, time
    from autopar import parallel_loop

    @parallel_loop(workers=2, capture_output=True, on_error="collect", {options})
    def talk(x):
        time.sleep(0.02 * ((7 - x) % 4))  # later iterations often finish first
        print(f"out {{x}}")
        print(f"err {{x}}", file=sys.stderr)
        if x == 5:
            raise ValueError("five")
        return x

    if __name__ == "__main__":
        res = talk.map(range(8))
        sys.stdout.flush()
        print("FAILURE", repr(res.failures[0].stdout), repr(res.failures[0].stderr))
"""

BACKENDS = [f'backend="process", start_method="{m}"' for m in START_METHODS] + ['backend="thread"', 'backend="serial"']


@pytest.mark.parametrize("options", BACKENDS, ids=lambda text: text.split('"')[-2])
def test_printed_text_comes_back_in_input_order_on_every_backend(options: str, tmp_path: Path) -> None:
    result = run_script(SCRIPT.format(options=options), tmp_path)
    lines = result.stdout.splitlines()
    assert lines[:8] == [f"out {x}" for x in range(8)]
    assert lines[8] == "FAILURE 'out 5\\n' 'err 5\\n'"
    assert result.stderr.splitlines() == [f"err {x}" for x in range(8)]


def test_without_capture_workers_print_as_before(tmp_path: Path) -> None:
    result = run_script(SCRIPT.format(options="").replace("capture_output=True", "capture_output=False"), tmp_path)
    # Two workers print at once into one pipe: under PYTHONUNBUFFERED, print's text and its
    # newline are two writes, so one worker's line may land inside another's.
    assert sorted(re.findall(r"out \d", result.stdout)) == [f"out {x}" for x in range(8)]
    assert "FAILURE '' ''" in result.stdout


def test_captured_text_goes_above_a_progress_bar(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    source = SCRIPT.format(options="progress=True")
    result = run_script(source, tmp_path)
    lines = result.stdout.splitlines()
    assert lines[:8] == [f"out {x}" for x in range(8)]  # whole lines, none torn by the bar
    bar_lines = [line for line in result.stderr.split("\r") if "talk" in line]
    assert bar_lines, result.stderr  # the bar was drawn, on stderr


def chatty(x: int) -> int:
    print(f"iteration {x}")
    return x


def test_another_threads_prints_are_not_taken_for_an_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            print("background")
            time.sleep(0.001)

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        res = parallel_loop(chatty).options(backend="thread", workers=2, capture_output=True).map(range(20))
    finally:
        stop.set()
        thread.join()
    assert list(res) == list(range(20))
    printed = [line for line in capsys.readouterr().out.splitlines() if line != "background"]
    assert printed == [f"iteration {x}" for x in range(20)]
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_Proxy"  # taken away after the loop


def test_capture_output_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="capture_output='yes': expected True or False"):
        parallel_loop(chatty).options(capture_output="yes")  # type: ignore[arg-type]


def test_imap_writes_each_iterations_text_with_its_result(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []
    for value in parallel_loop(chatty).options(workers=2, capture_output=True).imap(range(6)):
        seen.append(value)
    assert seen == list(range(6))
    assert capsys.readouterr().out.splitlines() == [f"iteration {x}" for x in range(6)]
