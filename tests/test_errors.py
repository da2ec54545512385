"""Failed iterations: raised as their own type, or collected, and never lost."""

from __future__ import annotations

import asyncio
import copyreg
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import autopar
from _helpers import (
    Abort,
    NeedsTwoArgs,
    RefusesPickling,
    UnprintableError,
    fail_on,
    fail_slow_then_fast,
    first_even,
    raise_base,
    raise_needs_two,
    raise_odd_exceptions,
    raise_refuses_pickling,
    raise_unpicklable,
    raise_with_fields,
    return_breaks_on_load,
    return_lock,
    square,
)
from autopar import Failure, LoopResult, RemoteError, RemoteTraceback, SerializationError, parallel_loop


@pytest.mark.contract
def test_raise_reraises_the_original_type_with_a_note(any_backend: dict[str, Any]) -> None:
    """on_error='raise' raises the original type; its note names the iteration and arguments."""
    calc = parallel_loop(fail_on, **any_backend)
    with pytest.raises(ValueError, match="bad value 3") as info:
        calc.map(range(6), bad=(3,))
    notes = info.value.__notes__
    assert notes[0].startswith("iteration 3: fail_on(3, bad=(3,))")


@pytest.mark.contract
def test_raise_attaches_the_worker_traceback_and_partial_result(any_backend: dict[str, Any]) -> None:
    """The worker traceback is text in __cause__ (out of process); partial results are kept."""
    calc = parallel_loop(fail_on, chunksize=1, **any_backend)
    with pytest.raises(ValueError) as info:
        calc.map(range(8), bad=(5,))
    err = info.value
    if any_backend["backend"] == "process":
        assert isinstance(err.__cause__, RemoteTraceback)
        assert "_helpers.py" in str(err.__cause__) and "raise exc_type" in str(err.__cause__)
    partial = err.partial_result  # type: ignore[attr-defined]
    assert isinstance(partial, LoopResult)
    assert [f.index for f in partial.failures] == [5]
    done = [i for i in range(len(partial)) if i not in partial.missing and i != 5]
    assert all(partial[i] == i * 10 for i in done)
    if any_backend["backend"] == "serial":
        assert done == [0, 1, 2, 3, 4] and partial.missing == []


@pytest.mark.contract
def test_raise_raises_the_earliest_failure_whatever_finishes_first(any_backend: dict[str, Any]) -> None:
    """As the old loop would: iteration 0's error, though iteration 5 failed earlier in time."""
    calc = parallel_loop(fail_slow_then_fast, chunksize=1, **any_backend)
    with pytest.raises(FileNotFoundError, match=r"input_0\.csv") as info:
        calc.map(range(10))
    assert info.value.__notes__[0].startswith("iteration 0:")
    assert 0 not in info.value.partial_result.missing  # type: ignore[attr-defined]


def test_except_clause_of_the_old_loop_still_catches(backend: dict[str, Any]) -> None:
    """An existing `except KeyError:` around the loop keeps working."""
    calc = parallel_loop(fail_on, **backend)
    try:
        calc.map(range(5), bad=(2,), exc_type=KeyError)
    except KeyError as err:
        assert "iteration 2" in err.__notes__[0]
    else:  # pragma: no cover
        pytest.fail("KeyError was not raised")


@pytest.mark.contract
def test_collect_runs_every_iteration_and_reports_failures(any_backend: dict[str, Any]) -> None:
    """on_error='collect' keeps every good result, fills failed slots, lists each Failure."""
    calc = parallel_loop(fail_on, on_error="collect", **any_backend)
    res = calc.map(range(10), bad=(2, 7))
    assert not res.ok
    assert list(res) == [0, 10, None, 30, 40, 50, 60, None, 80, 90]
    assert [f.index for f in res.failures] == [2, 7] and res.stats.failed == 2
    failure = res.failures[0]
    assert isinstance(failure, Failure)
    assert failure.args == (2,) and failure.kwargs == {"bad": (2, 7)} and failure.attempts == 1
    assert type(failure.exception) is ValueError and str(failure.exception) == "bad value 2"
    assert "Traceback" in failure.traceback and "bad value 2" in failure.traceback
    with pytest.raises(ExceptionGroup) as group:
        res.raise_failures()
    assert [str(e) for e in group.value.exceptions] == ["bad value 2", "bad value 7"]


def test_collect_keeps_unzipped_outputs_aligned(backend: dict[str, Any]) -> None:
    """Failed slots hold the fill value in every unzipped list."""

    def pair(x: int) -> tuple[int, int]:
        if x == 1:
            raise ValueError(x)
        return x, -x

    res = parallel_loop(pair, on_error="collect", **backend).map(range(3))
    assert res.unzip() == ([0, None, 2], [0, None, -2])
    assert res.unzip(fill=-1) == ([0, -1, 2], [0, -1, -2])


def test_raise_failures_is_a_no_op_when_ok(backend: dict[str, Any]) -> None:
    res = parallel_loop(square, **backend).map(range(3))
    res.raise_failures()


def test_imap_raises_at_the_failed_position(backend: dict[str, Any]) -> None:
    """imap yields the results before the failure, then raises the original type."""
    it = parallel_loop(fail_on, chunksize=1, **backend).imap(range(6), bad=(3,))
    got = []
    with pytest.raises(ValueError, match="bad value 3"):
        for value in it:
            got.append(value)
    assert got == [0, 10, 20]


def test_imap_names_the_iteration_whose_stop_iteration_it_cannot_pass_on(backend: dict[str, Any]) -> None:
    """Raised from an iterator, StopIteration would end the caller's for loop, silently short:
    a RuntimeError caused by it, as from a generator (PEP 479), names the iteration."""
    got = []
    with pytest.raises(RuntimeError, match="iteration 1 raised StopIteration") as caught:
        for value in parallel_loop(first_even, chunksize=1, **backend).imap([[1, 2], [3, 5], [4]]):
            got.append(value)
    assert got == [2]
    cause = caught.value.__cause__
    assert isinstance(cause, StopIteration) and cause.__notes__ == ["iteration 1: first_even([3, 5])"]
    assert [f.index for f in caught.value.partial_result.failures] == [1]  # type: ignore[attr-defined]


def test_imap_collect_yields_none_and_lists_failures(backend: dict[str, Any]) -> None:
    it = parallel_loop(fail_on, on_error="collect", **backend).imap(range(5), bad=(1,))
    assert list(it) == [0, None, 20, 30, 40]
    assert [f.index for f in it.failures] == [1]


def test_retries_try_again_and_count_attempts(backend: dict[str, Any]) -> None:
    """retries=N runs a failing iteration N more times; Failure.attempts counts them."""
    res = parallel_loop(fail_on, retries=2, on_error="collect", **backend).map(range(4), bad=(1,))
    assert [f.attempts for f in res.failures] == [3]
    assert "failed 3 attempts" in res.failures[0].exception.__notes__[0]


def test_retries_recover_a_flaky_iteration(tmp_path: Path) -> None:
    """An iteration that fails once and then succeeds counts as a success."""
    marker = tmp_path / "seen"

    def flaky(x: int) -> int:
        if x == 2 and not marker.exists():
            marker.touch()
            raise OSError("transient")
        return x

    res = parallel_loop(flaky, retries=1, workers=2).map(range(4))
    assert list(res) == [0, 1, 2, 3] and res.ok


# --- Values that cannot cross the process boundary (process backend) ---


def test_unpicklable_argument_fails_only_its_iteration() -> None:
    """An argument that cannot be pickled fails its iteration with a clear message."""
    import threading

    res = parallel_loop(lambda x: type(x).__name__, on_error="collect", workers=2).map([1, threading.Lock(), 3])
    assert res[0] == "int" and res[2] == "int" and res[1] is None
    [failure] = res.failures
    assert failure.index == 1 and isinstance(failure.exception, SerializationError)
    assert str(failure.exception).startswith("arguments of iteration 1 could not be pickled: TypeError")


def test_unpicklable_result_fails_only_its_iteration() -> None:
    """A result that cannot be pickled fails its iteration, naming the stage and the type."""
    res = parallel_loop(return_lock, on_error="collect", workers=2).map(range(4))
    assert [res[i] for i in (0, 1, 3)] == [0, 1, 3]
    [failure] = res.failures
    assert isinstance(failure.exception, SerializationError)
    assert str(failure.exception) == (
        "result of iteration 2 could not be pickled: TypeError: cannot pickle '_thread.lock' object"
    )


def test_result_that_cannot_be_unpickled_fails_only_its_iteration() -> None:
    res = parallel_loop(return_breaks_on_load, on_error="collect", workers=2).map(range(3))
    assert res[0] == 0 and res[2] == 2
    [failure] = res.failures
    assert str(failure.exception).startswith("result of iteration 1 could not be unpickled: RuntimeError")


def test_exception_that_cannot_be_pickled_comes_back_as_a_stand_in() -> None:
    """An exception that refuses pickling arrives as RemoteError with its type name and text."""
    res = parallel_loop(raise_unpicklable, on_error="collect", workers=2).map(range(3))
    [failure] = res.failures
    assert isinstance(failure.exception, RemoteError)
    assert failure.exception.type_name == "_helpers.Unpicklable" and failure.exception.message == "nope"
    assert "raise exc" in failure.traceback
    assert failure.exception.__notes__ == ["raised with a note", "iteration 1: raise_unpicklable(1)"]


def test_exception_that_cannot_be_unpickled_comes_back_as_its_own_type() -> None:
    """An exception whose __init__ needs two arguments is rebuilt without calling __init__."""
    with pytest.raises(NeedsTwoArgs, match="1-2") as info:
        parallel_loop(raise_needs_two, workers=2).map(range(3))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise NeedsTwoArgs(x, 2)" in str(info.value.__cause__)


def test_exception_whose_reduce_refuses_comes_back_as_its_own_type() -> None:
    res = parallel_loop(raise_refuses_pickling, on_error="collect", workers=2).map(range(3))
    assert type(res.failures[0].exception) is RefusesPickling and str(res.failures[0].exception) == "nope"


def test_frozen_exceptions_get_their_note_and_partial_result(backend: dict[str, Any]) -> None:
    """Exceptions that refuse new attributes are still annotated."""

    @dataclass(frozen=True)
    class Frozen(Exception):
        code: int

    @dataclass(frozen=True)
    class Bare(Exception):  # no fields: copy.copy succeeds, then setting __cause__ is refused
        pass

    def boom(x: int) -> int:
        raise Frozen(x) if x else Bare()

    with pytest.raises(Frozen) as info:
        parallel_loop(boom, **backend).map([4])
    assert info.value.__notes__[0].startswith("iteration 0: ")
    res = parallel_loop(boom, on_error="collect", **backend).map([0, 4])
    assert [type(f.exception) for f in res.failures] == [Bare, Frozen]
    assert isinstance(info.value.partial_result, LoopResult)  # type: ignore[attr-defined]


def test_worker_traceback_points_at_the_users_file_and_line(backend: dict[str, Any]) -> None:
    """The traceback text names this file, the failing line and its source."""

    def explode(x: int) -> None:
        raise LookupError(f"no {x}")  # the line the traceback must show

    res = parallel_loop(explode, on_error="collect", **backend).map([1])
    tb_text = res.failures[0].traceback
    assert f'File "{__file__}"' in tb_text
    assert 'raise LookupError(f"no {x}")  # the line the traceback must show' in tb_text
    assert "autopar" not in tb_text.split("\n", 2)[1], "autopar's own frame leaked into the traceback"


def test_sys_exit_in_an_iteration_fails_only_that_iteration(backend: dict[str, Any]) -> None:
    import sys

    def leave(x: int) -> int:
        if x == 1:
            sys.exit(4)
        return x

    res = parallel_loop(leave, on_error="collect", **backend).map(range(3))
    assert res[0] == 0 and res[2] == 2 and isinstance(res.failures[0].exception, SystemExit)


def test_an_exception_that_cannot_be_printed_fails_only_its_iteration(backend: dict[str, Any]) -> None:
    res = parallel_loop(fail_on, on_error="collect", chunksize=8, **backend).map(
        range(8), bad=(4,), exc_type=UnprintableError
    )
    assert [f.index for f in res.failures] == [4] and res[5] == 50
    assert isinstance(res.failures[0].exception, UnprintableError)


@pytest.mark.parametrize("exc_type", [Abort, asyncio.CancelledError, KeyboardInterrupt])
def test_base_exceptions_an_iteration_raises_are_its_failure(backend: dict[str, Any], exc_type: type) -> None:
    """Not only Exception: what an iteration raises is that iteration's failure (a
    KeyboardInterrupt too, raised by the iteration's code, not by Ctrl-C)."""
    if exc_type is KeyboardInterrupt and backend["backend"] == "serial":
        pytest.skip("in-process serial loops take KeyboardInterrupt as Ctrl-C: it must stop the loop")
    calc = parallel_loop(raise_base, chunksize=8, **backend)
    res = calc.options(on_error="collect").map(range(6), exc_type=exc_type)
    assert list(res) == [0, 1, 2, None, 4, 5] and isinstance(res.failures[0].exception, exc_type)
    with pytest.raises(BaseExceptionGroup) as group:
        res.raise_failures()
    assert isinstance(group.value.exceptions[0], exc_type)
    with pytest.raises(exc_type) as info:
        calc.map(range(6), exc_type=exc_type)
    assert info.value.__notes__[0].startswith("iteration 3: raise_base(3")
    assert isinstance(info.value.partial_result, LoopResult)  # type: ignore[attr-defined]


def test_ctrl_c_in_a_serial_loop_stops_it() -> None:
    def interrupted(x: int) -> int:
        if x == 2:
            raise KeyboardInterrupt
        return x

    ran = []
    with pytest.raises(KeyboardInterrupt):
        for value in parallel_loop(interrupted, backend="serial", on_error="collect").imap(range(5)):
            ran.append(value)
    assert ran == [0, 1]


def test_one_exception_object_raised_by_several_iterations_gets_each_its_own_note(backend: dict[str, Any]) -> None:
    prebuilt = LookupError("not found")

    def find(x: int) -> int:
        if x % 2:
            raise prebuilt
        return x

    res = parallel_loop(find, on_error="collect", **backend).map(range(6))
    notes = [failure.exception.__notes__ for failure in res.failures]
    assert notes == [[f"iteration {i}: {find.__qualname__}({i})"] for i in (1, 3, 5)]
    assert [type(failure.exception) for failure in res.failures] == [LookupError] * 3
    # Raised again by later loops, it carries only the latest loop's note, not every loop's.
    prebuilt.add_note("the user's own note")
    for inputs in ([0, 7], [0, 2, 9]):
        with pytest.raises(LookupError) as caught:
            parallel_loop(find, **backend).map(inputs)
        last = len(inputs) - 1
        assert caught.value.__notes__ == ["the user's own note", f"iteration {last}: {find.__qualname__}({inputs[-1]})"]


def _sharing_dict(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls(*args)
    exc.__dict__ = state
    return exc


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_copies_have_notes_of_their_own_under_a_copyreg_reducer(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing Dask installs tblib's reducers, under which copy.copy(exc) shares the
    original's __dict__: every copy of a prebuilt exception then had the last note."""
    monkeypatch.setitem(
        copyreg.dispatch_table, LookupError, lambda exc: (_sharing_dict, (type(exc), exc.args, exc.__dict__))
    )
    prebuilt = LookupError("not found")

    def find(x: int) -> int:
        if x % 2:
            raise prebuilt
        return x

    res = parallel_loop(find, backend=backend, on_error="collect").map(range(6))
    assert [failure.exception.__notes__ for failure in res.failures] == [
        [f"iteration {i}: {find.__qualname__}({i})"] for i in (1, 3, 5)
    ]


def test_an_iterations_exception_is_the_object_it_raised_in_process() -> None:
    """Identity, and all it holds (no copy, no __init__ run again), as with concurrent.futures."""
    raised: list[BaseException] = []

    def boom(x: int) -> int:
        raised.append(MemoryError(x))
        raise raised[-1]

    res = parallel_loop(boom, backend="thread", workers=2, on_error="collect").map(range(3))
    assert all(any(failure.exception is exc for exc in raised) for failure in res.failures)


def test_an_exception_keeps_its_message_and_context(backend: dict[str, Any]) -> None:
    """What the iteration raised, as it was: a message its __init__ formatted (not formatted
    twice), and the exception it was raised while handling."""
    res = parallel_loop(raise_odd_exceptions, on_error="collect", **backend).map([0, 1, 2, 3])
    parse, handled, missing, undecodable = (failure.exception for failure in res.failures)
    assert str(parse) == "bad line 7" and parse.line == 7  # type: ignore[attr-defined]
    assert missing.filename == "input.csv" and str(missing) == "[Errno 2] missing: 'input.csv'"  # type: ignore[attr-defined]
    assert "can't decode byte 0xff in position 0" in str(undecodable)
    if backend["backend"] == "process":  # the context stayed in the worker: its traceback says it
        assert "KeyError" in res.failures[1].traceback and "During handling" in res.failures[1].traceback
    else:
        assert isinstance(handled.__context__, KeyError)


def test_exceptions_keep_their_fields(backend: dict[str, Any]) -> None:
    """State kept outside args and __dict__ (C fields, __slots__) survives, also when a NaN
    argument makes the worker's exception unequal to its own unpickled copy."""
    import math

    calc = parallel_loop(raise_with_fields, on_error="collect", **backend)
    res = calc.map(["oserror", "syntax", "stop_nan", "slots_nan"])
    missing, syntax, stop, residual = (failure.exception for failure in res.failures)
    assert (missing.errno, missing.filename, str(missing)) == (2, "p.txt", "[Errno 2] missing p.txt: 'p.txt'")  # type: ignore[attr-defined]
    assert (syntax.msg, syntax.filename, syntax.lineno, syntax.offset) == ("bad at 5", "cfg.ini", 5, 3)  # type: ignore[attr-defined]
    assert math.isnan(stop.value) and math.isnan(residual.residual)  # type: ignore[attr-defined]


def test_exceptions_round_trip_through_pickle() -> None:
    """autopar's own exceptions survive pickling (they travel between processes)."""
    crashed = autopar.WorkerCrashed("died", exitcode=-9, pid=123)
    copy = pickle.loads(pickle.dumps(crashed))
    assert (str(copy), copy.exitcode, copy.pid, copy.signal_name) == ("died", -9, 123, "SIGKILL")
    stand_in = pickle.loads(pickle.dumps(RemoteError("mod.Err", "text")))
    assert (stand_in.type_name, stand_in.message, str(stand_in)) == ("mod.Err", "text", "mod.Err: text")
    timeout = pickle.loads(pickle.dumps(autopar.IterationTimeout("slow")))
    assert isinstance(timeout, TimeoutError) and str(timeout) == "slow"


def _fail_at(i: int) -> None:
    if i:
        raise ValueError(f"bad {i}")
    try:
        {}["key"]
    except KeyError as exc:
        raise RuntimeError("wrapped") from exc


def test_worker_tracebacks_read_as_pythons_own() -> None:
    """A failing place's frames are formatted once and reused: each text is still exactly
    what Python prints, for repeated failures at one place and for chained exceptions."""
    import traceback

    from autopar._serialize import format_worker_traceback

    for i in (1, 2, 1, 0, 0):
        try:
            _fail_at(i)
        except Exception as exc:
            assert format_worker_traceback(exc) == "".join(traceback.format_exception(exc))
