"""The loops of the suite and, for each loop, the runners that race on it.

A runner is one way to run a loop: the plain serial loop, a peer library written the way its
documentation suggests, or autopar. Its ``run`` is the timed region and returns the loop's
results in input order, in a form that is compared with the serial loop's. ``setup`` runs
(untimed) before every timed run: it is how "cold" runners close pools and "warm" ones make sure
theirs are started. ``prepare``/``finish`` run once per loop, around all repeats, for pools that
a "(warm)" runner keeps open outside the timed region.

Peers run with the fork start method (spelled out, so a newer Python's default changes nothing),
except joblib, whose loky backend cannot fork.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import workloads as wl

import autopar
from autopar import parallel_loop

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")
MIB = 1024 * 1024


def _nothing() -> None:
    return None


@dataclass
class Runner:
    name: str
    run: Callable[[], list[Any]]
    setup: Callable[[], None] = _nothing
    prepare: Callable[[], None] = _nothing
    finish: Callable[[], None] = _nothing
    cap: int | None = None  # iterations it runs when fewer than the loop's (its time is scaled up)
    note: str = ""
    info: Callable[[], str] | None = None  # a note read after the runs (autopar's chunk size)


@dataclass
class Loop:
    name: str
    description: str
    iterations: int
    runners: list[Runner]  # runners[0] is the serial reference
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
    workers: int
    quick: bool

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def add_peer(module: str, make: Callable[[], list[Runner]], runners: list[Runner], skipped: list[str]) -> None:
    """Add an optional peer's runners when it is installed; otherwise say it was skipped."""
    if have(module):
        runners += make()
    else:
        skipped.append(f"{module}: not installed")


def with_note(runner: Runner, note: str, *, append: bool = False) -> Runner:
    runner.note = f"{runner.note}; {note}" if append else note
    return runner


def pebble(fn: Callable[..., Any], items: Sequence[Any], cfg: Config) -> Runner:
    from pebble import ProcessPool

    def run() -> list[Any]:
        with ProcessPool(max_workers=cfg.workers, context=FORK) as p:
            return list(p.map(fn, items).result())

    return Runner("pebble", run, note="ProcessPool(n).map, chunksize=1, pool start included")


def tuned_chunksize(n: int, workers: int) -> int:
    return max(1, math.ceil(n / (4 * workers)))


# --- runner builders -------------------------------------------------------------------------


def serial(fn: Callable[..., Any], items: Sequence[Any], **kwargs: Any) -> Runner:
    return Runner("serial", lambda: [fn(x, **kwargs) for x in items], note="the plain for-loop")


def pool(fn: Callable[..., Any], items: Sequence[Any], cfg: Config, name: str = "pool", note: str = "") -> Runner:
    def run() -> list[Any]:
        with FORK.Pool(cfg.workers) as p:
            return p.map(fn, items)

    return Runner(name, run, note=note or "multiprocessing.Pool(n).map, default chunking, pool start included")


def ppe(
    fn: Callable[..., Any],
    items: Sequence[Any],
    cfg: Config,
    *,
    chunksize: int = 1,
    name: str = "ppe",
    note: str = "",
    cap: int | None = None,
    context: Any = FORK,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Runner:
    todo = items[:cap] if cap else items

    def run() -> list[Any]:
        with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=initializer, initargs=initargs) as ex:
            return list(ex.map(fn, todo, chunksize=chunksize))

    note = note or f"ProcessPoolExecutor(n).map, chunksize={chunksize}, pool start included"
    return Runner(name, run, cap=cap, note=note)


class WarmExecutor:
    """A ProcessPoolExecutor opened before a loop's repeats and closed after them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: Executor | None = None

    def prepare(self) -> None:
        self.executor = ProcessPoolExecutor(self.workers, mp_context=FORK)
        list(self.executor.map(wl.task_trivial, range(4 * self.workers)))

    def finish(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def get(self) -> Executor:
        assert self.executor is not None
        return self.executor


def ppe_warm(fn: Callable[..., Any], items: Sequence[Any], cfg: Config) -> Runner:
    warm = WarmExecutor(cfg.workers)
    chunksize = tuned_chunksize(len(items), cfg.workers)

    def run() -> list[Any]:
        return list(warm.get().map(fn, items, chunksize=chunksize))

    note = f"chunksize={chunksize}; executor started before the timed region"
    return Runner("ppe-tuned (warm)", run, prepare=warm.prepare, finish=warm.finish, note=note)


def joblib_shutdown() -> None:
    """Close loky's reusable executor, so that the next Parallel call starts fresh workers."""
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True)


def joblib_warm_up(workers: int) -> None:
    from joblib import Parallel, delayed

    Parallel(n_jobs=workers)(delayed(wl.task_trivial)(i) for i in range(4 * workers))


def joblib(fn: Callable[..., Any], items: Sequence[Any], cfg: Config, *, warm: bool, **kwargs: Any) -> list[Runner]:
    from joblib import Parallel, delayed

    def run() -> list[Any]:
        return list(Parallel(n_jobs=cfg.workers)(delayed(fn)(x, **kwargs) for x in items))

    if warm:
        setup = functools.partial(joblib_warm_up, cfg.workers)
        note = "loky workers already running (joblib keeps them between calls)"
        return [Runner("joblib (warm)", run, setup=setup, note=note)]
    note = "Parallel(n_jobs=n), auto batching, loky worker start included"
    return [Runner("joblib", run, setup=joblib_shutdown, note=note)]


def joblib_cold_and_warm(fn: Callable[..., Any], items: Sequence[Any], cfg: Config) -> list[Runner]:
    return joblib(fn, items, cfg, warm=False) + joblib(fn, items, cfg, warm=True)


def mpire(fn: Callable[..., Any], items: Sequence[Any], cfg: Config, *, shared: Any = None, note: str = "") -> Runner:
    from mpire import WorkerPool

    def run() -> list[Any]:
        with WorkerPool(n_jobs=cfg.workers, start_method="fork", shared_objects=shared) as p:
            return list(p.map(fn, items, concatenate_numpy_output=False))

    name = "mpire (shared_objects)" if shared is not None else "mpire"
    return Runner(name, run, note=note or "WorkerPool(n).map, default chunking, pool start included")


class AutoparLoop:
    """One autopar loop function, remembering the stats of its last run."""

    def __init__(self, fn: Callable[..., Any], workers: int, **options: Any) -> None:
        options.setdefault("start_method", "fork")
        self.loop = parallel_loop(workers=workers, **options)(fn)
        self.warm_loop = parallel_loop(workers=workers, **options)(wl.task_trivial)
        self.workers = workers
        self.last: autopar.LoopResult[Any] | None = None

    def map(self, items: Sequence[Any], **kwargs: Any) -> autopar.LoopResult[Any]:
        self.last = self.loop.map(items, **kwargs)
        return self.last

    def warm_up(self) -> None:
        """Start the pool (if closed) with a previous, trivial call of the same configuration."""
        self.warm_loop.map(range(4 * self.workers))

    def info(self) -> str:
        if self.last is None:
            return ""
        return f"largest chunk {self.last.stats.chunksize}"


def autopar_runners(
    fn: Callable[..., Any],
    items: Sequence[Any],
    cfg: Config,
    *,
    convert: Callable[[autopar.LoopResult[Any]], list[Any]] = list,
    kwargs: dict[str, Any] | None = None,
    warm: bool = True,
    **options: Any,
) -> list[Runner]:
    kwargs = kwargs or {}
    runners = []
    for is_warm in (False, True) if warm else (False,):
        loop = AutoparLoop(fn, cfg.workers, **options)

        def run(loop: AutoparLoop = loop) -> list[Any]:
            return convert(loop.map(items, **kwargs))

        method = options.get("start_method", "fork")
        tags = ["warm" if is_warm else "cold"] + ([method] if method != "fork" else [])
        tags += [
            f"{option}={options[option]}"
            for option in ("seed", "capture_output", "forward_logging")
            if option in options
        ]
        name = f"autopar ({', '.join(tags)})"
        setup = loop.warm_up if is_warm else autopar.shutdown
        note = "pool started by a previous call" if is_warm else "after autopar.shutdown(): pool start included"
        runners.append(Runner(name, run, setup=setup, note=note, info=loop.info))
    return runners


def standard(
    fn: Callable[..., Any], items: Sequence[Any], cfg: Config, *, ppe_cap: int | None = None, with_pebble: bool = False
) -> tuple[list[Runner], list[str]]:
    """Every runner of a loop whose iterations take one positional argument."""
    n = len(items)
    runners = [
        serial(fn, items),
        pool(fn, items, cfg),
        ppe(fn, items, cfg, cap=ppe_cap),
        ppe(fn, items, cfg, chunksize=tuned_chunksize(n, cfg.workers), name="ppe-tuned"),
        ppe_warm(fn, items, cfg),
    ]
    skipped: list[str] = []
    add_peer("joblib", lambda: joblib_cold_and_warm(fn, items, cfg), runners, skipped)
    add_peer("mpire", lambda: [mpire(fn, items, cfg)], runners, skipped)
    if with_pebble:
        add_peer("pebble", lambda: [pebble(fn, items, cfg)], runners, skipped)
    runners += autopar_runners(fn, items, cfg)
    return runners, skipped


# --- the loops -------------------------------------------------------------------------------


def _over_indices(name: str, fn: Callable[[int], Any], n: int, description: str, cfg: Config) -> Loop:
    """A loop calling ``fn(i)`` for i in range(n), with the standard runners."""
    runners, skipped = standard(fn, list(range(n)), cfg)
    return Loop(name, description, n, runners, skipped)


def loop_25ms(cfg: Config) -> Loop:
    n = cfg.size(64, 16)
    return _over_indices("25ms", wl.task_25ms, n, f"{n} iterations x 25 ms", cfg)


def loop_compute(cfg: Config) -> Loop:
    n = cfg.size(64, 16)
    description = f"{n} iterations x {wl.COMPUTE_STEPS:,} steps of pure-Python arithmetic (about 25 ms each)"
    return _over_indices("compute", wl.task_compute, n, description, cfg)


def loop_100ms(cfg: Config) -> Loop:
    n = cfg.size(32, 8)
    return _over_indices("100ms", wl.task_100ms, n, f"{n} iterations x 100 ms", cfg)


def loop_tiny(cfg: Config) -> Loop:
    n = cfg.size(100_000, 20_000)
    cap = cfg.size(5_000, 2_000)
    runners, skipped = standard(wl.task_tiny, list(range(n)), cfg, ppe_cap=cap)
    # What the options that watch each iteration cost: seed= (under 10 %), capture_output=
    # (under 15 %), and forward_logging, on by default (nothing, when nothing is logged).
    for option in ({"seed": 1}, {"capture_output": True}, {"forward_logging": False}):
        runners += autopar_runners(wl.task_tiny, list(range(n)), cfg, **option)
    return Loop("tiny", f"{n:,} iterations x 5 us", n, runners, skipped)


def _heavy_description(costs: list[float], order: str) -> str:
    return (
        f"{len(costs)} iterations, Pareto(alpha=1.5) costs, mean {1e3 * sum(costs) / len(costs):.1f} ms, "
        f"median {1e3 * sorted(costs)[len(costs) // 2]:.1f} ms, max {1e3 * max(costs):.0f} ms, {order}"
    )


def loop_heavy_tail_random(cfg: Config) -> Loop:
    costs = wl.heavy_tail_costs(cfg.size(200, 60))
    runners, skipped = standard(wl.task_cost, costs, cfg)
    return Loop("heavy_tail_random", _heavy_description(costs, "random order"), len(costs), runners, skipped)


def loop_heavy_tail_cheapest_first(cfg: Config) -> Loop:
    costs = sorted(wl.heavy_tail_costs(cfg.size(200, 60)))
    runners, skipped = standard(wl.task_cost, costs, cfg)
    return Loop("heavy_tail_cheapest_first", _heavy_description(costs, "cheapest first"), len(costs), runners, skipped)


def loop_broadcast(cfg: Config) -> Loop:
    import numpy as np

    n = cfg.size(200, 40)
    mib = cfg.size(100, 25)
    big = np.random.default_rng(0).random(mib * MIB // 8)
    items = list(range(n))
    tuned = tuned_chunksize(n, cfg.workers)
    partial = functools.partial(wl.task_broadcast, big=big)
    runners = [
        serial(wl.task_broadcast, items, big=big),
        pool(
            partial, items, cfg, name="pool (partial)", note="Pool.map(partial(f, big=array)): array pickled per chunk"
        ),
        ppe(
            partial,
            items,
            cfg,
            name="ppe (partial)",
            cap=cfg.size(6, 4),
            note="PPE.map(partial(f, big=array)), chunksize=1: array pickled per iteration",
        ),
        ppe(
            partial,
            items,
            cfg,
            chunksize=tuned,
            name="ppe-tuned (partial)",
            note=f"PPE.map(partial(f, big=array)), chunksize={tuned}: array pickled per chunk",
        ),
        ppe(
            wl.task_broadcast_global,
            items,
            cfg,
            chunksize=tuned,
            name="ppe-tuned + initializer",
            initializer=wl.set_big,
            initargs=(big,),
            note=f"best peer: once-per-worker initializer stores the array (inherited by fork), chunksize={tuned}",
        ),
    ]
    skipped: list[str] = []
    add_peer(
        "joblib",
        lambda: [
            with_note(
                joblib(wl.task_broadcast, items, cfg, warm=False, big=big)[0],
                "the array goes by joblib's automatic memmapping",
                append=True,
            ),
            *joblib(wl.task_broadcast, items, cfg, warm=True, big=big),
        ],
        runners,
        skipped,
    )
    note = "WorkerPool(n, shared_objects=array): inherited by fork, no pickling"
    add_peer("mpire", lambda: [mpire(wl.task_broadcast_shared, items, cfg, shared=big, note=note)], runners, skipped)
    runners += autopar_runners(wl.task_broadcast, items, cfg, kwargs={"big": big})
    runners[-2].note += "; f.map(xs, big=array)"
    return Loop(
        "broadcast_100mib", f"{n} iterations x 2 ms, one constant {mib} MiB array as a keyword", n, runners, skipped
    )


def _serial_outcomes(items: Sequence[int]) -> list[Any]:
    out = []
    for i in items:
        try:
            out.append(wl.outcome_ok(wl.task_maybe_fail(i)))
        except Exception as exc:
            out.append(wl.outcome_error(exc))
    return out


def _autopar_outcomes(result: autopar.LoopResult[Any]) -> list[Any]:
    out = [wl.outcome_ok(value) for value in result]
    for failure in result.failures:
        out[failure.index] = wl.outcome_error(failure.exception)
    return out


def _ppe_as_completed(items: Sequence[int], cfg: Config) -> Runner:
    def run() -> list[Any]:
        out: list[Any] = [None] * len(items)
        with ProcessPoolExecutor(cfg.workers, mp_context=FORK) as ex:
            futures = {ex.submit(wl.task_maybe_fail, i): position for position, i in enumerate(items)}
            for future in as_completed(futures):
                exc = future.exception()
                out[futures[future]] = wl.outcome_ok(future.result()) if exc is None else wl.outcome_error(exc)
        return out

    return Runner("ppe as_completed", run, note="one future per iteration, submit + as_completed")


def loop_collect_errors(cfg: Config) -> Loop:
    n = cfg.size(2000, 500)
    items = list(range(n))
    safe = wl.safe_maybe_fail
    runners = [
        Runner("serial", lambda: _serial_outcomes(items), note="for-loop with try/except"),
        pool(safe, items, cfg, note="Pool.map over a try/except wrapper"),
        ppe(safe, items, cfg, note="PPE.map over a try/except wrapper, chunksize=1"),
        ppe(
            safe,
            items,
            cfg,
            chunksize=tuned_chunksize(n, cfg.workers),
            name="ppe-tuned",
            note=f"PPE.map over a try/except wrapper, chunksize={tuned_chunksize(n, cfg.workers)}",
        ),
        _ppe_as_completed(items, cfg),
    ]
    skipped: list[str] = []
    add_peer("joblib", lambda: joblib_cold_and_warm(safe, items, cfg), runners, skipped)
    note = "WorkerPool(n).map over a try/except wrapper"
    add_peer("mpire", lambda: [mpire(safe, items, cfg, note=note)], runners, skipped)
    runners += autopar_runners(wl.task_maybe_fail, items, cfg, convert=_autopar_outcomes, on_error="collect")
    description = f"{n} iterations x 0.5 ms, every {wl.ERROR_EVERY}th raises ValueError; collect values and failures"
    return Loop("collect_errors", description, n, runners, skipped)


def loop_numpy_args(cfg: Config) -> Loop:
    import numpy as np

    n = cfg.size(200, 50)
    rng = np.random.default_rng(1)
    arrays = [rng.random(131072) for _ in range(n)]
    runners, skipped = standard(wl.task_array_sum, arrays, cfg)
    return Loop(
        "numpy_1mb_args",
        f"{n} iterations, each gets its own 1 MiB float64 array, returns arr.sum()",
        n,
        runners,
        skipped,
    )


def loop_numpy_results(cfg: Config) -> Loop:
    n = cfg.size(200, 50)
    runners, skipped = standard(wl.task_array_1mb, list(range(n)), cfg, with_pebble=True)
    runners += autopar_runners(wl.task_array_1mb, list(range(n)), cfg, warm=False, start_method="spawn")
    description = f"{n} iterations, each builds and returns its own 1 MiB float64 array (about 1.5 ms of work)"
    return Loop("numpy_1mb_results", description, n, runners, skipped)


def loop_large_dict_results(cfg: Config) -> Loop:
    n = cfg.size(100, 25)
    runners, skipped = standard(wl.task_large_dict, list(range(n)), cfg, with_pebble=True)
    description = f"{n} iterations, each returns a dict of {wl.DICT_ENTRIES:,} small tuples (a pickle of about 1 MiB)"
    return Loop("large_dict_results", description, n, runners, skipped)


def loop_cold_start(cfg: Config) -> Loop:
    n = 4
    items = list(range(n))
    fn = wl.task_trivial
    runners = [
        serial(fn, items),
        pool(fn, items, cfg, note="fresh multiprocessing.Pool(n), fork"),
        ppe(fn, items, cfg, note="fresh ProcessPoolExecutor(n), fork"),
        ppe(fn, items, cfg, name="ppe (spawn)", context=SPAWN, note="fresh ProcessPoolExecutor(n), spawn"),
    ]
    skipped: list[str] = []
    fresh_loky = "fresh loky workers (loky cannot fork)"
    add_peer("joblib", lambda: [with_note(joblib(fn, items, cfg, warm=False)[0], fresh_loky)], runners, skipped)
    add_peer("mpire", lambda: [mpire(fn, items, cfg, note="fresh WorkerPool(n), fork")], runners, skipped)
    runners += autopar_runners(fn, items, cfg)
    runners += autopar_runners(fn, items, cfg, warm=False, start_method="spawn")
    return Loop("cold_start", f"first call: {n} trivial iterations, pool start included", n, runners, skipped)


def loop_float64_results(cfg: Config) -> Loop:
    n = cfg.size(2_000_000, 200_000)
    cap = cfg.size(5_000, 2_000)
    runners, skipped = standard(wl.task_monte_carlo_float64, list(range(n)), cfg, ppe_cap=cap)
    return Loop("float64_results", f"{n:,} iterations x ~2 us, each returns an np.float64", n, runners, skipped)


def loop_float_results(cfg: Config) -> Loop:
    n = cfg.size(2_000_000, 200_000)
    cap = cfg.size(5_000, 2_000)
    runners, skipped = standard(wl.task_monte_carlo_float, list(range(n)), cfg, ppe_cap=cap)
    return Loop(
        "float_results",
        f"{n:,} iterations x ~2 us, each returns float(x): float64_results' twin",
        n,
        runners,
        skipped,
    )


LOOPS: dict[str, Callable[[Config], Loop]] = {
    "25ms": loop_25ms,
    "compute": loop_compute,
    "100ms": loop_100ms,
    "tiny": loop_tiny,
    "heavy_tail_random": loop_heavy_tail_random,
    "heavy_tail_cheapest_first": loop_heavy_tail_cheapest_first,
    "broadcast_100mib": loop_broadcast,
    "collect_errors": loop_collect_errors,
    "numpy_1mb_args": loop_numpy_args,
    "numpy_1mb_results": loop_numpy_results,
    "large_dict_results": loop_large_dict_results,
    "float64_results": loop_float64_results,
    "float_results": loop_float_results,
    "cold_start": loop_cold_start,
}
NEEDS_NUMPY = {"broadcast_100mib", "numpy_1mb_args", "numpy_1mb_results", "float64_results", "float_results"}
