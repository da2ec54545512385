"""What ``forward_logging`` costs a loop that logs nothing: ``python benchmarks/forward_logging.py``.

Runs the ``tiny`` loop (100,000 iterations of 5 us, `workloads.task_tiny`) on autopar's warm
process pool with ``forward_logging=True`` (the default) and ``forward_logging=False``, in
alternating order, ``--repeat`` times each, and prints the median and range of each. The
parent's logging is configured as a program's would be (``basicConfig`` at INFO), so the
workers get levels to apply. Options: ``--repeat N`` (default 7), ``--n N`` (iterations),
``--backend process|thread|serial``. Run it on a quiet machine (``uptime`` load below 1): a
busy one spreads the runs (on 2 cores, some take twice as long), and then the fastest runs
compare better than the medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import workloads as wl  # benchmarks/, on the path as this script's folder

from autopar import parallel_loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--backend", default="process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(autopar_index)s %(levelname)s %(message)s")
    xs = list(range(args.n))
    loops = {
        setting: parallel_loop(wl.task_tiny).options(backend=args.backend, forward_logging=setting)
        for setting in (True, False)
    }
    expected = [x * x for x in xs]
    for loop in loops.values():  # warm: the pool started, the function cached in the workers
        loop.map(xs[:2000])
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.repeat):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for setting in order:
            started = time.perf_counter()
            values = list(loops[setting].map(xs))
            times[setting].append(time.perf_counter() - started)
            assert values == expected
    load = os.getloadavg()[0]
    print(f"{args.n:,} iterations x 5 us, backend={args.backend}, {args.repeat} runs each, load {load:.2f}")
    for setting in (True, False):
        ms = [t * 1000 for t in times[setting]]
        spread = f"{min(ms):.1f}-{max(ms):.1f}"
        print(f"forward_logging={setting!s:5}  median {statistics.median(ms):7.1f} ms  min-max {spread}")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    best = min(times[True]) / min(times[False])  # other work on the machine only adds time
    print(f"on / off: {ratio:.3f} (medians), {best:.3f} (fastest runs)")


if __name__ == "__main__":
    main()
