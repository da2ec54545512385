"""The benchmark loops' per-iteration functions and their inputs.

Everything a worker runs is a module-level function of this module, so that every pool
(multiprocessing, concurrent.futures, joblib/loky, mpire, autopar) can pickle it by reference,
under fork and under spawn. Iterations busy-wait on ``time.perf_counter`` instead of sleeping,
so they really hold a CPU, as the loops people want to parallelise do.
"""

from __future__ import annotations

import random
import time
from typing import Any

ERROR_EVERY = 10  # collect_errors: every 10th iteration raises


def spin(seconds: float) -> None:
    """Keep this CPU busy for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def task_25ms(i: int) -> int:
    spin(0.025)
    return i * i


def task_100ms(i: int) -> int:
    spin(0.100)
    return i * i


COMPUTE_STEPS = 340_000  # about 25 ms of pure-Python arithmetic on the 2-core machine of docs/


def task_compute(i: int) -> int:
    """Real CPU work: spinning iterations end on time even while the parent takes their CPU,
    these take longer, as a user's loop would."""
    total = i
    for step in range(COMPUTE_STEPS):
        total = (total + step * step) % 1_000_003
    return total


def task_tiny(i: int) -> int:
    spin(5e-6)
    return i * i


def task_cost(cost: float) -> float:
    """Work for ``cost`` seconds; the heavy-tailed loops pass each iteration its own cost."""
    spin(cost)
    return cost


def task_trivial(i: int) -> int:
    return i + 1


def task_broadcast(i: int, big: Any) -> float:
    """2 ms of work that reads the broadcast array (so it must really be there)."""
    spin(0.002)
    return float(big[(i * 7919) % big.size]) + i


_big: Any = None


def set_big(big: Any) -> None:
    """The once-per-worker initializer of the best concurrent.futures variant."""
    global _big
    _big = big


def task_broadcast_global(i: int) -> float:
    return task_broadcast(i, _big)


def task_broadcast_shared(big: Any, i: int) -> float:
    """mpire passes its ``shared_objects`` as the first argument."""
    return task_broadcast(i, big)


def task_maybe_fail(i: int) -> int:
    spin(0.0005)
    if i % ERROR_EVERY == 0:
        raise ValueError(f"iteration {i} is a multiple of {ERROR_EVERY}")
    return i * i


def outcome_ok(value: Any) -> tuple[Any, ...]:
    return ("ok", value)


def outcome_error(exc: BaseException) -> tuple[Any, ...]:
    return ("error", type(exc).__name__, str(exc))


def safe_maybe_fail(i: int) -> tuple[Any, ...]:
    """The try/except wrapper a peer needs to collect failures instead of stopping at the first."""
    try:
        return outcome_ok(task_maybe_fail(i))
    except Exception as exc:
        return outcome_error(exc)


def task_array_sum(arr: Any) -> float:
    return float(arr.sum())


RESULT_SECONDS = 0.0015


def task_array_1mb(i: int) -> Any:
    """Build and return a 1 MiB float64 array, about 1.5 ms of work in all."""
    import numpy as np

    started = time.perf_counter()
    array = np.random.default_rng(i).random(131072)
    np.sqrt(array, out=array)
    spin(RESULT_SECONDS - (time.perf_counter() - started))
    return array


DICT_ENTRIES = 30_000


def task_large_dict(i: int) -> dict[int, tuple[int, float, str]]:
    """Return a dict of small Python objects that pickles to about 1 MiB."""
    return {k: (i, k / 7, f"item {k}") for k in range(DICT_ENTRIES)}


def heavy_tail_costs(n: int, mean: float = 0.015, alpha: float = 1.5, seed: int = 20240601) -> list[float]:
    """``n`` Pareto-distributed costs in seconds (seeded), scaled so that their mean is ``mean``."""
    rng = random.Random(seed)
    raw = [rng.paretovariate(alpha) for _ in range(n)]
    scale = mean * n / sum(raw)
    return [cost * scale for cost in raw]


def task_monte_carlo_float64(i: int) -> Any:
    """A Monte Carlo step of ~1.8 us that returns what NumPy arithmetic gives: an np.float64."""
    import numpy as np

    x = np.float64(i % 1000) * 0.001
    spin(1.5e-6)
    return x * x


def task_monte_carlo_float(i: int) -> float:
    """The same step returning a builtin float (``float(x)``): the twin to compare with."""
    return float(task_monte_carlo_float64(i))
