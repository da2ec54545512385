"""Module-level iteration functions and fault makers, importable by every worker."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from autopar import parallel_loop


def square(x: int) -> int:
    return x * x


def three_outputs(x: int, offset: float = 1.0) -> tuple[int, float, str]:
    return x, x * offset, f"item{x}"


def fail_on(x: int, bad: tuple[int, ...] = (3,), exc_type: type[BaseException] = ValueError) -> int:
    if x in bad:
        raise exc_type(f"bad value {x}")
    return x * 10


def whoami(x: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def return_lock(x: int) -> Any:
    return threading.Lock() if x == 2 else x


class NeedsTwoArgs(Exception):
    """Pickles fine, but cannot be unpickled: BaseException.__reduce__ passes only args."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_needs_two(x: int) -> int:
    if x == 1:
        raise NeedsTwoArgs(x, 2)
    return x


class Unpicklable(Exception):
    """Neither the exception nor its attributes can be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()

    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


class RefusesPickling(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


def raise_refuses_pickling(x: int) -> int:
    if x == 1:
        raise RefusesPickling("nope")
    return x


def raise_unpicklable(x: int) -> int:
    if x == 1:
        raise Unpicklable("nope")
    return x


class ResultBreaksOnLoad:
    """Pickles in the worker, but unpickling raises in the parent."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot rebuild this result")


def return_breaks_on_load(x: int) -> Any:
    return ResultBreaksOnLoad() if x == 1 else x


def die(x: int) -> int:
    if x == 1:
        os._exit(3)
    return x


@parallel_loop(workers=2)
def decorated_square(x: int) -> int:
    """Square x."""
    return x * x


@parallel_loop
def nested_loop(x: int) -> list[int]:
    """Runs a loop inside an iteration: it must run serially in the worker."""
    return list(decorated_square.map(range(x)))


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @parallel_loop(workers=2)
    def scale(self, x: int) -> int:
        return x * self.factor


def array_info(a: Any) -> tuple[float, bool]:
    """The sum of an array and whether the worker may write to it."""
    return float(a.sum()), bool(a.flags.writeable)


def broadcast_sum(x: int, table: Any) -> float:
    return float(table[x])


def bytes_len(x: int, blob: Any) -> tuple[int, int]:
    return len(blob), blob[x]


class CountsLoads:
    """Appends the loading process's pid to a file each time it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_load_counted, (self.path,))


def _load_counted(path: str) -> CountsLoads:
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    return CountsLoads(path)


def uses_counted(x: int, counted: CountsLoads) -> int:
    return x


def native_threads(x: int) -> tuple[str | None, list[int]]:
    """The worker's OpenMP/BLAS thread settings, as the libraries see them."""
    import numpy  # noqa: F401  (loads its BLAS)
    import threadpoolctl

    return os.environ.get("OMP_NUM_THREADS"), [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]
