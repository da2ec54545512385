"""Functions defined in __main__ (scripts, notebooks) work under every start method."""

from __future__ import annotations

from pathlib import Path

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
