"""map, starmap and imap on every backend: order, outputs, arguments, laziness."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from _helpers import (
    ForeignPool,
    KillsWorkers,
    Scaler,
    bytes_len,
    bytes_len_slowly,
    cached_broadcasts,
    fail_on,
    kib_of_zeros,
    sleep_then,
    square,
    three_outputs,
    whoami,
)
from autopar import LoopResult, WorkerCrashed, parallel_loop
from autopar._backends import SerialExecutor
from autopar._chunking import CHUNK_BYTES, MAX_CHUNK


@pytest.mark.contract
def test_map_returns_results_in_input_order(any_backend: dict[str, Any]) -> None:
    """Results come back in input order, whatever order workers finish in."""
    res = parallel_loop(square, **any_backend).map(range(50))
    assert isinstance(res, LoopResult)
    assert list(res) == [x * x for x in range(50)]
    assert res.ok and res.failures == []


@pytest.mark.contract
def test_seed_loop_unzips_three_outputs(any_backend: dict[str, Any]) -> None:
    """The legacy three-output append loop and unzip() give the same lists."""
    offset = 0.5
    legacy: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for j in range(10):
        for column, value in zip(legacy, three_outputs(j * offset), strict=True):
            column.append(value)
    calc = parallel_loop(three_outputs, **any_backend)
    out1, out2, out3 = calc.map(j * offset for j in range(10)).unzip()
    assert (out1, out2, out3) == legacy


def test_several_iterables_are_zipped_like_builtin_map(backend: dict[str, Any]) -> None:
    """map(xs, ys) zips its iterables and stops at the shortest."""
    add = parallel_loop(lambda a, b: a + b, **backend)
    assert list(add.map([1, 2, 3], (10, 20, 30, 40))) == [11, 22, 33]


def test_keyword_arguments_are_broadcast(backend: dict[str, Any]) -> None:
    """Keyword arguments of map go to every iteration."""
    res = parallel_loop(three_outputs, **backend).map(range(4), offset=2.0)
    assert res.unzip()[1] == [0.0, 2.0, 4.0, 6.0]


def test_starmap_unpacks_argument_tuples(backend: dict[str, Any]) -> None:
    """starmap passes each element as positional arguments."""
    power = parallel_loop(pow, **backend)
    assert list(power.starmap([(2, 3), (3, 2), (10, 0)])) == [8, 9, 1]


def test_starmap_names_an_element_that_is_not_a_tuple(backend: dict[str, Any]) -> None:
    """A bad starmap element is a TypeError naming its position."""
    with pytest.raises(TypeError, match=r"element 1 is 5 \(int\)"):
        parallel_loop(pow, **backend).starmap([(2, 3), 5])


def test_starmap_refuses_keyword_dicts_instead_of_passing_their_keys() -> None:
    """`for kw in configs: run(**kw)` is not `run.starmap(configs)`: a dict would give its keys."""
    with pytest.raises(TypeError, match=r"element 0 is \{'base': 2, 'exp': 3\} \(dict\).*f\(\*\*kwargs\)"):
        parallel_loop(pow, backend="serial").starmap([{"base": 2, "exp": 3}])
    with pytest.raises(TypeError, match=r"element 0 is .* \(set\)"):
        parallel_loop(pow, backend="serial").starmap([{2, 3}])


@pytest.mark.parametrize("n", [None, 3])
def test_empty_input(backend: dict[str, Any], n: int | None) -> None:
    """An empty loop gives an empty result; unzip(n) still gives n lists."""
    res = parallel_loop(three_outputs, **backend).map([])
    assert len(res) == 0 and res.ok and res.stats.iterations == 0
    assert res.unzip(n) == (() if n is None else ([], [], []))


def test_lambdas_and_closures_run_on_workers(backend: dict[str, Any]) -> None:
    """Functions plain pickle refuses (lambdas, closures) are shipped by cloudpickle."""
    base = 7

    def add_base(x: int) -> int:
        return x + base

    assert list(parallel_loop(add_base, **backend).map(range(3))) == [7, 8, 9]
    assert list(parallel_loop(lambda x: -x, **backend).map(range(3))) == [0, -1, -2]


def test_methods_map_over_their_instance(backend: dict[str, Any]) -> None:
    """obj.method.map runs the method bound to obj."""
    scaler = Scaler(3)
    assert scaler.scale(2) == 6
    assert list(scaler.scale.options(**backend).map(range(4))) == [0, 3, 6, 9]
    if backend["backend"] == "process":
        assert list(scaler.scale.map(range(4))) == [0, 3, 6, 9]


def test_imap_yields_in_order_and_reads_input_lazily(backend: dict[str, Any]) -> None:
    """imap reads an endless input only as far as needed, and yields in input order."""
    pulled = itertools.count()

    def numbers() -> Any:
        for x in itertools.count():
            next(pulled)
            yield x

    it = parallel_loop(square, **backend).imap(numbers())
    first = list(itertools.islice(it, 20))
    it.close()
    assert first == [x * x for x in range(20)]
    read = next(pulled)
    if backend["backend"] == "serial":
        assert read <= 21, "the serial backend must run one iteration at a time, like the old loop"
    else:  # a bounded window of chunks is read ahead, never the whole (endless) input
        assert read <= 20 + 2 * backend["workers"] * MAX_CHUNK


def test_imap_stats_stay_those_of_the_loop_once_it_ended(backend: dict[str, Any]) -> None:
    """Read after the loop (exhausted, or left with break), the wall time stops at its end."""
    finished = parallel_loop(square, **backend).imap(range(5))
    assert list(finished) == [0, 1, 4, 9, 16]
    left = parallel_loop(square, **backend).imap(range(100))
    for value in left:
        if value == 4:
            break
    left.close()
    ended = [finished.stats.wall_time, left.stats.wall_time]
    time.sleep(0.2)
    assert [finished.stats.wall_time, left.stats.wall_time] == ended
    assert finished.stats.iterations == 5


def test_imap_over_a_large_input_is_complete(backend: dict[str, Any]) -> None:
    """imap delivers every result of a long input, in order."""
    total = sum(parallel_loop(square, **backend).imap(range(5000)))
    assert total == sum(x * x for x in range(5000))


def test_inputs_longer_than_len_can_count_run_like_builtin_map(backend: dict[str, Any]) -> None:
    """len(range(10**20)) overflows; the builtin map still iterates it, and so do we."""
    huge = range(10**20, 2 * 10**20)
    looped = parallel_loop(square, **backend)
    results = looped.imap(huge)
    assert list(itertools.islice(results, 3)) == [x * x for x in huge[:3]]
    results.close()
    pairs = parallel_loop(three_outputs, **backend).map(range(3), huge)
    assert list(pairs) == [three_outputs(a, b) for a, b in zip(range(3), huge, strict=False)]
    assert list(parallel_loop(square, **backend).map(huge[:4])) == [x * x for x in huge[:4]]


def test_bytes_received_count_the_pickled_results() -> None:
    small = parallel_loop(kib_of_zeros, workers=2).map([1] * 8)
    big = parallel_loop(kib_of_zeros, workers=2).map([64] * 8)
    assert 8 * 1024 <= small.stats.bytes_received < 8 * 1024 + 4096
    assert 8 * 64 * 1024 <= big.stats.bytes_received < 8 * 64 * 1024 + 4096


def test_pickle_time_is_what_this_process_spent_pickling() -> None:
    """Measured around packing the arguments and unpickling the results; none in-process."""
    res = parallel_loop(kib_of_zeros, workers=2).map([64] * 8)
    assert 0 < res.stats.pickle_time < res.stats.wall_time
    assert parallel_loop(kib_of_zeros, workers=2, backend="thread").map([64] * 8).stats.pickle_time == 0


def test_big_results_keep_chunks_small() -> None:
    """A chunk's results count toward its byte budget, however cheap the iterations: an imap
    over many big results holds a bounded amount (the chunk grew to 64, 256 MiB, before)."""
    results = parallel_loop(kib_of_zeros, workers=2).imap([512] * 120)
    assert all(len(value) == 512 << 10 for value in results)
    assert results.stats.chunksize <= CHUNK_BYTES // (512 << 10)


def test_stats_describe_the_loop(backend: dict[str, Any]) -> None:
    """stats count iterations and workers and relate busy time to wall time."""
    res = parallel_loop(sleep_then, **backend).map([0.02] * 30)
    stats = res.stats
    assert stats.iterations == 30
    assert stats.workers == (1 if backend["backend"] == "serial" else 2)
    assert stats.busy_time >= 30 * 0.02, "busy time sums the iterations' own time"
    assert stats.wall_time > 0 and stats.chunksize >= 1
    assert stats.speedup == pytest.approx(stats.busy_time / stats.wall_time)
    assert stats.efficiency == pytest.approx(stats.speedup / stats.workers)


def test_process_backend_uses_several_workers() -> None:
    """With two workers and chunks of one, iterations run in two different processes."""
    pids = set(parallel_loop(whoami, workers=2, chunksize=1).map(range(20)))
    assert len(pids) == 2


def test_fixed_chunksize_is_reported() -> None:
    """A fixed chunksize is the one used and reported."""
    res = parallel_loop(square, workers=2, chunksize=7).map(range(30))
    assert res.stats.chunksize == 7 and list(res) == [x * x for x in range(30)]


def test_user_executor_is_used_and_left_open() -> None:
    """An executor passed as backend runs the loop and is not shut down by autopar."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as executor:
        calc = parallel_loop(three_outputs, backend=executor)
        assert calc.map(range(5), offset=3.0).unzip()[1] == [0.0, 3.0, 6.0, 9.0, 12.0]
        assert executor.submit(square, 4).result() == 16


class _Concurrency:
    """A loop function that records how many of its calls ran at once, at most."""

    def __init__(self) -> None:
        self.lock, self.running, self.peak = threading.Lock(), 0, 0

    def __call__(self, x: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.03)
        with self.lock:
            self.running -= 1
        return x


@pytest.mark.parametrize(
    ("threads", "workers", "at_once"),
    [
        (6, None, 6),  # not two per CPU of this machine: the executor's own capacity
        (8, 2, 2),  # fewer workers than the executor has: that many at a time, as reported
        (2, 4, 2),  # more than it has: what it runs, reported
    ],
)
def test_an_executor_runs_as_many_calls_at_once_as_asked(threads: int, workers: int | None, at_once: int) -> None:
    busy = _Concurrency()
    with ThreadPoolExecutor(threads) as executor:
        res = parallel_loop(busy, backend=executor, workers=workers, chunksize=1).map(range(4 * threads))
    assert list(res) == list(range(4 * threads))
    assert res.stats.workers == at_once and busy.peak == at_once


def test_a_dask_clients_executor_runs_the_loop() -> None:
    """API.md names it: values in order, keyword arguments, failures collected or raised."""
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        calc = parallel_loop(fail_on, backend=client.get_executor(), chunksize=2)
        assert list(calc.map(range(6), bad=())) == [0, 10, 20, 30, 40, 50]
        res = calc.options(on_error="collect").map(range(6), bad=(4,))
        assert res[3] == 30 and [f.index for f in res.failures] == [4]
        with pytest.raises(ValueError, match="bad value 4") as info:
            calc.map(range(6), bad=(4,))
        assert info.value.__notes__[0].startswith("iteration 4: ")
        blob = bytes(range(256)) * 1024
        res = parallel_loop(bytes_len, backend=client.get_executor(), chunksize=1).map(range(12), blob=blob)
        assert list(res) == [(len(blob), i) for i in range(12)]
        assert res.stats.bytes_sent < 4 * len(blob), "a large keyword argument goes to each worker once"


def test_a_large_broadcast_goes_to_each_worker_of_a_foreign_executor_once() -> None:
    """No shared memory with a Dask, loky or MPI executor: the first chunk each worker gets
    carries the broadcast, later ones only its key (API.md: "sent to each worker once").
    Iterations of 10 ms: both workers are up before the chunks named by key arrive."""
    blob = bytes(range(256)) * 4096
    with ForeignPool(2) as pool:
        calc = parallel_loop(bytes_len_slowly, backend=pool, chunksize=1)
        for _ in range(2):  # a new loop sends it again: an iteration may have mutated the old one
            res = calc.map(range(24), blob=blob)
            assert list(res) == [(len(blob), i) for i in range(24)]
            assert res.stats.bytes_sent < 5 * len(blob), "not with each of the 24 chunks"


def test_a_foreign_executor_with_more_processes_than_workers_still_gets_it_once_each() -> None:
    """Any of its 12 processes may lack it (it says so, and gets it): no reason to give up
    sending by key, as the first version did after 8 misses, sending it with all 120 chunks."""
    blob = bytes(range(256)) * 1024
    with ForeignPool(12) as pool:
        list(pool.map(abs, range(120)))  # every process started
        res = parallel_loop(bytes_len, backend=pool, workers=2, chunksize=1).map(range(120), blob=blob)
    assert list(res) == [(len(blob), i) for i in range(120)]
    assert res.stats.bytes_sent < 60 * len(blob)  # a process may lack it a few times: 16-39 here


def test_chunks_refused_before_sending_do_not_count_as_carrying_the_broadcast() -> None:
    """The first two chunks never leave (their arguments cannot be pickled): the next two
    carry the broadcast, so no worker lacks it and no task is sent twice."""
    blob = bytes(range(256)) * 1024
    arguments = [threading.Lock(), threading.Lock(), *range(2, 10)]
    with ForeignPool(2) as pool:
        res = parallel_loop(bytes_len_slowly, backend=pool, chunksize=1, on_error="collect").map(arguments, blob=blob)
        assert len(pool.futures) == 8
    assert [failure.index for failure in res.failures] == [0, 1]
    assert list(res)[2:] == [(len(blob), i) for i in range(2, 10)]


def test_a_foreign_executors_workers_keep_only_the_latest_loops_broadcasts() -> None:
    """A loop's broadcast is cached in each worker for that loop only: ten loops of a large
    one must not leave ten copies in every worker (they stayed until 16 were cached)."""
    with ForeignPool(1) as pool:
        calc = parallel_loop(bytes_len, backend=pool, chunksize=1)
        for loop in range(10):
            blob = bytes([loop]) * (256 << 10)
            assert list(calc.map(range(3), blob=blob)) == [(len(blob), loop)] * 3
        assert pool.submit(cached_broadcasts).result() <= 2


def test_dasks_killed_worker_is_a_worker_crash() -> None:
    """Dask gives up on a chunk whose workers kept dying with its own KilledWorker: that is
    the WorkerCrashed README promises for an executor's lost workers, its cause kept."""
    res = parallel_loop(square, backend=KillsWorkers(), on_error="collect").map(range(3))
    assert [type(f.exception) for f in res.failures] == [WorkerCrashed] * 3
    assert type(res.failures[0].exception.__cause__).__name__ == "KilledWorker"


def test_workers_that_lack_a_broadcast_sent_by_key_get_it_again() -> None:
    """Every task in a fresh process (nothing cached, ever): each chunk named by key comes back
    and goes again in full, then the loop stops naming it by key. Nothing lost, no spin, and
    no task fails: a miss is returned, not raised, which an executor would log (Dask does)."""
    blob = bytes(range(256)) * 1024
    with ForeignPool(2, mp_context=multiprocessing.get_context("forkserver"), max_tasks_per_child=1) as pool:
        res = parallel_loop(bytes_len, backend=pool, chunksize=1).map(range(12), blob=blob)
    assert list(res) == [(len(blob), i) for i in range(12)]
    assert res.stats.bytes_sent >= 12 * len(blob)
    assert len(pool.futures) > 12 and not any(future.exception() for future in pool.futures)


def test_automatic_chunks_grow_for_cheap_iterations() -> None:
    """Cheap iterations are grouped: the chunk size reached is well above one."""
    res = parallel_loop(square, workers=2).map(range(20_000))
    assert res.stats.chunksize > 64
    assert list(res) == [x * x for x in range(20_000)]


def identity(x: Any) -> Any:
    return x


@pytest.mark.contract
def test_a_tuple_element_is_one_argument(any_backend: dict[str, Any]) -> None:
    """map(xs) passes each element as it is, tuples included (starmap unpacks them)."""
    pairs = [(1, 2), (3, 4)]
    res = parallel_loop(identity, **any_backend).map(pairs)
    assert list(res) == pairs
    failing = parallel_loop(fail_on, **any_backend).options(on_error="collect")
    (failure,) = failing.map([1, (2, 3), 4], bad=((2, 3),)).failures
    assert failure.index == 1 and failure.args == ((2, 3),)


@pytest.mark.parametrize("sequence", [list, tuple, range])
def test_sequences_are_sent_in_slices(sequence: Any) -> None:
    """A list, tuple or range is cut into slices: every element arrives once, in order, and
    a range slice travels as a range (bytes, not one pickled int per iteration)."""
    values = range(30_000) if sequence is range else sequence(range(30_000))
    res = parallel_loop(square, workers=2).map(values)
    assert list(res) == [x * x for x in range(30_000)]
    if sequence is range:
        assert res.stats.bytes_sent < 40_000 < parallel_loop(square, workers=2).map(list(values)).stats.bytes_sent


def test_imap_raise_inside_a_chunk_keeps_the_rest_in_the_partial_result(backend: dict[str, Any]) -> None:
    """imap stops at the failure; what came back after it, undelivered, is in partial_result."""
    calc = parallel_loop(fail_on, chunksize=10, **backend)
    results = calc.imap(range(10), bad=(4,))
    assert [next(results) for _ in range(4)] == [0, 10, 20, 30]
    with pytest.raises(ValueError) as info:
        next(results)
    partial = info.value.partial_result  # type: ignore[attr-defined]
    assert [f.index for f in partial.failures] == [4]
    assert [partial[i] for i in range(5, 10)] == [50, 60, 70, 80, 90]
    assert partial.missing == []  # 0-3 were handed out already: not kept, and not missing
    assert [partial[i] for i in range(4)] == [None] * 4


def test_imap_partial_result_misses_only_what_never_came_back(backend: dict[str, Any]) -> None:
    results = parallel_loop(fail_on, chunksize=1, **backend).imap(range(10), bad=(4,))
    assert [next(results) for _ in range(4)] == [0, 10, 20, 30]
    with pytest.raises(ValueError) as info:
        next(results)
    partial = info.value.partial_result  # type: ignore[attr-defined]
    assert [failure.index for failure in partial.failures] == [4]
    assert all(index > 4 for index in partial.missing)
    assert all(partial[index] == 10 * index for index in range(5, len(partial)) if index not in partial.missing)


def test_the_window_is_refilled_a_worker_count_at_a_time() -> None:
    """Each submission wakes the executor's threads, so the engine waits until one chunk per
    worker has come back and then sends that many at once, instead of one per result."""
    events: list[str] = []

    class Recording(SerialExecutor):  # finishes each chunk at submit: the order is exact
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            events.append("send")
            return super().submit(fn, *args, **kwargs)

    loop = parallel_loop(square, workers=2, chunksize=1, backend=Recording())
    for _ in loop.imap(range(10)):
        events.append("take")
    first = ["send"] * 4  # the window: 2 chunks per worker
    refill = ["take", "take", "send", "send"]
    assert events[:4] == first
    assert events[4:12] == refill * 2
    assert events.count("send") == events.count("take") == 10
