"""Writes a process pool loses: which module globals a function reads and writes."""

from __future__ import annotations

import collections
import functools
import os
import types
from collections.abc import Callable
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


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    """Each test starts with empty globals."""
    CACHE.clear()
    SEEN.clear()


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


def test_pyplot_functions_imported_by_name_are_plotting_too() -> None:
    pytest.importorskip("matplotlib")
    namespace: dict[str, Any] = {}
    exec("from matplotlib.pyplot import plot\nimport numpy\ndef f(x):\n    plot(numpy.arange(x))", namespace)
    assert plotting_names(namespace["f"]) == {"plot"}
    assert plotting_names(only_reads) == frozenset()
