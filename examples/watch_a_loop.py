"""Watching a parallel loop: progress, logging and printed output, as the serial loop showed them.

Run it with:  pip install ".[progress]" && python examples/watch_a_loop.py   (tqdm draws the bar)

A legacy loop prints a line per item and logs a warning for odd ones. Run in worker
processes the usual way, those lines come out interleaved, or not at all (a notebook, a
spawned worker whose logging was never configured). With autopar, the printed lines come
back per iteration and are written here in input order (capture_output=True), the log records
are handled by this script's logging configuration with the iteration's index
(forward_logging, on by default), and a progress bar counts the iterations without being torn
by either. as_completed() shows the results as they finish instead, each with its index.
"""

import logging
import time

from autopar import parallel_loop

log = logging.getLogger("survey")


@parallel_loop(workers=2, capture_output=True, progress=True)
def survey(site):
    """One iteration of the legacy loop: some work, a printed line, maybe a warning."""
    time.sleep(0.05 * (site % 3))  # uneven work: iterations finish out of order
    if site % 2:
        log.warning("site %d: odd readings, rechecking", site)
    print(f"site {site}: surveyed")
    return site * site


if __name__ == "__main__":  # required: worker processes may re-import this file (spawn)
    handler = logging.StreamHandler()  # records from this process have no index: "-"
    handler.setFormatter(
        logging.Formatter("  log [iteration %(autopar_index)s] %(message)s", defaults={"autopar_index": "-"})
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    sites = range(8)

    print("map: printed lines and log records in input order, above the progress bar")
    areas = survey.map(sites)
    assert list(areas) == [site * site for site in sites]

    print("\nas_completed: results as they finish, each with its index")
    for index, area in survey.options(progress=False).as_completed(sites):
        print(f"  site {index} done: {area}")
