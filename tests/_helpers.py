"""Module-level iteration functions and fault makers, importable by every worker."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
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


def first_even(numbers: list[int]) -> int:
    """Legacy code: StopIteration when there is none."""
    return next(n for n in numbers if n % 2 == 0)


def raise_unpicklable(x: int) -> int:
    if x == 1:
        exc = Unpicklable("nope")
        exc.add_note("raised with a note")
        raise exc
    return x


class ResultBreaksOnLoad:
    """Pickles in the worker, but unpickling raises in the parent."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot rebuild this result")


def return_breaks_on_load(x: int) -> Any:
    return ResultBreaksOnLoad() if x == 1 else x


@parallel_loop(workers=2)
def decorated_square(x: int) -> int:
    """Square x."""
    return x * x


@parallel_loop
def nested_loop(x: int) -> list[int]:
    """Runs a loop inside an iteration: it must run serially in the worker."""
    return list(decorated_square.map(range(x)))


def pids_inside(x: int) -> tuple[int, set[int]]:
    """This iteration's process, and those the iterations of a loop started inside it ran in."""
    return os.getpid(), set(parallel_loop(whoami, workers=2).map(range(x)))


def which_thread(_: Any) -> int:
    return threading.get_ident()


def threads_inside(x: int) -> tuple[int, set[int]]:
    """This iteration's thread, and those the iterations of a thread loop started inside it ran in."""
    return threading.get_ident(), set(parallel_loop(which_thread, backend="thread", workers=2).map(range(x)))


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @parallel_loop(workers=2)
    def scale(self, x: int) -> int:
        return x * self.factor


def array_info(a: Any) -> tuple[float, bool]:
    """The sum of an array and whether the worker may write to it."""
    return float(a.sum()), bool(a.flags.writeable)


def doubles_in_place(a: Any) -> float:
    a *= 2
    return float(a.sum())


def writes_broadcast(x: int, table: Any) -> float:
    table[0] = x
    return float(table.sum())


def broadcast_sum(x: int, table: Any) -> float:
    return float(table[x])


def bytes_len(x: int, blob: Any) -> tuple[int, int]:
    return len(blob), blob[x]


def bytes_len_slowly(x: int, blob: Any) -> tuple[int, int]:
    time.sleep(0.01)
    return bytes_len(x, blob)


class CountsLoads:
    """Appends the loading process's pid to a file each time it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_load_counted, (type(self), self.path))


def _load_counted(cls: type[CountsLoads], path: str) -> CountsLoads:
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    return cls(path)


def uses_counted(x: int, counted: CountsLoads) -> int:
    return x


def native_threads(x: int) -> tuple[str | None, list[int]]:
    """The worker's OpenMP/BLAS thread settings, as the libraries see them."""
    import numpy  # noqa: F401  (loads its BLAS)
    import threadpoolctl

    return os.environ.get("OMP_NUM_THREADS"), [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]


def os_threads(x: int) -> int:
    """How many threads this process has, as the kernel counts them (native ones included)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


# --- Fault injection: values that fail at one stage of the trip, in one of three ways ---


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def _exit() -> None:
    os._exit(7)


def _raise() -> None:
    raise RuntimeError("injected")


def _hang() -> None:
    time.sleep(60)


FAULTS = {"raise": _raise, "exit": _exit, "segfault": _segfault, "hang": _hang}


def _fault_then(fault: str, value: Any) -> Any:
    FAULTS[fault]()
    return value


class FailsToPickle:
    """Its pickling fails (in whichever process pickles it)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        FAULTS[self.fault]()
        return (str, ("unreachable",))


class FailsToUnpickle:
    """Pickles fine; unpickling it fails (in whichever process unpickles it)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        return (_fault_then, (self.fault, "unreachable"))


def describe_arg(x: Any) -> Any:
    return x if isinstance(x, int) else f"got {type(x).__name__}"


def return_fault(x: int, kind: str, fault: str) -> Any:
    """At x == 3, return a value whose pickling (kind="pickle") or unpickling fails."""
    if x != 3:
        return x
    return FailsToPickle(fault) if kind == "pickle" else FailsToUnpickle(fault)


class ErrorFailsToPickle(Exception):
    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault

    def __reduce__(self) -> Any:
        FAULTS[self.fault]()
        return (str, ("unreachable",))


def raise_fault(x: int, fault: str) -> int:
    if x == 3:
        raise ErrorFailsToPickle(fault)
    return x


def crash_in_call(x: int, how: str) -> int:
    """At x == 3: raise, exit, segfault, kill itself with SIGKILL, or hang (ignoring SIGTERM
    when stubborn). With hang_or_raise, x == 3 hangs and x == 4 raises a little later."""
    import signal

    if x == 4 and how == "hang_or_raise":
        time.sleep(0.2)
        raise ValueError("fails while iteration 3 hangs")
    if x == 3:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how in ("hang", "hang_or_raise"):
            time.sleep(60)
        elif how == "stubborn":  # ignores SIGTERM: only the SIGKILL that follows stops it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
        else:
            FAULTS[how]()
    return x


def crash_once(x: int, marker: str) -> int:
    """Kills its worker the first time it runs for x == 2, then succeeds."""
    if x == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return x


_initialized: Any = None


def remember(value: Any) -> None:
    global _initialized
    _initialized = value


def initialized(x: int) -> Any:
    return _initialized


def soak_iteration(i: int) -> Any:
    """About 1 % crash their worker, 1 % raise, 0.1 % hang, 0.1 % return something unpicklable."""
    if i % 100 == 7:
        os._exit(5)
    if i % 100 == 42:
        raise ValueError(i)
    if i % 1000 == 500:
        time.sleep(3600)
    if i % 1000 == 900:
        return threading.Lock()
    end = time.perf_counter() + 20e-6
    while time.perf_counter() < end:
        pass
    return i * 2


class CountedFunction(CountsLoads):
    """A callable that appends the loading process's pid to a file each time it is unpickled."""

    def __call__(self, x: int) -> int:
        return x + 1


def exit_after(x: float) -> int:
    time.sleep(x)
    os._exit(3)


def append_to(x: int, seen: list[int]) -> list[int]:
    seen.append(x)
    return list(seen)


class SlowToUnpickle:
    """Pickles fine; unpickling it in a worker takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> Any:
        return (_sleep_then_build, (self.seconds,))


def _sleep_then_build(seconds: float) -> str:
    time.sleep(seconds)
    return "built"


def log_start(x: int, log: str) -> int:
    """Iteration 0 raises at once; the others log that they started, then sleep."""
    if x == 0:
        time.sleep(0.3)
        raise ValueError("first")
    with open(log, "a") as file:
        file.write(f"{x}\n")
    time.sleep(1.0)
    return x


def slow_head(x: int) -> bytes:
    if x == 0:
        time.sleep(2.0)
    return b"x" * 1000


def exit_at(x: int, at: int = 3) -> int:
    if x == at:
        os._exit(1)
    return x


initializations: list[Any] = []


def remember_and_count(value: Any) -> None:
    """An initializer that also records each time it runs in this process."""
    initializations.append(value)
    remember(value)


def kib_of_zeros(kib: int) -> bytes:
    return bytes(kib << 10)


def lookup(key: str, table: dict[str, Any]) -> Any:
    return table[key]


def run_inner_and_count(inner: Any) -> int:
    """Run a nested loop, then say how often this process has run its initializer."""
    assert list(inner.map(range(2))) == [_initialized] * 2
    return len(initializations)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


class Abort(BaseException):
    """A BaseException of the user's own, like asyncio.CancelledError."""


def raise_base(x: int, exc_type: type[BaseException] = Abort) -> int:
    if x == 3:
        raise exc_type("stop")
    return x


def crash_beside_a_bystander(x: int) -> int:
    """x == 1 kills its worker at 0.3 s, while x == 2 runs on the other worker until 0.5 s."""
    if x == 1:
        time.sleep(0.3)
        os._exit(3)
    if x == 2:
        time.sleep(0.5)
    return x


def flaky_at_3(x: int, marker: str) -> int:
    """Fails the first time x == 3 runs (anywhere: ``marker`` is a file), then succeeds."""
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(0.3)  # fails after the input has ended
        raise OSError("flaky")
    return x


def fail_slow_then_fast(x: int) -> int:
    """Iteration 0 fails after 0.3 s, iteration 5 at once."""
    if x == 0:
        time.sleep(0.3)
        raise FileNotFoundError("input_0.csv")
    if x == 5:
        raise ValueError("bad row in input_5.csv")
    return x


class ParseError(Exception):
    """An exception whose ``__init__`` formats its message (built again, it would say it twice)."""

    def __init__(self, line: int) -> None:
        super().__init__(f"bad line {line}")
        self.line = line


def raise_odd_exceptions(x: int) -> int:
    """0: a message formatted by __init__; 1: raised while handling a KeyError; 2 and 3: state
    kept in C fields (a file name, a decoding position)."""
    if x == 0:
        raise ParseError(7)
    if x == 2:
        raise FileNotFoundError(2, "missing", "input.csv")
    if x == 3:
        b"\xff".decode("utf-8")
    try:
        {}["k"]
    except KeyError:
        raise ValueError("while handling")  # noqa: B904  (the implicit context is the point)
    return x


class MissingFile(OSError):
    """An OSError subclass with its own __init__: errno and file name live in C fields."""

    def __init__(self, path: str) -> None:
        super().__init__(2, f"missing {path}", path)


class ConfigSyntaxError(SyntaxError):
    def __init__(self, line: int) -> None:
        super().__init__(f"bad at {line}", ("cfg.ini", line, 3, "a = = b\n"))


class Residual(ArithmeticError):
    __slots__ = ("residual",)

    def __init__(self, residual: float) -> None:
        super().__init__(residual)
        self.residual = residual


def raise_with_fields(kind: str) -> None:
    """Exceptions that keep their state outside args and __dict__."""
    if kind == "oserror":
        raise MissingFile("p.txt")
    if kind == "syntax":
        raise ConfigSyntaxError(5)
    if kind == "stop_nan":
        raise StopIteration(float("nan"))
    raise Residual(float("nan"))


def fails_at_once_or_sleeps(x: int) -> int:
    if x == 0:
        raise ValueError("fails at once")
    time.sleep(30)
    return x


def fails_the_first_time(marker: str) -> None:
    """An initializer that finds what it needs only on its second try (a server not up yet)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError("the server is not up yet")


def cached_broadcasts() -> int:
    """In a worker: how many loops' broadcast arguments autopar keeps cached."""
    from autopar import _worker

    return len(_worker._broadcasts)


class KilledWorker(Exception):
    """Named as Dask's (distributed.scheduler.KilledWorker), which autopar knows by name."""


class KillsWorkers(Executor):
    """An executor whose every task ends as Dask's does when its workers keep dying."""

    _max_workers = 2

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(KilledWorker("attempted to run task on 4 different workers, all died"))
        return future


class ForeignPool(Executor):
    """A process pool autopar cannot tell runs on this machine, like a Dask, loky or MPI
    executor: no shared memory, so what a chunk carries is what travels."""

    def __init__(self, workers: int, **options: Any) -> None:
        self._pool = ProcessPoolExecutor(workers, **options)
        self._max_workers = workers
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.futures.append(self._pool.submit(fn, *args, **kwargs))
        return self.futures[-1]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


def waits_on_a_tool(x: int, pid_file: str) -> int:
    """At x == 1: start an external tool (a 60 s sleep), note its pid, and wait for it."""
    if x == 1:
        tool = subprocess.Popen(["sleep", "60"])
        with open(pid_file, "w") as out:
            out.write(str(tool.pid))
        tool.wait()
    return x


# --- large results through shared memory ----------------------------------------------------

RESULT_ITEMS = 1 << 17  # float64: 1 MiB


def big_result(i: int) -> Any:
    """A 1 MiB float64 array of ``i``: its data goes back through shared memory."""
    import numpy as np

    return np.full(RESULT_ITEMS, float(i))


def big_then_die(i: int) -> Any:
    """Iteration 0 returns a big array; iteration 1, in the same chunk, kills its worker."""
    if i == 1:
        os.kill(os.getpid(), 9)
    return big_result(i)


def mixed_results(i: int) -> Any:
    """Results pickled one by one: a dict holding arrays, a small value, one that cannot be
    pickled, and an object whose array is large."""
    import numpy as np

    if i % 4 == 0:
        return {"a": np.full(RESULT_ITEMS, float(i)), "b": np.arange(10), "c": np.full(RESULT_ITEMS // 2, 1.0)}
    if i % 4 == 1:
        return ("small", i)
    if i % 4 == 2:
        return threading.Lock()
    return [np.full(RESULT_ITEMS, float(i)), "x"]


def after_writing_results(action: str) -> None:
    """A worker initializer: once a chunk's large results are written to shared memory, and
    before the parent has them, ``"die"`` (SIGKILL) or ``"stall"`` (sleep a minute)."""
    from autopar import _returns

    write = _returns._write

    def then(out: Any) -> Any:
        written = write(out)
        if action == "die":
            os.kill(os.getpid(), 9)
        time.sleep(60)
        return written

    _returns._write = then


def dev_shm_nearly_full() -> None:
    """A worker initializer: /dev/shm looks nine tenths full to this worker."""
    real = os.statvfs

    def nearly_full(path: Any) -> os.statvfs_result:
        found = real(path)
        fields = list(found)
        fields[3] = fields[4] = found.f_blocks // 10  # f_bfree, f_bavail: a tenth left
        return os.statvfs_result(fields)

    os.statvfs = nearly_full
