"""plan(): a loop's derived parameters, a pure function of its options."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from autopar._options import Options
from autopar._plan import LoopPlan, plan


def test_a_process_loop_keeps_two_chunks_per_worker_in_flight() -> None:
    assert plan(Options(workers=4)) == LoopPlan(workers=4, window=8, refill_at=4, fixed_chunksize=None, capacity=None)


def test_serial_runs_one_iteration_at_a_time() -> None:
    assert plan(Options(backend="serial", workers=8)) == LoopPlan(1, 1, 0, 1, None)


def test_max_tasks_per_worker_fixes_the_chunk_size() -> None:
    assert plan(Options(workers=2, max_tasks_per_worker=3)).fixed_chunksize == 1
    assert plan(Options(workers=2, chunksize=10, max_tasks_per_worker=3)).fixed_chunksize == 3
    assert plan(Options(workers=2, chunksize=10)).fixed_chunksize == 10


def test_an_executor_runs_no_more_than_it_has() -> None:
    with ThreadPoolExecutor(3) as executor:
        assert plan(Options(backend=executor, workers=8)) == LoopPlan(3, 6, 3, None, 3)


def test_a_larger_executor_gets_only_as_many_chunks_as_workers_asked() -> None:
    with ThreadPoolExecutor(8) as executor:
        assert plan(Options(backend=executor, workers=2)) == LoopPlan(2, 2, 1, None, 8)
