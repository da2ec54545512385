"""seed= and autopar.rng(): every iteration's numbers from (seed, index) alone; fresh streams
in every worker without a seed."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autopar
from autopar import parallel_loop
from conftest import START_METHODS


def draws(x: int) -> tuple[float, float, float]:
    """One draw from each generator a legacy loop uses."""
    return random.random(), float(np.random.normal()), float(autopar.rng().normal())


def rng_only(x: int) -> float:
    return float(autopar.rng().normal())


def draws_then_fails_once(x: int, marker_dir: str) -> tuple[float, float]:
    """Draws, then fails the first time it runs for x == 2 (a retry must draw the same)."""
    values = (random.random(), float(np.random.normal()))
    marker = Path(marker_dir) / f"ran-{x}"
    if x == 2 and not marker.exists():
        marker.write_text("once")
        raise RuntimeError("first try fails")
    return values


def first_draw_and_pid(x: int) -> tuple[int, float]:
    time.sleep(0.05)  # both workers take iterations
    return os.getpid(), float(np.random.random())


SEEDED = [
    pytest.param({"backend": "serial"}, id="serial"),
    pytest.param({"backend": "process", "workers": 1}, id="process-1"),
    pytest.param({"backend": "process", "workers": 2, "chunksize": 1}, id="process-2-chunk1"),
    pytest.param({"backend": "process", "workers": 2, "chunksize": 5}, id="process-2-chunk5"),
] + [
    pytest.param({"backend": "process", "workers": 2, "start_method": m}, id=f"process-{m}", marks=pytest.mark.contract)
    for m in START_METHODS
]


@pytest.mark.parametrize("options", SEEDED)
def test_seed_gives_every_iteration_the_same_numbers_wherever_it_runs(options: dict[str, Any]) -> None:
    expected = list(parallel_loop(draws).options(backend="serial", seed=11).map(range(12)))
    assert list(parallel_loop(draws).options(seed=11, **options).map(range(12))) == expected
    assert len(set(expected)) == 12  # every iteration its own numbers
    other = list(parallel_loop(draws).options(backend="serial", seed=12).map(range(12)))
    assert all(a != b for a, b in zip(expected, other, strict=True))  # another seed, other numbers


def test_seed_on_threads_makes_rng_per_iteration() -> None:
    """The global generators are shared by threads; autopar.rng() is the iteration's own."""
    expected = list(parallel_loop(rng_only).options(backend="serial", seed=3).map(range(20)))
    assert list(parallel_loop(rng_only).options(backend="thread", workers=4, seed=3).map(range(20))) == expected


def test_a_retried_iteration_draws_the_same_numbers(tmp_path: Path) -> None:
    loop = parallel_loop(draws_then_fails_once)
    ran_before = tmp_path / "clean"
    ran_before.mkdir()
    (ran_before / "ran-2").write_text("")
    clean = list(loop.options(backend="serial", seed=5).map(range(4), marker_dir=str(ran_before)))
    retried = loop.options(workers=2, seed=5, retries=1).map(range(4), marker_dir=str(tmp_path))
    assert (tmp_path / "ran-2").exists()  # it did fail once
    assert retried.ok
    assert list(retried) == clean


def test_rng_continues_within_an_iteration_and_is_fresh_outside() -> None:
    @parallel_loop(backend="serial", seed=1)
    def two(x: int) -> tuple[float, float]:
        return float(autopar.rng().random()), float(autopar.rng().random())

    first, second = two.map([0])[0]
    assert first != second  # the second call continues the stream, it does not restart it
    assert autopar.rng().random() != autopar.rng().random()  # outside: unseeded
    assert isinstance(autopar.rng(), np.random.Generator)


def test_without_seed_rng_in_an_iteration_is_unseeded() -> None:
    values = list(parallel_loop(rng_only).options(backend="serial").map(range(5)))
    again = list(parallel_loop(rng_only).options(backend="serial").map(range(5)))
    assert values != again


def test_a_seeded_serial_loop_leaves_this_process_generators_as_they_were() -> None:
    random.seed(99)
    np.random.seed(99)
    expected = (random.random(), float(np.random.random()))
    random.seed(99)
    np.random.seed(99)
    parallel_loop(draws).options(backend="serial", seed=4).map(range(3))
    assert (random.random(), float(np.random.random())) == expected
    assert random.random.__self__ is random._inst  # type: ignore[attr-defined]  # the hooks are gone
    assert np.random.normal.__self__ is np.random.mtrand._rand


def test_an_iteration_seeding_the_global_generator_itself_wins() -> None:
    @parallel_loop(backend="serial", seed=8)
    def reseeds(x: int) -> float:
        np.random.seed(123)
        return float(np.random.random())

    np.random.seed(123)
    assert list(reseeds.map(range(2))) == [float(np.random.random())] * 2


@pytest.mark.skipif("fork" not in START_METHODS, reason="needs fork")
def test_forked_workers_do_not_repeat_each_others_numpy_draws() -> None:
    """Without seed=, workers forked from a parent that used np.random drew the same numbers."""
    np.random.random()  # numpy.random is imported here, and its state inherited by fork
    autopar.shutdown()  # new workers, forked now
    res = parallel_loop(first_draw_and_pid).options(workers=2, start_method="fork", chunksize=1).map(range(8))
    first_of: dict[int, float] = {}
    for pid, value in res:
        first_of.setdefault(pid, value)
    assert len(first_of) == 2
    assert len(set(first_of.values())) == 2
    assert len({value for _, value in res}) == 8


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        ("7", TypeError, "seed='7': expected a whole number"),
        (1.5, TypeError, "seed=1.5"),
        (True, TypeError, "seed=True"),
        (-1, ValueError, "seed=-1: must be 0 or more"),
    ],
)
def test_a_bad_seed_is_refused_naming_it(seed: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parallel_loop(seed=seed)
    with pytest.raises(error, match=match):
        parallel_loop(draws).options(seed=seed)


def test_a_numpy_integer_seed_is_accepted() -> None:
    expected = list(parallel_loop(draws).options(backend="serial", seed=9).map(range(3)))
    assert list(parallel_loop(draws).options(backend="serial", seed=np.int64(9)).map(range(3))) == expected


@pytest.mark.skipif("fork" not in START_METHODS, reason="needs fork")
def test_workers_forked_during_a_seeded_serial_iteration_still_seed_their_generators() -> None:
    """A process loop run inside a seeded serial iteration forks its workers while that
    iteration holds the hooks: the workers inherited them (and the held lock), so neither
    that loop nor any later one on those warm workers ever seeded random / np.random."""
    inner = parallel_loop(draws).options(seed=5, workers=2, start_method="fork", chunksize=1)
    expected = list(inner.options(backend="serial").map(range(4)))

    def outer(x: int) -> list[tuple[float, float, float]]:
        return list(inner.map(range(4)))

    autopar.shutdown()  # the workers are forked inside the iteration
    assert list(parallel_loop(outer).options(backend="serial", seed=1).map(range(1))) == [expected]
    assert list(inner.map(range(4))) == expected  # the same warm workers, later


def test_a_seeded_loop_nested_in_a_seeded_iteration_draws_from_its_own_seed() -> None:
    """The nested loop's numbers come from its own (seed, index), as when it runs alone (or
    in a worker process), and the outer iteration's draws are not shifted by it."""
    inner = parallel_loop(draws).options(backend="serial", seed=5)
    expected = list(inner.map(range(3)))

    def alone(x: int) -> tuple[float, float]:
        return random.random(), float(np.random.normal())

    def outer(x: int) -> tuple[float, list[tuple[float, float, float]], float]:
        before = random.random()
        nested = list(inner.map(range(3)))
        return before, nested, float(np.random.normal())

    reference = list(parallel_loop(alone).options(backend="serial", seed=1).map(range(2)))
    got = list(parallel_loop(outer).options(backend="serial", seed=1).map(range(2)))
    assert [nested for _, nested, _ in got] == [expected, expected]
    assert [(before, after) for before, _, after in got] == reference


def test_a_seeded_serial_loop_costs_little_more_than_an_unseeded_one() -> None:
    """Hooks were rebuilt (some 70 functools.wraps) for every chunk, that is every
    iteration on "serial": ~100 us an iteration, ten times the loop's own cost."""
    np.random.random()  # numpy imported: both modules hooked
    loop = parallel_loop(lambda x: x).options(backend="serial")
    loop.map(range(10))
    started = time.perf_counter()
    loop.map(range(4000))
    unseeded = time.perf_counter() - started
    started = time.perf_counter()
    loop.options(seed=1).map(range(4000))
    seeded = time.perf_counter() - started
    assert seeded < 5 * unseeded + 0.05


def test_seed_on_a_users_process_pool_executor_seeds_the_global_generators() -> None:
    """A ProcessPoolExecutor runs one chunk at a time in each process, as autopar's pool
    does: random / np.random were left unseeded there, every value differing from serial."""
    from concurrent.futures import ProcessPoolExecutor

    expected = list(parallel_loop(draws).options(backend="serial", seed=11).map(range(6)))
    with ProcessPoolExecutor(2) as executor:
        got = list(parallel_loop(draws).options(backend=executor, seed=11, chunksize=2).map(range(6)))
    assert got == expected


def test_another_threads_draws_do_not_take_a_seeded_loops_seeding() -> None:
    """The global generators are one per process: while a seeded serial loop holds them,
    another thread's draws go unseeded and leave the loop's numbers alone, and a second
    seeded loop says that its draws from them are not seeded."""
    import threading

    waiting, go = threading.Event(), threading.Event()

    def waits_then_draws(x: int) -> tuple[float, float, float]:
        if x == 1:
            waiting.set()
            go.wait(10)
        return draws(x)

    expected = list(parallel_loop(draws).options(backend="serial", seed=5).map(range(3)))
    loop = parallel_loop(waits_then_draws).options(backend="serial", seed=5)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.extend(loop.map(range(3))))
    thread.start()
    try:
        assert waiting.wait(10)
        for _ in range(3):  # iteration 1 is due to be seeded at its first draw: not by these
            random.random()
            np.random.normal()
        with pytest.warns(RuntimeWarning, match="another thread's seeded loop holds"):
            parallel_loop(rng_only).options(backend="serial", seed=1).map(range(2))
    finally:
        go.set()
        thread.join()
    assert got == expected
