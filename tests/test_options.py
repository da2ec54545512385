"""Option validation, precedence and environment variables."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from _helpers import ForeignPool, fails_at_once_or_sleeps, nested_loop, pids_inside, square, threads_inside
from autopar import parallel_loop
from autopar._cpus import usable_cpu_count
from autopar._options import OPTION_NAMES, LoopOptions, Options, resolve
from conftest import run_script


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"workers": 0}, ValueError, r"workers=0: must be 1 or more"),
        ({"workers": 2.5}, TypeError, r"workers=2.5: expected a whole number"),
        ({"backend": "proces"}, ValueError, r"backend='proces' is not a backend; choose one of 'process', 'thread'"),
        ({"backend": 3}, TypeError, r"backend=3: expected one of 'process'.*Executor"),
        ({"on_error": "ignore"}, ValueError, r"on_error='ignore': choose one of 'raise', 'collect'"),
        ({"chunksize": -1}, ValueError, r"chunksize=-1: must be 1 or more"),
        ({"timeout": 0}, ValueError, r"timeout=0: must be more than 0"),
        ({"retries": -1}, ValueError, r"retries=-1: must be 0 or more"),
        ({"progress": "yes"}, TypeError, r"progress='yes': expected True or False"),
        ({"start_method": "thread"}, ValueError, r"start_method='thread': choose one of"),
        ({"initializer": 5}, TypeError, r"initializer=5: expected a callable"),
        ({"wokers": 2}, TypeError, r"unknown option 'wokers'; the options are: workers, backend"),
        (
            {"backend": ThreadPoolExecutor(1), "initializer": print},
            ValueError,
            r"^initializer= runs in the workers autopar starts; an executor you pass is used as it is",
        ),
        (
            {"backend": ThreadPoolExecutor(1), "max_tasks_per_worker": 5},
            ValueError,
            r"^max_tasks_per_worker= applies to the workers autopar starts; an executor you pass",
        ),
        (
            {"backend": ThreadPoolExecutor(1), "start_method": "spawn"},
            ValueError,
            r"^start_method= applies to the workers autopar starts; an executor you pass",
        ),
    ],
)
def test_bad_options_name_option_value_and_choices(options: dict[str, Any], error: type, message: str) -> None:
    """A bad value is rejected at decoration and in options(), naming what is wrong."""
    with pytest.raises(error, match=message):
        parallel_loop(**options)(square)
    with pytest.raises(error, match=message):
        parallel_loop(square).options(**options)


def test_environment_backend_overrides_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTOPAR_BACKEND=serial runs a loop in-process whatever the decorator says."""
    monkeypatch.setenv("AUTOPAR_BACKEND", "serial")
    assert resolve(Options(backend="process", workers=4)).backend == "serial"
    import os

    pids = parallel_loop(lambda _: os.getpid(), workers=2).map(range(3))
    assert set(pids) == {os.getpid()}


def test_bad_environment_backend_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_BACKEND", "proces")
    with pytest.raises(ValueError, match=r"AUTOPAR_BACKEND='proces' is not a backend; choose one of process"):
        parallel_loop(square).map([1])


def test_environment_workers_replaces_only_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_WORKERS", "3")
    assert resolve(Options()).workers == 3
    assert resolve(Options(workers=2)).workers == 2


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_environment_workers_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AUTOPAR_WORKERS", value)
    with pytest.raises(ValueError, match=f"AUTOPAR_WORKERS='{value}'"):
        resolve(Options())


def test_default_workers_are_the_usable_cpus() -> None:
    assert resolve(Options()).workers == usable_cpu_count()


def test_options_are_resolved_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment is read when the loop runs, not when the function is decorated."""
    calc = parallel_loop(square)
    monkeypatch.setenv("AUTOPAR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="AUTOPAR_BACKEND"):
        calc.map([1])


def test_a_loop_inside_a_worker_runs_serially() -> None:
    """A loop started inside an iteration runs serially there instead of starting a pool."""
    assert list(nested_loop.options(workers=2).map([2, 3])) == [[0, 1], [0, 1, 4]]
    assert list(nested_loop.options(backend="thread", workers=2).map([3])) == [[0, 1, 4]]
    for outer, inner in parallel_loop(pids_inside, workers=2).map([3, 3]):
        assert inner == {outer}, "the inner loop ran in the outer iteration's own process"


def test_a_loop_inside_a_foreign_executors_worker_runs_serially() -> None:
    """Its iteration came as a chunk, to a worker process (or thread) of that executor: a pool
    started there would be a pool of pools (or wait for its own executor's threads)."""
    with ForeignPool(2) as pool:
        for outer, inner in parallel_loop(pids_inside, backend=pool).map([3, 3]):
            assert inner == {outer}


def test_a_process_loop_inside_a_thread_iteration_uses_worker_processes() -> None:
    """Threads for the outer loop (downloads), processes for the inner one (CPU work): the
    inner loop is not nested in a worker process, so it runs in the process pool; a thread
    loop inside a thread iteration runs serially (it would wait on its own pool's threads)."""
    for outer, inner in parallel_loop(pids_inside, backend="thread", workers=2).map([4, 4]):
        assert outer == os.getpid() and outer not in inner
    inner_threads = parallel_loop(threads_inside, backend="thread", workers=2).map([3, 3])
    for outer_thread, threads in inner_threads:
        assert threads == {outer_thread}


def test_integer_likes_and_infinite_timeout_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    options = parallel_loop(square, workers=np.int64(2), chunksize=np.int32(3), timeout=float("inf"))._self_options
    assert (options.workers, options.chunksize, options.timeout) == (2, 3, None)
    assert type(options.workers) is int
    timeout = parallel_loop(square, timeout=np.int64(5))._self_options.timeout
    assert timeout == 5.0 and type(timeout) is float
    with pytest.raises(ValueError, match="timeout=nan"):
        parallel_loop(square, timeout=float("nan"))


@pytest.mark.parametrize("timeout", [1e10, 1e300, 10**400])
def test_a_timeout_of_centuries_means_no_limit(timeout: float, capfd: pytest.CaptureFixture[str]) -> None:
    """threading refuses waits past a few centuries: the watcher thread must not die of one."""
    calc = parallel_loop(square, workers=2, timeout=timeout)
    assert calc._self_options.timeout is None
    assert list(calc.map(range(3))) == [0, 1, 4]
    assert "Error" not in capfd.readouterr().err


def test_a_loop_in_a_multiprocessing_pool_worker_runs_serially() -> None:
    """A daemonic process may not start processes: the loop runs in it, serially."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_loop_in_a_daemon) == [0, 1, 4]


def _loop_in_a_daemon() -> list[int]:
    return list(parallel_loop(square, workers=2).map(range(3)))


def test_a_loop_in_a_multiprocessing_child_lets_the_child_exit() -> None:
    """A multiprocessing child ends without atexit hooks, after joining its own children:
    the pool its loop started must be closed before that join, or the child never ends
    (a loop in a joblib worker, or in any mp.Process, hung its caller at exit)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_loop_in_a_child, args=(results,))
    child.start()
    assert results.get(timeout=30) == [0, 1, 4]
    child.join(timeout=30)
    assert child.exitcode == 0


def _loop_in_a_child(results: Any) -> None:
    results.put(list(parallel_loop(square, workers=2).map(range(3))))


def test_a_multiprocessing_child_exits_without_waiting_for_an_abandoned_iteration() -> None:
    """As a main process does: the iteration a raised failure left running is stopped."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_raise_with_one_left_running)
    started = time.monotonic()
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert time.monotonic() - started < 15, "waited for the 30 s iteration"


def _raise_with_one_left_running() -> None:
    with contextlib.suppress(ValueError):
        parallel_loop(fails_at_once_or_sleeps, workers=2, chunksize=1).map([0, 1])


def test_a_fork_loop_in_a_module_imported_by_spawned_workers_still_runs(tmp_path: Path) -> None:
    """The guard against loops started while a worker imports the main module is for loops
    that would start spawn or forkserver workers: a forking one worked there, and still does."""
    result = run_script(
        """
        import multiprocessing
        from autopar import parallel_loop

        @parallel_loop(workers=2, start_method="fork")
        def square(x):
            return x * x

        TABLE = list(square.map(range(4)))

        def lookup(i):
            return TABLE[i]

        if __name__ == "__main__":
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                print(pool.map(lookup, range(4)))
        """,
        tmp_path,
    )
    assert result.stdout.strip() == "[0, 1, 4, 9]"


def test_an_option_passed_to_map_says_where_options_go() -> None:
    """``f.map(xs, chunksize=8)``, as for Executor.map, is refused before anything runs; a
    function that takes such an argument gets it, as any keyword argument of map."""
    with pytest.raises(TypeError, match=r"square\(\) takes no argument 'chunksize'.*\.options\(chunksize=8\)\.map"):
        parallel_loop(square).map(range(3), chunksize=8)

    def wait(x: int, timeout: float = 0.0) -> float:
        return x + timeout

    def anything(x: int, **extra: Any) -> dict[str, Any]:
        return extra

    assert list(parallel_loop(wait, backend="thread").map([1], timeout=2)) == [3]
    assert list(parallel_loop(anything, backend="thread").map([1], workers=5)) == [{"workers": 5}]


def test_the_typed_keyword_options_are_the_options() -> None:
    """LoopOptions (what mypy checks) names every option, and nothing else."""
    assert LoopOptions.__optional_keys__ == set(OPTION_NAMES) and not LoopOptions.__required_keys__
