"""f.verify() and AUTOPAR_VERIFY: is the parallel loop the old loop?"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autopar
from autopar import Mismatch, UnsafeLoopError, VerifyReport, each, parallel_loop
from conftest import run_script

COUNT = 0
RESULTS: dict[int, int] = {}
SEEN: list[int] = []
SETTINGS = {"scale": 2}


def clean(x: int, offset: int = 0) -> int:
    return x * SETTINGS["scale"] + offset


def counts(x: int) -> int:
    global COUNT
    COUNT += 1
    return x + COUNT


def fills_global_dict(x: int) -> None:
    RESULTS[x] = x * x


def records_through_a_nested_function(x: int) -> int:
    def note() -> None:
        SEEN.append(x)

    note()
    return x


def appends_to_argument(items: list[int], x: int) -> int:
    items.append(x)
    return len(items)


def normalizes_in_place(values: np.ndarray) -> float:
    values /= values.sum()
    return float(values[0])


def grows_broadcast(x: int, cache: dict[int, int]) -> int:
    cache[x] = x
    return x


def draws_numpy(x: int) -> float:
    return float(np.random.normal())


def draws_python(x: int) -> float:
    return random.random()


def uses_rng(x: int) -> float:
    return float(autopar.rng().normal())


def holds_a_lock(x: int, lock: Any) -> int:
    with lock:
        return x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


class Accumulator:
    def __init__(self) -> None:
        self.total = 0

    @parallel_loop(workers=2)
    def add(self, x: int) -> int:
        self.total += x
        return self.total


PROCESS = [pytest.param({"workers": 2}, id="process")] + [
    pytest.param({"workers": 2, "start_method": m}, id=f"process-{m}", marks=pytest.mark.contract)
    for m in ("spawn", "forkserver")
]


@pytest.mark.parametrize("options", PROCESS)
def test_a_clean_loop_verifies_ok(options: dict[str, Any]) -> None:
    report = parallel_loop(clean).options(**options).verify(range(10), offset=1)
    assert isinstance(report, VerifyReport)
    assert report.ok
    assert report.iterations == 10
    assert "gave the same values" in str(report)


@pytest.mark.parametrize("options", PROCESS)
def test_a_global_counter_is_reported_with_its_mismatches(options: dict[str, Any]) -> None:
    report = parallel_loop(counts).options(**options).verify(range(6))
    assert not report.ok
    assert report.mutated_globals == [(0, "COUNT")]
    assert all(isinstance(m, Mismatch) for m in report.mismatches)  # where a worker's own count differed
    text = str(report)
    assert "iteration 0 changed the module global 'COUNT'" in text
    assert "each worker changes its own copy" in text
    assert COUNT == 0  # verify put the global back


def test_a_global_dict_filled_by_the_loop_is_reported_and_left_as_it_was() -> None:
    RESULTS.clear()
    RESULTS[-1] = 1
    before = RESULTS
    report = parallel_loop(fills_global_dict).options(workers=2).verify(range(4))
    assert report.mutated_globals == [(0, "RESULTS")]
    assert report.mismatches == []  # every iteration returned None both times
    assert "build RESULTS from the loop's results" in str(report)
    assert RESULTS is before
    assert RESULTS == {-1: 1}


def test_a_global_changed_through_a_nested_function_is_reported() -> None:
    report = parallel_loop(records_through_a_nested_function).options(workers=2).verify(range(3))
    assert report.mutated_globals == [(0, "SEEN")]
    assert SEEN == []


def test_an_argument_changed_in_place_is_reported_and_the_callers_stays_as_it_was() -> None:
    lists: list[list[int]] = [[], [1], [2, 2]]
    report = parallel_loop(appends_to_argument).options(workers=2).verify(lists, range(3))
    assert report.mutated_arguments == [(0, "argument 'items'"), (1, "argument 'items'"), (2, "argument 'items'")]
    assert lists == [[], [1], [2, 2]]
    assert "iterations 0, 1 and 2 changed argument 'items' in place" in str(report)


def test_a_numpy_argument_normalized_in_place_is_reported() -> None:
    arrays = [np.arange(1.0, 4.0) for _ in range(3)]
    report = parallel_loop(normalizes_in_place).options(workers=2).verify(arrays)
    assert [name for _, name in report.mutated_arguments] == ["argument 'values'"] * 3
    assert arrays[0].tolist() == [1.0, 2.0, 3.0]


def test_a_broadcast_argument_changed_in_place_is_reported() -> None:
    cache: dict[int, int] = {}
    report = parallel_loop(grows_broadcast).options(workers=2).verify(range(2), cache=cache)
    assert report.mutated_arguments[0] == (0, "the keyword argument 'cache' given to every iteration")
    assert cache == {}


def test_a_method_changing_its_instance_is_reported() -> None:
    accumulator = Accumulator()
    report = accumulator.add.verify(range(1, 5))
    assert (0, "self (the method's instance)") in report.mutated_arguments
    assert accumulator.total == 0


@pytest.mark.parametrize("function", [draws_numpy, draws_python], ids=["numpy", "random"])
def test_global_random_draws_are_reported_and_seed_fixes_them(function: Any) -> None:
    report = parallel_loop(function).options(workers=2).verify(range(8))
    assert report.global_random
    assert report.mismatches
    assert "Pass seed=" in str(report)
    seeded = parallel_loop(function).options(workers=2, seed=3).verify(range(8))
    assert seeded.ok, str(seeded)


def test_rng_verifies_ok_with_a_seed() -> None:
    assert parallel_loop(uses_rng).options(workers=2, seed=1).verify(range(8)).ok


def test_verify_leaves_this_process_random_generators_as_they_were() -> None:
    np.random.seed(5)
    random.seed(5)
    expected = (float(np.random.random()), random.random())
    np.random.seed(5)
    random.seed(5)
    parallel_loop(draws_numpy).options(workers=2).verify(range(4))
    parallel_loop(draws_python).options(backend="serial").verify(range(4))
    assert (float(np.random.random()), random.random()) == expected


def test_the_same_exception_both_ways_is_no_mismatch() -> None:
    report = parallel_loop(fails_on_three).options(workers=2).verify(range(6))
    assert report.ok


def test_an_argument_that_cannot_be_pickled_is_listed_as_unchecked() -> None:
    report = parallel_loop(holds_a_lock).options(backend="thread", workers=2).verify(range(3), lock=threading.Lock())
    assert report.ok
    assert report.unchecked == ["the keyword argument 'lock' given to every iteration"]
    assert "Not checked for changes, because they could not be pickled" in str(report)


def test_verify_takes_each_and_only_its_sample() -> None:
    consumed: list[int] = []

    def source() -> Any:
        for x in range(100):
            consumed.append(x)
            yield x

    report = parallel_loop(clean).options(workers=2).verify(source(), sample=5, offset=each(range(100, 200)))
    assert report.ok
    assert report.iterations == 5
    assert len(consumed) <= 6


def test_verify_all_with_sample_none() -> None:
    assert parallel_loop(clean).options(backend="serial").verify(range(50), sample=None).iterations == 50


@pytest.mark.parametrize(
    ("sample", "error", "match"),
    [
        (0, ValueError, r"verify\(sample=0\): compare at least 1 iteration"),
        (-3, ValueError, r"verify\(sample=-3\)"),
        ("8", TypeError, r"verify\(sample='8'\): expected a whole number"),
        (2.5, TypeError, r"verify\(sample=2.5\)"),
    ],
)
def test_a_bad_sample_is_refused(sample: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parallel_loop(clean).verify(range(3), sample=sample)


def test_on_threads_a_global_counter_is_reported_as_shared(backend: dict[str, Any]) -> None:
    report = parallel_loop(counts).options(**backend).verify(range(4))
    assert report.mutated_globals == [(0, "COUNT")]
    if backend["backend"] != "process":
        assert "each worker changes its own copy" not in str(report)
    assert COUNT == 0


def test_autopar_verify_refuses_an_unsafe_loop_before_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_VERIFY", "4")
    with pytest.raises(UnsafeLoopError) as caught:
        parallel_loop(counts).options(workers=2).map(range(20))
    assert isinstance(caught.value, autopar.AutoparError)
    assert caught.value.report.mutated_globals == [(0, "COUNT")]
    assert "COUNT" in str(caught.value)
    with pytest.raises(UnsafeLoopError):
        list(parallel_loop(draws_numpy).options(workers=2).imap(range(20)))
    with pytest.raises(UnsafeLoopError):
        parallel_loop(appends_to_argument).options(workers=2).starmap([([], 1), ([], 2)])


def test_autopar_verify_runs_a_safe_loop_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_VERIFY", "3")
    generator = (x for x in range(10))
    assert list(parallel_loop(clean).options(workers=2).map(generator)) == [clean(x) for x in range(10)]
    assert list(parallel_loop(clean).options(workers=2).imap(range(10))) == [clean(x) for x in range(10)]


def test_autopar_verify_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_VERIFY", "yes")
    with pytest.raises(ValueError, match="AUTOPAR_VERIFY='yes' is not a whole number"):
        parallel_loop(clean).map(range(3))


def test_autopar_verify_checks_every_loop_of_a_program(tmp_path: Path) -> None:
    """How a user checks every converted loop of a program at once: a real script."""
    source = """
        from autopar import parallel_loop

        TOTALS = []

        @parallel_loop(workers=2)
        def fine(x):
            return x + 1

        @parallel_loop(workers=2)
        def lossy(x):
            TOTALS.append(x)

        if __name__ == "__main__":
            print(sum(fine.map(range(100))))
            lossy.map(range(100))
    """
    result = run_script(source, tmp_path, check=False, env={"AUTOPAR_VERIFY": "8"})
    assert result.stdout.strip() == "5050"
    assert result.returncode == 1
    assert "autopar.UnsafeLoopError: this loop is not safe to run in parallel as it is" in result.stderr
    assert "iteration 0 changed the module global 'TOTALS'" in result.stderr


def test_verify_is_exported() -> None:
    assert {"VerifyReport", "Mismatch", "UnsafeLoopError", "each", "rng"} <= set(autopar.__all__)


def test_on_serial_a_change_is_explained_for_the_backends_it_would_break() -> None:
    """AUTOPAR_BACKEND=serial with AUTOPAR_VERIFY: the report spoke of threads sharing the
    global, which is not what "serial" does."""
    text = str(parallel_loop(counts).options(backend="serial").verify(range(4)))
    assert "the threads share it" not in text
    assert 'on "serial"' in text and 'on "process"' in text
    report = parallel_loop(appends_to_argument).options(backend="serial").verify([[]], [1])
    assert report.mutated_arguments
    assert 'on "serial"' in str(report)
    assert COUNT == 0


def reseeds_itself(x: int) -> float:
    """A legacy loop that seeds the global generators itself: the same numbers anywhere."""
    np.random.seed(x)
    random.seed(x)
    return float(np.random.normal()) + random.random()


def test_an_iteration_that_seeds_the_global_generators_itself_is_not_global_random() -> None:
    """Its values are the same in parallel: verify() must not refuse it."""
    report = parallel_loop(reseeds_itself).verify(range(4))
    assert not report.mismatches
    assert report.ok


def draws_own_generator(x: int) -> float:
    return float(np.random.default_rng().normal())


def test_with_seed_a_generator_the_iteration_makes_itself_is_named_as_the_likely_cause() -> None:
    report = parallel_loop(draws_own_generator).options(workers=2, seed=1).verify(range(4))
    assert report.mismatches
    assert "a generator it makes itself (np.random.default_rng()) or one held elsewhere" in str(report)
