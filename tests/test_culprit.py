"""A loop function or keyword argument that cannot be pickled: the error names the part that fails."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import pytest

from autopar import SerializationError, parallel_loop

LOCK = threading.Lock()
PREFIX = r"^the function {} could not be pickled, so no iteration can run: "


class Model:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scale = 2

    @parallel_loop(workers=2, on_error="collect")
    def predict(self, x: int) -> int:
        with self.lock:
            return x * self.scale


class Logged:
    def __init__(self, log: TextIO) -> None:
        self.log = log

    @parallel_loop(workers=2)
    def record(self, x: int) -> int:
        self.log.write(f"{x}\n")
        return x


def scale(x: int, lock: Any = None) -> int:
    return 2 * x


def test_a_method_whose_instance_holds_a_lock_names_the_attribute() -> None:
    """Raised before any iteration runs, even under on_error="collect"; its cause is the
    lock's own pickling error."""
    with pytest.raises(SerializationError) as caught:
        Model().predict.map(range(4))
    assert str(caught.value) == (
        "the function Model.predict could not be pickled, so no iteration can run: its instance's "
        "attribute 'lock' (a _thread.lock) cannot be pickled: TypeError: cannot pickle '_thread.lock' object"
    )
    assert isinstance(caught.value.__cause__, TypeError)


def test_an_open_file_attribute_is_named(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as log, pytest.raises(SerializationError) as caught:
        Logged(log).record.map(range(4))
    assert str(caught.value).startswith(
        "the function Logged.record could not be pickled, so no iteration can run: its instance's "
        "attribute 'log' (a _io.TextIOWrapper) cannot be pickled: "
    )


def test_a_closure_over_a_lock_names_the_variable() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=PREFIX.format(r"\S*<lambda>") + "its closure variable 'lock' "):
        parallel_loop(lambda x: x if lock else 0, workers=2).map(range(3))


def test_a_global_read_by_a_function_sent_by_value_is_named() -> None:
    def locked(x: int) -> int:  # a local function travels by value, with the globals it reads
        with LOCK:
            return x

    with pytest.raises(SerializationError, match=PREFIX.format(r"\S*locked") + r"its global 'LOCK' \(a _thread.lock\)"):
        parallel_loop(locked, workers=2).map(range(3))


def test_a_partials_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"its keyword argument 'lock' \(a _thread.lock\) cannot be pickled"):
        parallel_loop(functools.partial(scale, lock=threading.Lock()), workers=2).map(range(3))


def test_a_keyword_argument_is_looked_into_one_level() -> None:
    """Which keyword argument fails, and which of its attributes or items."""
    calc = parallel_loop(scale, workers=2)
    with pytest.raises(SerializationError) as caught:
        calc.map(range(3), lock=Model())
    assert str(caught.value) == (
        "keyword argument 'lock' could not be pickled, so no iteration can run: its attribute 'lock' "
        "(a _thread.lock) cannot be pickled: TypeError: cannot pickle '_thread.lock' object"
    )
    with pytest.raises(SerializationError, match=r"^keyword argument 'lock' .*: its item 'guard' \(a _thread.lock\)"):
        calc.map(range(3), lock={"size": 3, "guard": LOCK})


@pytest.mark.parametrize("backend", ["serial", "thread"])
def test_backends_that_do_not_pickle_run_such_loops(backend: str) -> None:
    lock = threading.Lock()
    loops: list[Callable[[], Any]] = [
        lambda: Model().predict.options(backend=backend).map(range(4)),
        lambda: parallel_loop(lambda x: 2 * x if lock else 0, backend=backend).map(range(4)),
        lambda: parallel_loop(scale, backend=backend).map(range(4), lock=Model()),
    ]
    for loop in loops:
        assert list(loop()) == [0, 2, 4, 6]
