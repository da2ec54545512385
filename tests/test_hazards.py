"""Writes a process pool loses: which globals a function writes, and the warning about them."""

from __future__ import annotations

import collections
import functools
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import pytest

from autopar import _hazards, parallel_loop
from autopar._hazards import global_names, plotting_names

CACHE: dict[int, int] = {}
SEEN: list[int] = []
COUNTS: collections.Counter[int] = collections.Counter()
QUEUE: collections.deque[int] = collections.deque()
STATE = types.SimpleNamespace(last=0, items=[], table={})
TOTAL = 0
LIMIT = 10
PROCESS = {"backend": "process", "workers": 2}

# Python 3.12+ warns when forking a process with threads (pytest's own); pytest.warns records
# that warning along with ours and gives it back at the end, failing the test under "error".
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """Each test starts with empty globals and no function warned about yet."""
    _hazards._warned.clear()
    CACHE.clear()
    SEEN.clear()
    yield
    _hazards._warned.clear()


# -- global_names ---------------------------------------------------------------------------


def set_total(x: int) -> None:
    global TOTAL
    TOTAL = x


def count_one(x: int) -> None:
    global TOTAL
    TOTAL += 1


def forget_total(x: int) -> None:
    global TOTAL
    del TOTAL


def remember(x: int) -> None:
    SEEN.append(x)


def fill_cache(x: int) -> None:
    CACHE[x] = x * x


def set_last(x: int) -> None:
    STATE.last = x


def count_into(x: int) -> None:
    COUNTS[x] += 1


def forget(x: int) -> None:
    del CACHE[x]


def fill_nested(x: int) -> None:
    STATE.table[x] = x  # an element of an attribute of the global


def append_to_attribute(x: int) -> None:
    STATE.items.append(x)


def chained(x: int) -> None:
    CACHE.setdefault(x, 0).bit_length()


def key_from_a_call(x: int) -> None:
    CACHE[len(SEEN) + x] = x


def in_a_loop(xs: list[int]) -> None:
    for x in xs:
        if x > LIMIT:
            CACHE[x] = x


def only_reads(x: int) -> int:
    return CACHE.get(x, 0) + len(SEEN) + STATE.last + LIMIT + COUNTS[x]


def changes_locals_only(x: int) -> dict[int, int]:
    mine: dict[int, int] = {}
    mine[x] = x
    mine.update({x: 1})
    items: list[int] = []
    items.append(x)
    return mine


def calls_module_functions(path: str) -> None:
    os.remove(path)  # a mutating name, but a module's function: no global changes
    os.path.join(path, "x")


def inner_function(x: int) -> None:
    def add() -> None:
        SEEN.append(x)

    add()


def inner_lambda(x: int) -> None:
    (lambda: CACHE.update({x: x}))()


def inner_comprehension(xs: list[int]) -> list[None]:
    return [SEEN.append(x) for x in xs]


def inner_generator(xs: list[int]) -> int:
    return sum(CACHE.pop(x) for x in xs)


class Recorder:
    def record(self, x: int) -> None:
        CACHE[x] = x

    @classmethod
    def record_class(cls, x: int) -> None:
        SEEN.append(x)

    def __call__(self, x: int) -> None:
        COUNTS.update([x])


@pytest.mark.parametrize(
    ("function", "reads", "writes"),
    [
        (set_total, set(), {"TOTAL"}),
        (count_one, {"TOTAL"}, {"TOTAL"}),
        (forget_total, set(), {"TOTAL"}),
        (remember, {"SEEN"}, {"SEEN"}),
        (fill_cache, {"CACHE"}, {"CACHE"}),
        (set_last, {"STATE"}, {"STATE"}),
        (count_into, {"COUNTS"}, {"COUNTS"}),
        (forget, {"CACHE"}, {"CACHE"}),
        (fill_nested, {"STATE"}, {"STATE"}),
        (append_to_attribute, {"STATE"}, {"STATE"}),
        (chained, {"CACHE"}, {"CACHE"}),
        (key_from_a_call, {"CACHE", "SEEN"}, {"CACHE"}),
        (in_a_loop, {"CACHE", "LIMIT"}, {"CACHE"}),
        (only_reads, {"CACHE", "SEEN", "STATE", "LIMIT", "COUNTS"}, set()),
        (changes_locals_only, set(), set()),
        (calls_module_functions, {"os"}, set()),
        (inner_function, {"SEEN"}, {"SEEN"}),
        (inner_lambda, {"CACHE"}, {"CACHE"}),
        (inner_comprehension, {"SEEN"}, {"SEEN"}),
        (inner_generator, {"CACHE"}, {"CACHE"}),
        (Recorder.record, {"CACHE"}, {"CACHE"}),
        (Recorder().record, {"CACHE"}, {"CACHE"}),
        (Recorder.record_class, {"SEEN"}, {"SEEN"}),
        (Recorder(), {"COUNTS"}, {"COUNTS"}),
        (functools.partial(fill_cache, 3), {"CACHE"}, {"CACHE"}),
        (parallel_loop(fill_cache), {"CACHE"}, {"CACHE"}),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_global_names_finds_reads_and_writes(function: Callable[..., Any], reads: set[str], writes: set[str]) -> None:
    """Reads and writes of module globals, changes in place included; builtins left out."""
    assert global_names(function) == (frozenset(reads), frozenset(writes))


@pytest.mark.parametrize(
    "method",
    [
        "append",
        "extend",
        "insert",
        "add",
        "update",
        "setdefault",
        "pop",
        "popitem",
        "remove",
        "discard",
        "clear",
        "appendleft",
        "extendleft",
        "sort",
        "reverse",
        "__setitem__",
    ],
)
def test_a_mutating_method_called_on_a_global_writes_it(method: str) -> None:
    """`GLOBAL.method(...)`, whatever the arguments, changes the global; another method does not."""
    namespace: dict[str, Any] = {"QUEUE": QUEUE}
    exec(f"def f(x, y):\n    QUEUE.{method}(x, *y, key=len)\ndef g(x):\n    return QUEUE.copy()", namespace)
    assert global_names(namespace["f"]) == (frozenset({"QUEUE"}), frozenset({"QUEUE"}))
    assert global_names(namespace["g"]) == (frozenset({"QUEUE"}), frozenset())


def test_a_bound_loop_function_is_unwrapped() -> None:
    """`obj.method.map(xs)` hands the collector a bound wrapper: its method is analysed."""

    class Model:
        @parallel_loop
        def step(self, x: int) -> None:
            SEEN.append(x)

    assert global_names(Model().step) == (frozenset({"SEEN"}), frozenset({"SEEN"}))


def test_code_without_python_bytecode_has_no_globals() -> None:
    assert global_names(len) == (frozenset(), frozenset())


def test_the_analysis_is_done_once_per_code_object() -> None:
    _hazards._code_globals.cache_clear()
    global_names(fill_cache)
    global_names(parallel_loop(fill_cache))
    info = _hazards._code_globals.cache_info()
    assert (info.misses, info.hits) == (1, 1)


# -- the warning, through real loops ---------------------------------------------------------


def square_into_cache(x: int) -> None:
    CACHE[x] = x * x


def square_and_return(x: int) -> int:
    CACHE[x] = x * x
    return x * x


def does_nothing(x: int) -> None:
    return None


def fails_into_cache(x: int) -> None:
    CACHE[x] = x
    raise ValueError(x)


def add_into_cache(a: int, b: int) -> None:
    CACHE[a] = a + b


def test_a_process_loop_that_fills_a_global_dict_warns_at_the_map_line() -> None:
    """The dict stays empty here: the warning names the function and the global, and says
    what to do instead."""
    loop = parallel_loop(square_into_cache, **PROCESS)
    with pytest.warns(RuntimeWarning) as caught:
        res = loop.map(range(6))
    line = sys._getframe().f_lineno - 1
    assert list(res) == [None] * 6 and CACHE == {}  # what the warning is about
    [warning] = [warning for warning in caught if warning.category is RuntimeWarning]
    message = str(warning.message)
    assert message.startswith("square_into_cache() returned None in every iteration and writes the module global CACHE")
    assert "stayed in the worker processes" in message and "lost here" in message
    assert "return the values and build the dict" in message
    assert "square_into_cache.verify(xs)" in message
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_starmap_and_an_executor_passed_in_warn_as_well() -> None:
    with pytest.warns(RuntimeWarning, match=r"add_into_cache\(\).*CACHE"):
        parallel_loop(add_into_cache, **PROCESS).starmap([(1, 2), (3, 4)])
    with ProcessPoolExecutor(2) as pool, pytest.warns(RuntimeWarning, match=r"square_into_cache\(\).*CACHE"):
        parallel_loop(square_into_cache, backend=pool).map(range(3))
    assert CACHE == {}


@pytest.mark.parametrize("options", [{"backend": "thread", "workers": 2}, {"backend": "serial"}])
def test_in_process_backends_do_not_warn(options: dict[str, Any]) -> None:
    """With threads or serially, the iterations fill this process's dict: nothing is lost."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_loop(square_into_cache, **options).map(range(4))
    assert CACHE == {0: 0, 1: 1, 2: 4, 3: 9}


def test_an_executor_of_threads_passed_in_does_not_warn() -> None:
    with ThreadPoolExecutor(2) as pool, warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_loop(square_into_cache, backend=pool).map(range(4))
    assert len(CACHE) == 4


@pytest.mark.parametrize(
    "function",
    [
        square_and_return,  # returns its values: those are what the loop is for
        does_nothing,  # returns None, but writes no global
        fails_into_cache,  # every iteration failed: the failures say what went wrong
    ],
)
def test_no_warning_unless_every_iteration_returned_none_and_globals_were_written(
    function: Callable[..., Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = parallel_loop(function, on_error="collect", **PROCESS).map(range(4))
    assert len(res) == 4


def test_an_empty_loop_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_loop(square_into_cache, **PROCESS).map([])


def test_warns_once_per_function() -> None:
    loop = parallel_loop(square_into_cache, **PROCESS)
    with pytest.warns(RuntimeWarning, match="CACHE"):
        loop.map(range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.map(range(3))
        loop.options(workers=1).map(range(3))  # the same function, other options
    with pytest.warns(RuntimeWarning, match="add_into_cache"):  # another function: its own warning
        parallel_loop(add_into_cache, **PROCESS).starmap([(1, 2)])


def test_a_loop_that_returns_values_is_not_analysed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first value is enough to know there is nothing to warn about."""

    def refuse(*args: Any) -> None:
        raise AssertionError("analysed")

    monkeypatch.setattr(_hazards, "global_names", refuse)
    monkeypatch.setattr(_hazards, "plotting_names", refuse)
    assert list(parallel_loop(square_and_return, **PROCESS).map(range(3))) == [0, 1, 4]


def test_a_loop_drawing_with_pyplot_warns() -> None:
    """The subplots were drawn in the workers' figures: none appears here."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from _drawing import draw_panel

    assert plotting_names(draw_panel) == {"plt"}
    plt.figure()
    try:
        with pytest.warns(RuntimeWarning) as caught:
            parallel_loop(draw_panel, **PROCESS).map(range(5))
        assert plt.gcf().axes == []
    finally:
        plt.close("all")
    [warning] = [warning for warning in caught if warning.category is RuntimeWarning]
    message = str(warning.message)
    assert message.startswith("draw_panel() returned None in every iteration and draws with matplotlib.pyplot")
    assert "draw in this process from the loop's result" in message
    assert "draw_panel.verify(xs)" in message


def test_pyplot_functions_imported_by_name_are_plotting_too() -> None:
    pytest.importorskip("matplotlib")
    namespace: dict[str, Any] = {}
    exec("from matplotlib.pyplot import plot\nimport numpy\ndef f(x):\n    plot(numpy.arange(x))", namespace)
    assert plotting_names(namespace["f"]) == {"plot"}
    assert plotting_names(only_reads) == frozenset()
