"""LoopResult, Failure and LoopStats on their own (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from autopar import Failure, LoopResult, LoopStats


def make(values: list[Any], failed: tuple[int, ...] = ()) -> LoopResult[Any]:
    failures = [Failure(i, (i,), {}, ValueError(i), "tb") for i in failed]
    stats = LoopStats(wall_time=2.0, busy_time=3.0, iterations=len(values), workers=2, chunksize=1)
    return LoopResult([None if i in failed else v for i, v in enumerate(values)], failures, stats)


def test_sequence_protocol() -> None:
    res = make([10, 20, 30])
    assert len(res) == 3 and res[1] == 20 and res[-1] == 30 and res[0:2] == [10, 20]
    assert list(res) == [10, 20, 30] and 20 in res and res.index(30) == 2
    assert res.ok and "3 iterations" in repr(res)


def test_unzip_tuples_lists_and_mappings() -> None:
    assert make([(1, "a"), [2, "b"]]).unzip() == ([1, 2], ["a", "b"])
    assert make([{"x": 1, "y": 2}, {"y": 4, "x": 3}]).unzip() == {"x": [1, 3], "y": [2, 4]}


def test_unzip_fills_failed_slots() -> None:
    res = make([(1, 2), None, (5, 6)], failed=(1,))
    assert res.unzip() == ([1, None, 5], [2, None, 6])
    assert res.unzip(2, fill=0) == ([1, 0, 5], [2, 0, 6])
    assert make([None], failed=(0,)).unzip(3) == ([None], [None], [None])


def test_unzip_of_nothing_but_failures_asks_for_the_output_count() -> None:
    res = make([None, None], failed=(0, 1))
    with pytest.raises(ValueError, match=r"none of the 2 iterations returned a value .* unzip\(3\)"):
        res.unzip()
    assert res.unzip(2, fill=-1) == ([-1, -1], [-1, -1])
    assert make([]).unzip() == () and make([]).unzip(2) == ([], [])


def test_unzip_errors_name_the_iteration() -> None:
    with pytest.raises(TypeError, match=r"iteration 1 returned 7 \(int\), not a tuple, list or mapping"):
        make([(1, 2), 7]).unzip()
    with pytest.raises(TypeError, match="iteration 1 returned 3 values, expected 2"):
        make([(1, 2), (1, 2, 3)]).unzip()
    with pytest.raises(TypeError, match=r"iteration 0 returned 2 values, expected 3 \(unzip\(n=3\)\)"):
        make([(1, 2)]).unzip(3)
    with pytest.raises(TypeError, match="not a mapping with the keys"):
        make([{"x": 1}, {"z": 1}]).unzip()
    with pytest.raises(ValueError, match="n must be a whole number"):
        make([]).unzip(-1)


def test_raise_failures_groups_every_exception() -> None:
    res = make([1, None, None], failed=(1, 2))
    assert not res.ok
    with pytest.raises(ExceptionGroup, match="2 of 3 iterations failed") as info:
        res.raise_failures()
    assert [e.args for e in info.value.exceptions] == [(1,), (2,)]


def test_stats_derive_speedup_and_efficiency() -> None:
    stats = make([1]).stats
    assert stats.speedup == 1.5 and stats.efficiency == 0.75
    assert LoopStats(0.0, 0.0, 0, 1, 1).speedup == 0.0


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        (
            LoopStats(1.0, 1.9, 100, 2, 1),
            "100 iterations averaging 19 ms on 2 workers: work-bound (not overhead) and well balanced",
        ),
        (
            LoopStats(0.5, 0.4, 100_000, 2, 2048),
            "averaging 4 us on 2 workers: overhead-bound, 40% efficiency; chunksize",
        ),
        (
            LoopStats(1.0, 0.01, 200, 2, 4, bytes_sent=200_000_000),
            "arguments and results are 1 MB per 50 us iteration, mostly arguments: serialization-bound, the serial "
            "loop would be faster; pass smaller arguments",
        ),
        (LoopStats(1.0, 1.0, 3, 4, 1), "too few iterations to keep 4 workers busy"),
        (LoopStats(1.0, 1.0, 100, 2, 1), "workers were busy 50% of the time; iteration costs vary"),
        (LoopStats(1.0, 1.0, 5, 2, 1), "with 2 iterations a worker, the last ones leave workers idle"),
        (LoopStats(1.0, 1.0, 10, 1, 1), "10 iterations averaging 100 ms on 1 worker: ran serially"),
        (LoopStats(0.0, 0.0, 0, 2, 0), "no iterations ran."),
        (LoopStats(0.4, 0.0, 4, 2, 1, failed=4), "4 of 4 iterations failed: see the failures first"),
        (  # the parent pickles for every worker at once: busy workers mean it keeps up
            LoopStats(1.0, 7.7, 800, 8, 10, bytes_sent=16_000_000, pickle_time=0.31),
            "800 iterations averaging 9.62 ms on 8 workers: work-bound (not overhead) and well balanced",
        ),
        (
            LoopStats(0.4, 0.2, 100, 2, 50, bytes_received=1_500_000, pickle_time=0.2),
            "this process spent 50% of the loop pickling arguments and unpickling results (15 kB per iteration, "
            "mostly results): serialization-bound",
        ),
        (  # returns 1 MB arrays: the way back limits it
            LoopStats(1.0, 0.4, 200, 2, 4, bytes_received=800_000_000),
            "mostly results: return-bound, the serial loop would be faster; return less",
        ),
        (  # 5 iterations of a fresh spawn pool: starting it was most of the loop
            LoopStats(0.4, 0.25, 5, 2, 1, startup_time=0.2),
            "200 ms of the loop's 400 ms went to starting the workers",
        ),
        (  # 12 iterations on 2 workers: the tail, not other programs
            LoopStats(1.0, 1.4, 12, 2, 1),
            "with 6 iterations a worker, the last ones leave workers idle",
        ),
        (LoopStats(1.0, 1.9, 100, 2, 1, failed=3), "100 iterations averaging 19 ms on 2 workers (3 failed): work"),
    ],
)
def test_summary_says_what_limited_the_loop(stats: LoopStats, expected: str) -> None:
    """stats.summary names the limit in a sentence a user can act on."""
    assert expected in stats.summary
