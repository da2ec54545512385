"""Soak: 100,000 iterations with crashes, errors, hangs and unpicklable results.

Not part of the default run (it takes minutes): ``pytest -m soak -s tests/test_soak.py``, or
``python tests/test_soak.py [iterations]`` to print the figures only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil
import pytest

import autopar
from _helpers import soak_iteration
from autopar import IterationTimeout, SerializationError, WorkerCrashed, parallel_loop

EXPECTED = {7: WorkerCrashed, 42: ValueError}


def expected_failure(i: int) -> type[BaseException] | None:
    if i % 1000 == 500:
        return IterationTimeout
    if i % 1000 == 900:
        return SerializationError
    return EXPECTED.get(i % 100)


def soak(iterations: int) -> dict[str, Any]:
    """Run the soak loop; check that every iteration is accounted for; return its figures."""
    parent = psutil.Process()
    peak = rss_before = parent.memory_info().rss
    started = time.perf_counter()
    calc = parallel_loop(soak_iteration, workers=2, timeout=0.5, on_error="collect")
    results: list[Any] = []
    failures = []
    step = 10_000
    for start in range(0, iterations, step):  # in slices, to watch the parent's memory
        res = calc.map(range(start, min(start + step, iterations)))
        results.extend(res)
        failures.extend((start + f.index, f) for f in res.failures)
        peak = max(peak, parent.memory_info().rss)
    wall = time.perf_counter() - started
    autopar.shutdown()
    failed = dict(failures)
    for i in range(iterations):
        kind = expected_failure(i)
        if kind is None:
            assert i not in failed and results[i] == i * 2, (i, failed.get(i))
        else:
            assert isinstance(failed[i].exception, kind), (i, failed[i])
    return {
        "iterations": iterations,
        "failures": len(failures),
        "wall_time_s": round(wall, 1),
        "iterations_per_s": round(iterations / wall),
        "parent_rss_growth_mib": round((peak - rss_before) / 2**20, 1),
    }


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak() -> None:
    figures = soak(100_000)
    print(figures)
    assert figures["parent_rss_growth_mib"] < 100


if __name__ == "__main__":
    print(soak(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
