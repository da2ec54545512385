"""Functions defined in __main__ (scripts, notebooks) work under every start method."""

from __future__ import annotations

import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import run_script

pytestmark = pytest.mark.contract

SCRIPT = """
    import pickle
    import sys
    import cloudpickle
    from autopar import LoopFunction, parallel_loop

    offset = 0.5

    @parallel_loop(workers=2, start_method=sys.argv[1])
    def calc_stuff(parameter):
        if parameter == 3 * offset:
            raise ValueError("three")  # failing line
        return parameter, parameter * 2, -parameter

    class Point:
        def __init__(self, x):
            self.x = x

    @parallel_loop(workers=2, start_method=sys.argv[1])
    def factorial(n):
        return 1 if n <= 1 else n * factorial(n - 1)  # calls itself: its pickle refers back to it

    class Base:
        def scale(self, x):
            return x

    class Scaled(Base):
        @parallel_loop(workers=2, start_method=sys.argv[1])
        def scale(self, x):
            return 10 * super().scale(x)  # super(): the method refers to its own class

    if __name__ == "__main__":
        out1, out2, out3 = calc_stuff.options(on_error="collect").map(j * offset for j in range(6)).unzip()
        print("outputs", out1, out2, out3)
        res = calc_stuff.options(on_error="collect").map([3 * offset])
        print("traceback", res.failures[0].traceback)
        points = parallel_loop(lambda p: p.x + 1, workers=2, start_method=sys.argv[1]).map([Point(1), Point(2)])
        print("points", list(points))
        print("factorials", list(factorial.map(range(6))), pickle.loads(pickle.dumps(factorial))(4))
        print("scaled", list(Scaled().scale.map([1, 2])))
        restored = cloudpickle.loads(cloudpickle.dumps(calc_stuff))
        print("restored", type(restored).__name__, isinstance(restored, LoopFunction))
"""


def test_main_module_functions_classes_and_lambdas(tmp_path: Path, start_method: str) -> None:
    """A script's own function, class and lambda run on workers; tracebacks name its lines."""
    out = run_script(SCRIPT, tmp_path, start_method).stdout
    assert "outputs [0.0, 0.5, 1.0, None, 2.0, 2.5] [0.0, 1.0, 2.0, None, 4.0, 5.0]" in out
    assert f'File "{tmp_path / "script.py"}", line 12, in calc_stuff' in out
    assert 'raise ValueError("three")  # failing line' in out
    assert "points [2, 3]" in out
    assert "factorials [1, 1, 2, 6, 24, 120] 24" in out and "scaled [10, 20]" in out
    assert "restored LoopFunction True" in out


NOTEBOOK = r"""
    import sys
    from autopar import parallel_loop

    source = (
        "def cell_function(x):\n"
        "    if x == 2:\n"
        "        raise KeyError('cell')  # cell line\n"
        "    return x * 3\n"
    )
    namespace = {"__name__": "__main__"}
    # What a notebook does: compile a cell under a pseudo file name known only to linecache.
    import linecache
    linecache.cache["<ipython-input-1>"] = (len(source), None, source.splitlines(True), "<ipython-input-1>")
    exec(compile(source, "<ipython-input-1>", "exec"), namespace)

    if __name__ == "__main__":
        fn = parallel_loop(namespace["cell_function"], workers=2, start_method=sys.argv[1], on_error="collect")
        res = fn.map(range(4))
        print("values", list(res))
        print(res.failures[0].traceback)
"""


def test_notebook_cell_functions_run_and_show_their_source(tmp_path: Path, start_method: str) -> None:
    """A function compiled from a notebook cell runs; the parent fills in its source lines."""
    out = run_script(NOTEBOOK, tmp_path, start_method).stdout
    assert "values [0, 3, None, 9]" in out
    assert 'File "<ipython-input-1>", line 3, in cell_function' in out
    assert "raise KeyError('cell')  # cell line" in out


INITIALIZED_SCRIPT = """
    import sys
    from functools import partial
    from autopar import parallel_loop

    MODEL = None
    SCALE = 1

    def load_model(offset):
        global MODEL
        MODEL = lambda x: x + offset

    def helper(x):
        return MODEL(x) * SCALE

    @parallel_loop(workers=2, start_method=sys.argv[1], initializer=load_model, initargs=(100,))
    def predict(x):
        return helper(x)

    class Predictor:  # a callable object, its initializer a partial
        def __call__(self, x):
            return MODEL(x)

    if __name__ == "__main__":
        SCALE = 2  # the parent's globals still travel with the function
        print("first", list(predict.map(range(4))))
        SCALE = 3  # and a later loop on the same warm workers sees the new value
        print("second", list(predict.map(range(2))))
        other = parallel_loop(Predictor(), workers=2, start_method=sys.argv[1], initializer=partial(load_model, 7))
        print("object", list(other.map(range(2))))
"""


def test_a_script_initializer_sets_globals_its_loop_function_reads(tmp_path: Path, start_method: str) -> None:
    """The multiprocessing pattern: the initializer assigns a module global, the function and
    its helpers read it. A script's functions travel by value, each with a copy of the
    script's globals; the worker hands them what the initializer assigned."""
    out = run_script(INITIALIZED_SCRIPT, tmp_path, start_method).stdout
    assert "first [200, 202, 204, 206]" in out
    assert "second [300, 303]" in out
    assert "object [7, 8]" in out


UNGUARDED = """
    import os
    from autopar import parallel_loop

    print("ran in", os.getpid(), flush=True)  # by the script, and by each worker that imports it

    @parallel_loop(workers=2, {options})
    def square(x):
        return x * x

    print(list(square.map(range(10))))
"""


def _line_of(source: str, statement: str) -> int:
    """The number of the line that holds just ``statement``, in the script `run_script`
    writes from ``source``."""
    lines = textwrap.dedent(source).splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.strip() == statement)


@pytest.mark.parametrize(
    "options", ['start_method="spawn"', 'start_method="forkserver"', "max_tasks_per_worker=3"], ids=str
)
def test_a_script_without_a_main_guard_gets_one_error_naming_the_line(tmp_path: Path, options: str) -> None:
    """Spawned or forkserver workers import the script again, and would start its loop there:
    each one exits quietly, and the script stops with one error, which names the line to guard.
    No worker traceback reaches stderr, and no process is left behind."""
    source = UNGUARDED.format(options=options)
    result = run_script(source, tmp_path, check=False)
    script = tmp_path / "script.py"
    assert result.returncode == 1
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "RuntimeError" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"autopar.WorkerCrashed: put line {_line_of(source, 'print(list(square.map(range(10))))')} of {script}, "
        '`print(list(square.map(range(10))))`, under `if __name__ == "__main__":`: each new worker '
        "process (started by spawn or forkserver, as with max_tasks_per_worker) imports the script, "
        "and would start this loop again there"
    )
    pids = [int(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("ran in")]
    assert len(pids) >= 2, result.stdout  # the script, and at least one worker
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_the_line_to_guard_is_the_top_level_statement_whatever_on_error(tmp_path: Path) -> None:
    """A loop reached through ``main()`` names the line ``main()`` (the one to guard), and is
    raised as the loop's error under on_error="collect" too: no iteration could ever run."""
    source = """
        from autopar import parallel_loop

        @parallel_loop(workers=2, start_method="spawn", on_error="collect")
        def square(x):
            return x * x

        def main():
            for value in square.imap(range(4)):
                print(value)

        main()
    """
    result = run_script(source, tmp_path, check=False)
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"autopar.WorkerCrashed: put line {_line_of(source, 'main()')} of {tmp_path / 'script.py'}, `main()`, "
    )


def test_a_guarded_loop_does_not_take_the_blame_for_an_unguarded_one(tmp_path: Path) -> None:
    """The script runs a guarded loop; its workers stop at another loop, outside the guard:
    the error names no line (the guarded one would mislead), only what to do."""
    source = """
        from autopar import parallel_loop

        @parallel_loop(workers=2, start_method="forkserver")
        def square(x):
            return x * x

        if __name__ == "__main__":
            print(list(square.map(range(4))))

        TABLE = list(square.map(range(3)))
    """
    result = run_script(source, tmp_path, check=False)
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"autopar.WorkerCrashed: put the loops at the top level of {tmp_path / 'script.py'} under "
        '`if __name__ == "__main__":`: each new worker process (started by spawn or forkserver, as with '
        "max_tasks_per_worker) imports the script, and would start a loop there"
    )


def test_another_process_importing_an_unguarded_script_still_says_why_it_stops(tmp_path: Path) -> None:
    """Only autopar's own workers exit quietly (their parent explains): a process of the
    script's own, which imports it, fails loudly, or it would die without a word."""
    source = """
        import multiprocessing
        import sys
        from autopar import parallel_loop

        @parallel_loop(workers=2, start_method="spawn")
        def square(x):
            return x * x

        if __name__ == "__main__":
            child = multiprocessing.get_context("spawn").Process(target=print, args=("child ran",))
            child.start()
            child.join()
            print("child exit code", child.exitcode)
            sys.exit(0)

        print(list(square.map(range(3))))
    """
    result = run_script(source, tmp_path)
    assert "child exit code 1" in result.stdout and "child ran" not in result.stdout
    assert "RuntimeError: a loop started while a new worker process imports your main module" in result.stderr
