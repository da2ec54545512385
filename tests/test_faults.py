"""Fault injection: a crash, a hang or a bad value costs one iteration, never the loop.

In the style of loky's ``crash_cases`` and CPython's ``test_deadlock.py``: a table of where
a fault strikes, how, and what the user must see; every case under every start method, each
bounded by a timeout, with a leak check after it.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import autopar
from _helpers import (
    ErrorFailsToPickle,
    FailsToPickle,
    FailsToUnpickle,
    SlowToUnpickle,
    crash_beside_a_bystander,
    crash_in_call,
    crash_once,
    describe_arg,
    exit_after,
    exit_at,
    fails_the_first_time,
    flaky_at_3,
    initialized,
    log_start,
    raise_base,
    raise_fault,
    remember,
    return_fault,
    sleep_then,
    slow_head,
    square,
    waits_on_a_tool,
    whoami,
)
from autopar import IterationTimeout, SerializationError, WorkerCrashed, parallel_loop
from autopar._chunking import MAX_CHUNK
from autopar._shared import segment_prefix
from autopar._slots import process_exists
from conftest import run_script, worker_children

DEV_SHM = Path("/dev/shm")


def shm_segments() -> set[str]:
    """This process's shared-memory segments."""
    prefix = segment_prefix()
    return {p.name for p in DEV_SHM.iterdir() if p.name.startswith(prefix)} if DEV_SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test and autopar.shutdown(): no worker process, thread or segment left."""
    threads, segments = set(threading.enumerate()), shm_segments()
    yield
    autopar.shutdown()
    deadline = time.monotonic() + 5
    while worker_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_children() == []
    assert shm_segments() - segments == set()
    left = [t for t in set(threading.enumerate()) - threads if t.is_alive() and not t.daemon]
    assert left == []


def arguments(where: str, fault: str) -> list[Any]:
    """Eight arguments, the fourth of which fails at ``where``."""
    special = {"pickle": FailsToPickle, "unpickle": FailsToUnpickle}[where](fault)
    return [0, 1, 2, special, 4, 5, 6, 7]


# (where, how, what the user sees: exception type and the start of its message)
CASES: list[Any] = [
    ("call", "raise", RuntimeError, "injected"),
    ("call", "exit", WorkerCrashed, "worker process {pid} died while running this iteration: exited with code 7"),
    ("call", "segfault", WorkerCrashed, "worker process {pid} died while running this iteration: killed by SIGSEGV"),
    ("call", "kill", WorkerCrashed, "worker process {pid} died while running this iteration: killed by SIGKILL: out"),
    ("call", "hang", IterationTimeout, "the iteration ran longer than timeout=1 s"),
    ("call", "stubborn", IterationTimeout, "the iteration ran longer than timeout=1 s"),  # SIGKILL after 1 s
    ("argument pickle", "raise", SerializationError, "arguments of iteration 3 could not be pickled: RuntimeError"),
    ("argument unpickle", "raise", SerializationError, "arguments of this chunk could not be unpickled in the worker"),
    ("argument unpickle", "exit", WorkerCrashed, "worker process {pid} died while unpickling this iteration's argu"),
    ("argument unpickle", "segfault", WorkerCrashed, "worker process {pid} died while unpickling this iteration's a"),
    ("result pickle", "raise", SerializationError, "result of iteration 3 could not be pickled: RuntimeError: inj"),
    ("result pickle", "exit", WorkerCrashed, "worker process {pid} died while pickling this iteration's result"),
    ("result pickle", "segfault", WorkerCrashed, "worker process {pid} died while pickling this iteration's result"),
    ("result pickle", "hang", IterationTimeout, "pickling this iteration's result ran longer than timeout=1 s"),
    ("result unpickle", "raise", SerializationError, "result of iteration 3 could not be unpickled: RuntimeError"),
    ("exception pickle", "raise", ErrorFailsToPickle, "raise"),  # rebuilt from its class, args and __dict__
    ("exception pickle", "exit", WorkerCrashed, "worker process {pid} died while pickling this iteration's result"),
]


def run_case(where: str, how: str, start_method: str) -> autopar.LoopResult[Any]:
    options: dict[str, Any] = {"workers": 2, "on_error": "collect", "start_method": start_method}
    if where == "call":
        return parallel_loop(crash_in_call, timeout=1.0, **options).map(range(8), how=how)
    if where.startswith("argument"):
        return parallel_loop(describe_arg, **options).map(arguments(where.split()[1], how))
    if where.startswith("result"):
        options["timeout"] = 1.0  # pickling the result counts, or a hung __reduce__ would hang the loop
        return parallel_loop(return_fault, **options).map(range(8), kind=where.split()[1], fault=how)
    return parallel_loop(raise_fault, **options).map(range(8), fault=how)


@pytest.mark.parametrize(("where", "how", "error", "message"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fault_costs_only_its_iteration(where: str, how: str, error: type, message: str, start_method: str) -> None:
    res = run_case(where, how, start_method)
    assert [f.index for f in res.failures] == [3], res.failures
    failure = res.failures[0]
    assert isinstance(failure.exception, error), failure
    pid = getattr(failure.exception, "pid", None)
    assert str(failure.exception).startswith(message.format(pid=pid)), str(failure.exception)
    assert [res[i] for i in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 4, 5, 6, 7]
    # The same decorated function works on its next call.
    assert list(parallel_loop(describe_arg, workers=2, start_method=start_method).map(range(4))) == [0, 1, 2, 3]


def test_crash_under_raise_is_raised_as_worker_crashed() -> None:
    with pytest.raises(WorkerCrashed, match="exited with code 7") as info:
        parallel_loop(crash_in_call, workers=2).map(range(8), how="exit")
    assert info.value.__notes__[0].startswith("iteration 3: crash_in_call(3, how='exit')")
    assert info.value.exitcode == 7


def test_retries_recover_from_a_crash(tmp_path: Path) -> None:
    res = parallel_loop(crash_once, workers=2, retries=1).map(range(6), marker=str(tmp_path / "m"))
    assert list(res) == list(range(6))


def test_a_crash_that_repeats_fails_after_its_retries() -> None:
    res = parallel_loop(crash_in_call, workers=2, retries=2, on_error="collect").map(range(6), how="exit")
    assert [(f.index, f.attempts) for f in res.failures] == [(3, 3)]


def test_timeout_is_per_iteration_not_per_chunk() -> None:
    """Ten 0.1 s iterations in one chunk are fine with timeout=0.5."""
    res = parallel_loop(sleep_then, workers=2, chunksize=10, timeout=0.5).map([0.1] * 10)
    assert res.ok


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_timeout_on_backends_that_cannot_kill_fails_the_iteration_afterwards(backend: str) -> None:
    """Threads cannot be stopped: the overdue iteration runs to its end, then fails."""
    res = parallel_loop(sleep_then, backend=backend, timeout=0.2, on_error="collect").map([0.0, 0.5, 0.0])
    assert [f.index for f in res.failures] == [1]
    assert isinstance(res.failures[0].exception, IterationTimeout)
    assert "cannot stop a running iteration" in str(res.failures[0].exception)


def test_imap_stops_an_overdue_iteration_while_the_consumer_is_busy() -> None:
    """imap hands control back between results; the clock is watched all the same."""
    results = parallel_loop(sleep_then, workers=2, chunksize=1, timeout=0.3, on_error="collect").imap([0.0, 30.0, 0.0])
    assert next(results) == 0.0
    workers = {child.pid for child in worker_children()}
    time.sleep(1.5)  # the consumer is busy: iteration 1 overruns meanwhile
    assert workers - {child.pid for child in worker_children()}, "no worker was stopped while the consumer was busy"
    assert list(results) == [None, 0.0]
    [failure] = results.failures
    assert isinstance(failure.exception, IterationTimeout)
    assert "its worker (pid" in str(failure.exception)


def test_a_hung_iteration_that_outlives_its_loop_is_still_stopped() -> None:
    """on_error="raise" stops at the first failure while another iteration hangs: its worker
    is stopped at the timeout all the same, not left hung under the next loop."""
    calc = parallel_loop(crash_in_call, workers=2, chunksize=1, timeout=0.5)
    with pytest.raises(ValueError):
        calc.map([4, 3], how="hang_or_raise")  # 4 fails first in the input too
    hung = {child.pid for child in worker_children()}
    deadline = time.monotonic() + 10
    while hung & {child.pid for child in worker_children()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not hung & {child.pid for child in worker_children()}, "the hung worker was left running"
    assert list(parallel_loop(describe_arg, workers=2).map(range(4))) == [0, 1, 2, 3]


def test_max_tasks_per_worker_replaces_workers() -> None:
    pids = parallel_loop(whoami, workers=1, max_tasks_per_worker=2).map(range(8))
    assert len(set(pids)) == 4


def test_a_stopped_iteration_takes_the_processes_it_started_along(tmp_path: Path, start_method: str) -> None:
    """An iteration waiting on an external tool past its timeout: the tool is stopped with its
    worker, not left running under init (joblib's loky stops the whole tree too)."""
    pid_file = tmp_path / "tool"
    calc = parallel_loop(waits_on_a_tool, workers=2, chunksize=1, timeout=1.0, start_method=start_method)
    res = calc.options(on_error="collect").map(range(3), pid_file=str(pid_file))
    assert [type(f.exception) for f in res.failures] == [IterationTimeout]
    tool = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while process_exists(tool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_exists(tool), "the tool was left running"


def test_a_timeout_stays_a_timeout_under_an_inherited_sigterm_handler(tmp_path: Path) -> None:
    """Forked workers inherit the script's SIGTERM handler; stopping an overdue worker ran it,
    and its sys.exit(3) came back as the iteration's failure, ending the program."""
    source = """
    import signal, sys, time
    from autopar import IterationTimeout, parallel_loop

    @parallel_loop(workers=2, timeout=0.5, start_method="fork", chunksize=1)
    def work(x):
        if x == 1:
            time.sleep(30)
        return x

    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, lambda *args: sys.exit(3))
        res = work.options(on_error="collect").map(range(3))
        print([type(f.exception).__name__ for f in res.failures], list(res))
    """
    result = run_script(source, tmp_path)
    assert "['IterationTimeout'] [0, None, 2]" in result.stdout


@pytest.mark.timeout(40)
def test_max_tasks_per_worker_pool_shared_by_two_threads_finishes() -> None:
    """With a backlog (two loops on one pool), concurrent.futures may not replace a worker that
    exited at its limit (CPython gh-115634), and both loops waited forever: it now is."""
    calc = parallel_loop(whoami, workers=2, max_tasks_per_worker=2)
    done: list[int] = []

    def loop() -> None:
        done.append(len(calc.map(range(20))))

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert done == [20, 20]


def test_max_tasks_per_worker_refuses_fork() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker needs start_method='spawn' or 'forkserver'"):
        parallel_loop(whoami, max_tasks_per_worker=2, start_method="fork")


def test_initializer_runs_in_each_worker(start_method: str) -> None:
    calc = parallel_loop(initialized, workers=2, start_method=start_method, initializer=remember, initargs=("ready",))
    assert set(calc.map(range(6))) == {"ready"}
    with_lambda = parallel_loop(initialized, workers=2, start_method=start_method, initializer=lambda: remember(42))
    assert set(with_lambda.map(range(4))) == {42}


@pytest.mark.parametrize(("backend", "where"), [("process", "worker process"), ("thread", "thread 'autopar_")])
def test_a_failing_initializer_fails_each_iteration_with_its_own_exception(backend: str, where: str) -> None:
    """Not the pool breaking again and again (WorkerCrashed, the cause only on stderr): the
    worker stays, and each iteration it is given fails with what the initializer raised."""

    def broken() -> None:
        raise RuntimeError("no model")

    calc = parallel_loop(initialized, workers=2, backend=backend, initializer=broken)
    res = calc.options(on_error="collect").map(range(3))
    assert [f.index for f in res.failures] == [0, 1, 2]
    for failure in res.failures:
        assert isinstance(failure.exception, RuntimeError) and str(failure.exception) == "no model"
        assert failure.exception.__notes__[0].startswith(f"in the initializer, in {where}")
        assert failure.exception.__notes__[1].startswith(f"iteration {failure.index}: ")
        assert 'raise RuntimeError("no model")' in failure.traceback
    with pytest.raises(RuntimeError, match="no model"):
        calc.map(range(3))


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_pool_whose_initializer_failed_is_not_reused(tmp_path: Path, backend: str) -> None:
    """The next loop gets new workers, whose initializer may succeed (the server is up now),
    as when a failing initializer broke the pool; sys.exit() in it is a failure like any."""
    up = str(tmp_path / "up")
    calc = parallel_loop(square, workers=1, backend=backend, initializer=fails_the_first_time, initargs=(up,))
    first = calc.options(on_error="collect").map(range(3))
    assert [type(f.exception) for f in first.failures] == [ConnectionError] * 3
    assert list(calc.map(range(3))) == [0, 1, 4]
    exits = calc.options(initializer=sys.exit, initargs=(3,), on_error="collect").map([1])
    assert type(exits.failures[0].exception) is SystemExit


@pytest.mark.parametrize("backend", ["process", "thread", "serial"])
def test_input_that_fails_part_way_propagates_after_what_it_gave(backend: str) -> None:
    """An input iterator that raises stops the loop cleanly and its exception propagates,
    once the iterations it gave before have run, as in the old loop."""

    def numbers() -> Iterator[int]:
        yield from range(5)
        raise LookupError("input broke")

    calc = parallel_loop(describe_arg, workers=2, backend=backend, chunksize=8)
    with pytest.raises(LookupError, match="input broke") as info:
        calc.map(numbers())
    partial = info.value.partial_result  # type: ignore[attr-defined]
    assert list(partial) == [0, 1, 2, 3, 4] and partial.missing == [] and partial.ok
    seen: list[int] = []
    with pytest.raises(LookupError, match="input broke"):
        seen.extend(calc.imap(numbers()))
    assert seen == [0, 1, 2, 3, 4]
    assert list(calc.map(range(3))) == [0, 1, 2]


@pytest.mark.parametrize(
    ("method", "while_"),
    [("fork", ""), ("spawn", ""), ("forkserver", ""), ("fork", "another thread closes the pool")],
)
def test_ctrl_c_stops_the_loop_and_kills_workers(tmp_path: Path, method: str, while_: str) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import threading, time
            import autopar
            from autopar import parallel_loop

            @parallel_loop(workers=2, chunksize=1, start_method={method!r})
            def slow(x):
                time.sleep(60)

            if __name__ == "__main__":
                if {bool(while_)!r}:  # shutdown() waits for the iterations: Ctrl-C must not
                    threading.Timer(1.0, autopar.shutdown).start()
                print("ready", flush=True)
                slow.map(range(8))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(2.0)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert workers
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 3
    assert b"KeyboardInterrupt" in err
    assert proc.returncode != 0
    time.sleep(0.5)
    assert [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []


ABANDONED_ENDINGS = {  # how the script ends, and what it says as it does
    "raise": ("slow.map([0, 1])", "ValueError: fails at once"),  # iteration 0 fails at once while 1 runs
    "raise_while_an_imap_is_held": (
        "held = slow.imap([-1, -1])\nnext(held)\nslow.map([0, 1])",
        "ValueError: fails at once",
    ),
    "ctrl_c_in_consumer": ("for value in slow.imap([-1, 1]):\n    raise KeyboardInterrupt", "KeyboardInterrupt"),
    "an_imap_left_unfinished": ("found = slow.imap([-1, 1])\nnext(found)\nprint('done')", ""),  # still named
}


@pytest.mark.parametrize("ending", sorted(ABANDONED_ENDINGS))
def test_exit_does_not_wait_for_an_abandoned_iteration(tmp_path: Path, start_method: str, ending: str) -> None:
    """A loop that ended early leaves an iteration running: the program's exit stops it
    instead of waiting for it (concurrent.futures alone waits a minute here)."""
    source = f"""
        import time
        from autopar import parallel_loop

        @parallel_loop(workers=2, chunksize=1, start_method={start_method!r})
        def slow(x):
            if x == 0:
                raise ValueError("fails at once")
            time.sleep(max(60 * x, 0))

        if __name__ == "__main__":
            time.sleep(0.2)  # the pool is started; the second iteration is running
        """
    code, said = ABANDONED_ENDINGS[ending]
    source = textwrap.dedent(source) + textwrap.indent(code, "    ") + "\n"
    started = time.monotonic()
    proc = run_script(source, tmp_path, timeout=50, check=False)
    assert time.monotonic() - started < 15
    assert said in proc.stderr


def test_ctrl_c_returns_at_once_from_a_thread_loop() -> None:
    """A thread cannot be killed: Ctrl-C re-raises at once instead of waiting for the
    iterations already running (they finish in their threads)."""
    calc = parallel_loop(time.sleep, backend="thread", workers=2, chunksize=1)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        calc.map([3.0] * 4)
    assert time.monotonic() - started < 2
    running = [t for t in threading.enumerate() if t.name.startswith("autopar")]
    assert running, "the iterations already running go on in their threads"
    for thread in running:
        thread.join(timeout=10)


def test_ctrl_c_between_batches_of_a_map_kills_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C that lands in the collector, not in the engine, still kills the workers."""
    from autopar import _backends, _collect

    add = _collect._Collector.add

    def interrupted(self: Any, batch: Any) -> Any:
        add(self, batch)
        raise KeyboardInterrupt

    calc = parallel_loop(sleep_then, workers=2, chunksize=1)
    calc.map([0.0])
    workers = {child.pid for child in worker_children()}
    monkeypatch.setattr(_collect._Collector, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calc.map([0.0, 60.0])
    assert not workers & {child.pid for child in worker_children()}, "a worker kept running"
    assert not any(pool.closed for pool in _backends._warm.values()), "the killed pool was left warm"


def test_a_forked_childs_exit_does_not_wait_for_its_abandoned_iteration(tmp_path: Path) -> None:
    """A child made by os.fork() after the parent's loops starts pools of its own: its exit
    stops what its own loops left running, as the parent's does."""
    source = """
        import os, sys, time
        from autopar import parallel_loop

        @parallel_loop(workers=2, chunksize=1, start_method="fork")
        def slow(x):
            if x == 0:
                raise ValueError("fails at once")
            time.sleep(max(30 * x, 0))

        if __name__ == "__main__":
            slow.map([-1])  # the parent's pool, and its exit hooks
            child = os.fork()
            if child == 0:
                try:
                    slow.map([0, 1])
                except ValueError:
                    sys.exit(0)
            started = time.monotonic()
            os.waitpid(child, 0)
            print(f"child exited in {time.monotonic() - started:.1f} s", flush=True)
        """
    proc = run_script(source, tmp_path)
    seconds = float(proc.stdout.split()[-2])
    assert seconds < 10, proc.stderr


def test_a_loop_outliving_the_main_thread_says_why_it_stops(tmp_path: Path) -> None:
    """concurrent.futures refuses new work once the interpreter shuts down: say so, plainly."""
    source = """
        import threading, time
        from autopar import parallel_loop

        @parallel_loop(workers=2, chunksize=1)
        def slow(x):
            time.sleep(0.3)
            return x

        def live():
            try:
                slow.map(range(12))
            except RuntimeError as exc:
                print("stopped:", exc, flush=True)

        if __name__ == "__main__":
            threading.Thread(target=live).start()
            time.sleep(0.3)
        """
    out = run_script(source, tmp_path).stdout
    assert "stopped: the interpreter is shutting down, so no more iterations can start" in out


def test_exit_leaves_a_live_loop_of_another_thread_alone(tmp_path: Path) -> None:
    """Stopping an abandoned iteration breaks its whole pool: not while a loop of a thread
    still running uses that pool (it could not resend once the interpreter shuts down)."""
    source = """
        import threading, time
        from autopar import parallel_loop

        @parallel_loop(workers=4, chunksize=1)
        def slow(x):
            if x == 0:
                raise ValueError("fails at once")
            time.sleep(2)
            return x

        def live():
            print("live loop:", list(slow.map([5, 6])), flush=True)

        if __name__ == "__main__":
            try:
                slow.map([0, 1])  # abandons iteration 1
            except ValueError:
                pass
            threading.Thread(target=live).start()
            time.sleep(0.5)
        """
    proc = run_script(source, tmp_path, timeout=50)
    assert "live loop: [5, 6]" in proc.stdout, proc.stderr


def test_ctrl_c_in_one_loop_costs_another_loop_on_the_pool_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C kills the pool under the interrupted loop; a loop of another thread on the
    same pool sends its calls again, and does not take the killed workers for crashes."""
    from autopar import _collect

    calc = parallel_loop(sleep_then, workers=4, chunksize=1, on_error="collect")
    calc.map([0.0])
    out: dict[str, Any] = {}
    other = threading.Thread(target=lambda: out.update(res=calc.map([1.0, 1.0])))
    other.start()
    time.sleep(0.3)
    add = _collect._Collector.add

    def interrupted(self: Any, batch: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        return add(self, batch)

    monkeypatch.setattr(_collect._Collector, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calc.map([0.0, 0.0])
    monkeypatch.undo()
    other.join(60)
    assert list(out["res"]) == [1.0, 1.0] and out["res"].failures == []


def test_an_iterations_own_keyboard_interrupt_does_not_kill_the_pool() -> None:
    calc = parallel_loop(raise_base, workers=2, chunksize=1)
    calc.map([0, 1])
    workers = {child.pid for child in worker_children()}
    with pytest.raises(KeyboardInterrupt, match="stop"):
        calc.map(range(6), exc_type=KeyboardInterrupt)
    assert workers <= {child.pid for child in worker_children()}


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_an_exhausted_input_is_not_read_again_for_a_retry(backend: str, tmp_path: Path) -> None:
    """A retry sent after the input ended must not read it again (a closed file raises)."""

    class ReadOnce:
        def __init__(self) -> None:
            self.items, self.ended = iter(range(4)), False

        def __iter__(self) -> ReadOnce:
            return self

        def __next__(self) -> int:
            if self.ended:
                raise ValueError("I/O operation on closed file")
            try:
                return next(self.items)
            except StopIteration:
                self.ended = True
                raise

    calc = parallel_loop(flaky_at_3, workers=2, chunksize=1, retries=1, backend=backend)
    res = calc.map(ReadOnce(), marker=str(tmp_path / "failed"))
    assert list(res) == [0, 1, 2, 3]


def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, start_method: str) -> None:
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, time
            from autopar import parallel_loop

            def pid(x):
                time.sleep(0.05)
                return os.getpid()

            if __name__ == "__main__":
                pids = set(parallel_loop(pid, workers=2, chunksize=1, start_method={start_method!r}).map(range(8)))
                print(" ".join(map(str, pids)), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    # TMPDIR: the forkserver's socket directory, which the killed parent cannot remove.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30).stdout
    pids = [int(p) for p in out.split()]
    assert pids
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_a_crash_in_one_loop_costs_nothing_in_another_sharing_the_pool() -> None:
    """Two threads' loops share a warm pool; one crashes its workers, the other loses nothing."""
    out: dict[str, Any] = {}
    crashing = parallel_loop(exit_after, workers=2, on_error="collect")
    innocent = parallel_loop(sleep_then, workers=2, on_error="collect")
    threads = [
        threading.Thread(target=lambda: out.update(a=crashing.map([0.05] * 6))),
        threading.Thread(target=lambda: out.update(b=innocent.map([0.2] * 6))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(out["a"].failures) == 6
    assert all(isinstance(f.exception, WorkerCrashed) for f in out["a"].failures)
    assert out["b"].ok
    assert list(out["b"]) == [0.2] * 6


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_shutdown_during_a_loop_in_another_thread_loses_nothing(backend: str) -> None:
    """autopar.shutdown() from another thread: the running loop moves to a new pool."""
    calc = parallel_loop(sleep_then, workers=2, backend=backend, chunksize=1)
    calc.map([0.0])
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(res=calc.map([0.2] * 8)))
    thread.start()
    time.sleep(0.3)
    autopar.shutdown()
    thread.join(60)
    assert list(out["res"]) == [0.2] * 8


def test_timeouts_in_one_loop_cost_nothing_in_another_sharing_the_pool() -> None:
    """Each worker a loop stops for its timeout breaks the shared pool under the other loop
    too: that loop resends what it lost, and never blames it (three such breaks used to fail
    an innocent iteration as a crash)."""
    out: dict[str, Any] = {}
    innocent = threading.Thread(
        target=lambda: out.update(res=parallel_loop(sleep_then, workers=2, on_error="collect").map([2.0]))
    )
    innocent.start()
    time.sleep(0.3)
    hung = parallel_loop(sleep_then, workers=2, chunksize=1, timeout=0.2, on_error="collect").map([30.0] * 4)
    assert [type(f.exception) for f in hung.failures] == [IterationTimeout] * 4
    innocent.join(60)
    assert list(out["res"]) == [2.0] and out["res"].failures == []


def test_an_unpicklable_argument_under_raise_leaves_nothing_running() -> None:
    """The refused iteration raises at once; its chunk-mates are cancelled, no segment leaks."""
    np = pytest.importorskip("numpy")
    calc = parallel_loop(describe_arg, workers=2, chunksize=3)
    with pytest.raises(SerializationError, match="arguments of iteration 1 could not be pickled"):
        calc.map([np.zeros(1 << 17), threading.Lock(), np.zeros(1 << 17)])


@pytest.mark.parametrize("on_error", ["raise", "collect"])
def test_an_unpicklable_function_or_keyword_stops_the_loop_and_names_it(on_error: str) -> None:
    """No iteration can run: the loop raises at once, whatever on_error, and the chunk's
    arguments (big enough for shared memory) leave no segment behind (the fixture checks)."""
    lock = threading.Lock()
    big = [b"x" * (1 << 17)] * 3
    calc = parallel_loop(lambda data, guard: len(data), workers=2, on_error=on_error)
    with pytest.raises(SerializationError, match=r"^keyword argument 'guard' could not be pickled, so no iter"):
        calc.map(big, guard=lock)
    closure = parallel_loop(lambda data: len(data) if lock else 0, workers=2, on_error=on_error)
    with pytest.raises(SerializationError, match=r"^the function \S*<lambda> could not be pickled") as caught:
        closure.map(big)
    assert "cannot pickle '_thread.lock' object" in str(caught.value)


def test_timeout_also_covers_unpickling_the_arguments() -> None:
    res = parallel_loop(describe_arg, workers=2, timeout=1.0, on_error="collect").map([0, 1, SlowToUnpickle(30), 3])
    assert [f.index for f in res.failures] == [2]
    assert isinstance(res.failures[0].exception, IterationTimeout)
    assert [res[i] for i in (0, 1, 3)] == [0, 1, 3]


def test_timeout_does_not_count_importing_the_functions_module() -> None:
    """A fresh spawned worker imports the function's module as it unpickles it: setup, not
    the iteration (a 1.5 s import once failed every iteration of a timeout=1 loop, forever)."""
    from _slow_import import add_one

    calc = parallel_loop(add_one, workers=2, timeout=1.0, start_method="spawn", on_error="collect")
    res = calc.map(range(4))
    assert res.failures == [] and list(res) == [1, 2, 3, 4]


def test_a_crash_under_a_timeout_blames_only_the_crash() -> None:
    """The pool breaks while another iteration runs and the consumer is busy: the slots of
    the dead workers must not look overdue, so the bystander runs again instead of failing
    as a timeout, and the crash is reported as such."""
    calc = parallel_loop(crash_beside_a_bystander, workers=2, chunksize=1, timeout=1.0, on_error="collect")
    results = calc.imap([0, 1, 2, 3])
    assert next(results) == 0
    time.sleep(2.5)  # the consumer is busy well past the bystander's start + timeout
    assert list(results) == [None, 2, 3]
    [failure] = results.failures
    assert failure.index == 1 and isinstance(failure.exception, WorkerCrashed)


def test_shutdown_while_an_iteration_hangs_stops_it_once() -> None:
    """shutdown() in another thread waits for the pool while the hung iteration holds it;
    the timeout stops it; that loop must still learn it was a timeout (it used to read the
    pool's exit codes after shutdown() forgot them, and ran the iteration again)."""
    calc = parallel_loop(sleep_then, workers=1, chunksize=1, timeout=1.0, on_error="collect")
    calc.map([0.0])
    threading.Timer(0.3, autopar.shutdown).start()
    started = time.monotonic()
    res = calc.map([30.0, 0.0])
    assert time.monotonic() - started < 1.9
    [failure] = res.failures
    assert failure.index == 0 and failure.attempts == 1 and isinstance(failure.exception, IterationTimeout)


def test_a_crash_is_handled_while_another_pool_is_still_closing() -> None:
    """One pool's post-mortem does not wait for another pool's close (shutdown() waiting on
    a long iteration in another thread)."""
    slow = parallel_loop(sleep_then, workers=2, chunksize=1, on_error="collect")
    thread = threading.Thread(target=slow.map, args=([6.0] + [0.2] * 7,))
    thread.start()
    time.sleep(0.5)
    threading.Thread(target=autopar.shutdown).start()
    time.sleep(0.3)
    started = time.monotonic()
    res = parallel_loop(crash_beside_a_bystander, workers=1, chunksize=1, on_error="collect").map(range(4))
    assert time.monotonic() - started < 4
    assert [f.index for f in res.failures] == [1]
    thread.join(60)


def test_raise_skips_chunks_already_queued_in_the_executor(tmp_path: Path) -> None:
    """After the first failure is raised, queued chunks are skipped, not run."""
    log = tmp_path / "started"
    log.touch()
    with pytest.raises(ValueError, match="first"):
        parallel_loop(log_start, workers=2, chunksize=1).map(range(12), log=str(log))
    time.sleep(1.5)
    started = log.read_text().split()
    assert len(started) <= 3, started  # the ones already running, never the whole queue


def test_imap_reads_a_bounded_way_ahead_of_a_slow_first_iteration() -> None:
    it = parallel_loop(slow_head, workers=2).imap(itertools.count())
    next(it)
    read = it._collector.dispatcher.counters.consumed
    it.close()
    window = 2 * 2  # chunks in flight for 2 workers
    assert read <= 2 * window * MAX_CHUNK  # what is in flight, and one window of results waiting


def test_a_broken_user_executor_fails_iterations_instead_of_raising() -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as executor:
        res = parallel_loop(exit_at, backend=executor, on_error="collect").map(range(12))
    # Without autopar's slots there is no telling which call killed the pool: every call it
    # held fails (how many depends on timing), and nothing is lost or raised.
    failed = {f.index for f in res.failures}
    assert 3 in failed
    assert all(isinstance(f.exception, WorkerCrashed) for f in res.failures)
    assert all(res[i] == i for i in range(12) if i not in failed)


def test_max_tasks_per_worker_holds_with_a_larger_chunksize() -> None:
    pids = list(parallel_loop(whoami, workers=1, max_tasks_per_worker=2, chunksize=5).map(range(8)))
    assert max(pids.count(pid) for pid in set(pids)) <= 2
