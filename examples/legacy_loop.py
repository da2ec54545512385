"""The legacy loop, before and after autopar.

Run it with:  python examples/legacy_loop.py

A CPU-bound function is called once per iteration and returns three values that the loop
appends to three lists. autopar runs the same iterations in worker processes and gives the
three lists back, in input order, identical to the serial loop's.
"""

import time

from autopar import parallel_loop

N = 10  # iterations, as in the legacy loop
offset = 0.5


@parallel_loop  # bare decorator: one worker per usable CPU
def calc_stuff(parameter):
    """A pure-Python random walk (~0.1-0.2 s on one core): returns its mean, lowest and highest point."""
    state = int(parameter * 1000) + 12345  # a small linear congruential generator, seeded from parameter
    position = total = low = high = 0
    steps = 1_000_000
    for _ in range(steps):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        position += 1 if state & 0x10000 else -1
        total += position
        if position < low:
            low = position
        elif position > high:
            high = position
    return total / steps, low, high


def legacy_loop():
    """The original code, unchanged: calc_stuff is still an ordinary function when called."""
    output1, output2, output3 = [], [], []
    for j in range(N):
        out1, out2, out3 = calc_stuff(parameter=j * offset)
        output1.append(out1)
        output2.append(out2)
        output3.append(out3)
    return output1, output2, output3


def timed(label, run):
    started = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - started
    print(f"{label:<42} {seconds:6.2f} s")
    return value, seconds


if __name__ == "__main__":  # required: worker processes may re-import this file (spawn)
    print(f"{N} iterations of calc_stuff\n")

    legacy, serial_seconds = timed("legacy for-loop", legacy_loop)

    serial_res, _ = timed(
        'calc_stuff.options(backend="serial").map',
        lambda: calc_stuff.options(backend="serial").map(j * offset for j in range(N)),
    )
    assert serial_res.unzip() == legacy

    # Warm-up: the first parallel loop also starts the worker processes; later loops reuse them.
    calc_stuff.map([0.0])

    res, parallel_seconds = timed("calc_stuff.map (parallel)", lambda: calc_stuff.map(j * offset for j in range(N)))
    output1, output2, output3 = res.unzip()
    assert (output1, output2, output3) == legacy, "parallel outputs differ from the legacy loop"
    print("\nthe three outputs equal the legacy loop's")
    print(f"output2 = {output2}")

    print(f"\nmeasured speedup (legacy / parallel wall time): {serial_seconds / parallel_seconds:.2f}x")
    stats = res.stats
    print("res.stats:")
    print(f"  wall_time  = {stats.wall_time:.2f} s")
    print(f"  busy_time  = {stats.busy_time:.2f} s   (iteration time summed over workers)")
    print(f"  workers    = {stats.workers}")
    print(f"  chunksize  = {stats.chunksize}")
    print(f"  speedup    = {stats.speedup:.2f}     (busy_time / wall_time)")
    print(f"  efficiency = {stats.efficiency:.0%}      (speedup / workers)")
    print(f"\nres.stats.summary: {stats.summary}")
