"""A module that takes 1.5 s to import in a worker process, as a heavy library does."""

from __future__ import annotations

import multiprocessing
import time

if multiprocessing.parent_process() is not None:
    time.sleep(1.5)


def add_one(x: int) -> int:
    return x + 1
