"""Notebooks are a place loops run: a real Jupyter kernel runs a notebook built here, and each
test checks the outputs of its cells, as a notebook's front end would show them.

One kernel runs every cell (a kernel takes a second or two to start). It is this test run's
interpreter, through a kernelspec written for it, so a fresh virtual environment needs no
kernel installed. Functions are defined in cells, as a notebook's are: they live in the
kernel's ``__main__``, which has no file a spawned worker could import.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

import pytest

_WHY = "the notebook tests need {} (in the test extra: pip install -e '.[test]')"
nbformat = pytest.importorskip("nbformat", reason=_WHY.format("nbformat"))
nbclient = pytest.importorskip("nbclient", reason=_WHY.format("nbclient"))
if importlib.util.find_spec("ipykernel") is None:  # the kernel imports it, not this process
    pytest.skip(_WHY.format("ipykernel"), allow_module_level=True)
WIDGETS_INSTALLED = importlib.util.find_spec("ipywidgets") is not None

pytestmark = pytest.mark.timeout(180)  # the whole notebook runs in the first test's setup

SETUP = """
import json, os, sys, time
import psutil
sys.modules["ipywidgets"] = None  # until the widget cell: tqdm draws text, as without ipywidgets
import autopar
from autopar import parallel_loop

def children_left():
    \"\"\"The kernel's live child processes, forkserver and resource tracker left out.\"\"\"
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                command = " ".join(child.cmdline())
                if "forkserver" not in command and "resource_tracker" not in command:
                    found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found
"""

LOOP = """
@parallel_loop(workers=2, start_method="{method}", capture_output=True)
def say_{method}(x):
    time.sleep(0.01 * ((11 - x) % 4))  # later iterations often finish first
    print("line", x, end="")
    print(" from", "a worker" if os.getpid() != KERNEL else "the kernel")
    return x * x

KERNEL = os.getpid()
print(list(say_{method}.map(range(12))))
"""

THREADS = """
@parallel_loop(workers=2, backend="thread", capture_output=True)
def say_in_thread(x):
    time.sleep(0.01 * ((11 - x) % 4))
    print("line", x)
    return x

print(list(say_in_thread.map(range(12))))
"""

FAILS = """
@parallel_loop(workers=2, start_method="spawn")
def fails(x):
    if x == 3:
        raise ValueError("bad value 3")
    return x

fails.map(range(6))
"""

PROGRESS = """
@parallel_loop(workers=2, start_method="spawn", capture_output=True, progress=True)
def squares(x):
    time.sleep(0.02)
    print("line", x)
    return x * x

{call}
"""

WIDGETS = """
del sys.modules["ipywidgets"]
for name in [name for name in sys.modules if name.split(".")[0] == "tqdm"]:
    del sys.modules[name]  # tqdm.auto chooses between text and widget when imported
try:
    import ipywidgets
except ImportError:
    pass  # the widget test skips
"""

INTERRUPTED = """
autopar.shutdown()  # no warm pool: every worker left after this cell is this loop's

@parallel_loop(workers=2, start_method="{method}")
def sleeps(x):
    open(os.path.join({marks!r}, str(os.getpid())), "w").close()
    time.sleep(60)
    return x

sleeps.map(range(8))
"""

AFTER_INTERRUPT = """
deadline = time.monotonic() + 5  # a moment for the workers to be gone
while children_left() and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({{"left": children_left(), "ran_in": sorted(int(pid) for pid in os.listdir({marks!r}))}}))
"""

CELLS = {
    "setup": SETUP,
    "spawn": LOOP.format(method="spawn"),
    "fork": LOOP.format(method="fork"),
    "thread": THREADS,
    "fails": FAILS,
    "text-bar": PROGRESS.format(call="print(list(squares.map(range(12))))"),
    "text-bar-as-completed": PROGRESS.format(call="print(sorted(squares.as_completed(range(12))))"),
    "widgets": WIDGETS,
    "widget-bar": PROGRESS.format(call="print(list(squares.map(range(12))))"),
    "interrupt-spawn": INTERRUPTED.format(method="spawn", marks="marks-spawn"),
    "after-interrupt-spawn": AFTER_INTERRUPT.format(marks="marks-spawn"),
    "interrupt-fork": INTERRUPTED.format(method="fork", marks="marks-fork"),
    "after-interrupt-fork": AFTER_INTERRUPT.format(marks="marks-fork"),
}
SQUARES = [x * x for x in range(12)]


class Ran:
    """The executed notebook, with what the test saw around it."""

    def __init__(self, notebook: Any, kernel_log: str, interrupts: dict[str, float]) -> None:
        self.cells = {cell.id: cell for cell in notebook.cells}
        self.widgets = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        self.kernel_log = kernel_log
        self.interrupts = interrupts  # cell id -> seconds from the interrupt to the cell's end

    def outputs(self, cell: str, kind: str) -> list[Any]:
        return [output for output in self.cells[cell].outputs if output.output_type == kind]

    def stream(self, cell: str, name: str) -> str:
        return "".join(output.text for output in self.outputs(cell, "stream") if output.name == name)

    def no_error(self, cell: str) -> None:
        errors = self.outputs(cell, "error")
        assert not errors, _plain("\n".join(errors[0].traceback))


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """Run the notebook once in a kernel of this interpreter; interrupt the cells tagged so,
    as Ctrl-C (the kernel's interrupt button) does, once their loop's workers are running."""
    home = tmp_path_factory.mktemp("notebook")
    spec = home / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    for marks in ("marks-spawn", "marks-fork"):
        (home / marks).mkdir()

    notebook = nbformat.v4.new_notebook()
    for name, source in CELLS.items():
        cell = nbformat.v4.new_code_cell(source.strip())
        cell.id = name
        if name.startswith("interrupt") or name == "fails":
            cell.metadata["tags"] = ["raises-exception"]
        notebook.cells.append(cell)

    interrupts: dict[str, float] = {}
    started: dict[str, float] = {}
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(home)}}
    )

    async def interrupt_when_running(name: str) -> None:
        marks = home / f"marks-{name.split('-')[-1]}"
        deadline = time.monotonic() + 30
        while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:  # both workers in an iteration
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        started[name] = time.monotonic()
        await client.km.interrupt_kernel()

    tasks: list[asyncio.Task[None]] = []

    def on_cell_execute(cell: Any, cell_index: int) -> None:
        if cell.id.startswith("interrupt"):
            tasks.append(asyncio.ensure_future(interrupt_when_running(cell.id)))

    def on_cell_executed(cell: Any, cell_index: int, execute_reply: Any) -> None:
        if cell.id in started:
            interrupts[cell.id] = time.monotonic() - started[cell.id]

    client.on_cell_execute = on_cell_execute
    client.on_cell_executed = on_cell_executed
    log = home / "kernel.log"
    with pytest.MonkeyPatch.context() as patch, log.open("w") as kernel_output:
        patch.setenv("JUPYTER_PATH", str(home / "jupyter"))  # searched first: this interpreter's kernel
        patch.setenv("JUPYTER_RUNTIME_DIR", str(home / "runtime"))  # its connection file
        patch.setenv("IPYTHONDIR", str(home / "ipython"))  # no profile or startup files of the user's
        client.execute(stdout=kernel_output, stderr=kernel_output)
    return Ran(notebook, log.read_text(), interrupts)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_function_defined_in_a_cell_runs_in_workers(ran: Ran, method: str) -> None:
    ran.no_error(method)
    assert ran.stream(method, "stdout").splitlines()[-1] == str(SQUARES)


@pytest.mark.parametrize("method", ["spawn", "fork", "thread"])
def test_printed_lines_land_in_the_cell_in_input_order(ran: Ran, method: str) -> None:
    ran.no_error(method)
    where = " from a worker" if method != "thread" else ""
    assert ran.stream(method, "stdout").splitlines()[:12] == [f"line {x}{where}" for x in range(12)]
    assert ran.stream(method, "stderr") == ""
    assert "line 3" not in ran.kernel_log  # nothing went to the kernel's terminal instead


def test_a_failure_shows_its_iteration_in_the_cell(ran: Ran) -> None:
    [error] = ran.outputs("fails", "error")
    assert (error.ename, error.evalue) == ("ValueError", "bad value 3")
    traceback = _plain("\n".join(error.traceback))
    assert "iteration 3: fails(3)" in traceback
    assert 'raise ValueError("bad value 3")' in traceback  # the worker's traceback, as the cause


@pytest.mark.parametrize("cell", ["text-bar", "text-bar-as-completed"])
def test_without_ipywidgets_the_bar_is_one_output_updated_in_place(ran: Ran, cell: str) -> None:
    """tqdm's text bar on the cell's stderr would be cut into pieces by the printed lines (and
    tqdm.auto warns that ipywidgets is missing): the cell would show every piece."""
    ran.no_error(cell)
    [bar] = ran.outputs(cell, "display_data")
    assert re.match(r"squares: 100%\|█+\| 12/12 \[", bar.data["text/plain"]), bar.data
    assert ran.stream(cell, "stderr") == ""
    lines = ran.stream(cell, "stdout").splitlines()
    if cell == "text-bar":
        assert lines == [f"line {x}" for x in range(12)] + [str(SQUARES)]
    else:
        assert sorted(lines[:12], key=lambda line: int(line.split()[1])) == [f"line {x}" for x in range(12)]


@pytest.mark.skipif(not WIDGETS_INSTALLED, reason=_WHY.format("ipywidgets"))
def test_with_ipywidgets_the_bar_is_a_widget_that_finishes(ran: Ran) -> None:
    ran.no_error("widgets")
    ran.no_error("widget-bar")
    [bar] = ran.outputs("widget-bar", "display_data")
    model = ran.widgets["state"][bar.data["application/vnd.jupyter.widget-view+json"]["model_id"]]
    progress = [ran.widgets["state"][child.removeprefix("IPY_MODEL_")]["state"] for child in model["state"]["children"]]
    [state] = [state for state in progress if "bar_style" in state]
    assert (state["value"], state["max"], state["bar_style"]) == (12, 12, "success")
    assert ran.stream("widget-bar", "stderr") == ""
    assert ran.stream("widget-bar", "stdout").splitlines() == [f"line {x}" for x in range(12)] + [str(SQUARES)]


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_interrupting_the_kernel_stops_the_loop_and_its_workers(ran: Ran, method: str) -> None:
    [error] = ran.outputs(f"interrupt-{method}", "error")
    assert error.ename == "KeyboardInterrupt"
    assert ran.interrupts[f"interrupt-{method}"] < 10  # not the iterations' 60 s
    ran.no_error(f"after-interrupt-{method}")
    after = json.loads(ran.stream(f"after-interrupt-{method}", "stdout"))
    assert len(after["ran_in"]) == 2, "the loop's workers were not running when the kernel was interrupted"
    assert after["left"] == []
