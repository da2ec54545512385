"""Is my parallel loop the same as my old loop? A refactor checked by verify().

Run it with:  pip install numpy && python examples/verify_refactor.py

The legacy loop below has the three classic hazards of a loop that is parallelized by the
minimal edit: it counts calls in a global, it normalizes its argument in place (the caller
reads the array afterwards), and it draws from NumPy's global generator without a seed.
Run serially, all three are fine. In worker processes each of them silently changes what
the loop computes. verify() runs the first iterations both ways and says what differs and
what to change; the fixed version verifies clean and gives the same numbers on any number
of workers.
"""

import numpy as np

import autopar
from autopar import parallel_loop

N = 12
calls = 0  # hazard 1: a global counter


def simulate_legacy(weights):
    """The old per-iteration function, as it was."""
    global calls
    calls += 1
    weights /= weights.sum()  # hazard 2: changes its argument in place
    noise = np.random.normal(size=weights.size)  # hazard 3: the process-global generator
    return float(weights @ noise), calls


def legacy_loop(samples):
    return [simulate_legacy(weights) for weights in samples]


# The minimal edit: decorate, then call .map(). It runs, and it is wrong.
simulate_parallel = parallel_loop(workers=2)(simulate_legacy)


@parallel_loop(workers=2, seed=2024)  # seed=: each iteration draws from (seed, index) alone
def simulate(weights, index):
    """The fixed function: no global, no change to its argument, its own random stream."""
    weights = weights / weights.sum()  # a new array: the caller's stays as it was
    noise = autopar.rng().normal(size=weights.size)
    return float(weights @ noise), index + 1  # the count comes from the loop, not a global


def make_samples():
    return [np.arange(1.0, 6.0) * (i + 1) for i in range(N)]


if __name__ == "__main__":  # required: worker processes may re-import this file (spawn)
    print("verify() on the minimal edit:\n")
    report = simulate_parallel.verify(make_samples(), sample=6)
    print(report)
    found = [report.mutated_globals, report.mutated_arguments, report.global_random]
    assert all(found), "verify() should have found all three hazards"

    print("\nverify() on the fixed version:\n")
    fixed_report = simulate.verify(make_samples(), range(N), sample=6)
    print(fixed_report)
    assert fixed_report.ok, fixed_report

    serial = list(simulate.options(backend="serial").map(make_samples(), range(N)))
    for workers in (1, 2, 4):
        parallel = list(simulate.options(workers=workers).map(make_samples(), range(N)))
        assert parallel == serial, f"{workers} workers gave other numbers"
    print(f"\nThe fixed loop gives the same {N} results serially and on 1, 2 and 4 workers.")
    print("To check every loop of a program at once: AUTOPAR_VERIFY=8 python my_program.py")
