"""Some iterations fail: collect the failures, or stop at the first one.

Run it with:  python examples/collect_errors.py
"""

import math

from autopar import parallel_loop

# Raw sensor readings as they come from a file: two of them are bad.
READINGS = ["12.5", "7.0", "n/a", "3.2", "-4.0", "9.9", "1.1", "16.0"]


@parallel_loop
def calibrate(reading, gain=1.0):
    """Parse one reading; return the value, its square root and its inverse."""
    value = float(reading) * gain  # ValueError for "n/a"
    if value < 0:
        raise ValueError(f"negative reading {value}")
    return value, math.sqrt(value), 1 / value


if __name__ == "__main__":  # required: worker processes may re-import this file (spawn)
    # --- on_error="collect": every iteration runs, failures are reported on the result ---
    print('on_error="collect"')
    res = calibrate.options(on_error="collect").map(READINGS, gain=2.0)
    print(f"{len(res) - len(res.failures)} of {len(res)} iterations succeeded (res.ok = {res.ok})")
    for failure in res.failures:
        exc = failure.exception
        print(f"\n  iteration {failure.index}: args={failure.args} kwargs={failure.kwargs}")
        print(f"  {type(exc).__name__}: {exc}")
        print("  worker traceback, last lines:")
        for line in failure.traceback.rstrip().splitlines()[-3:]:
            print(f"    | {line}")

    values, roots, inverses = res.unzip(fill=math.nan)  # failed slots hold NaN: lists stay aligned
    print("\n  reading   value   sqrt")
    for reading, value, root in zip(READINGS, values, roots, strict=True):
        print(f"  {reading:>7} {value:7.1f} {root:6.2f}")

    # --- on_error="raise" (the default): the first failure stops the loop ---
    print('\non_error="raise" (the default)')
    try:
        calibrate.map(READINGS, gain=2.0)
    except ValueError as err:  # the original exception type: old `except ValueError:` still works
        print(f"  caught {type(err).__name__}: {err}")
        print(f"  err.__notes__ = {err.__notes__}")
        print(f"  err.__cause__ is a {type(err.__cause__).__name__} (the worker-side traceback)")
        partial = err.partial_result  # a LoopResult of what was computed before the stop
        print(f"  err.partial_result = {partial}")
        print(f"  failed: {[f.index for f in partial.failures]}, not collected (partial.missing): {partial.missing}")
