"""forward_logging=True (the default): records that iterations and the initializer emit in
worker processes are handled by this process's logging configuration, with
``record.autopar_index``; in this process (thread, serial) records carry the index too.
The parent's real logging configuration matters, so most checks run a real script."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import re
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from autopar import _logs, parallel_loop
from conftest import START_METHODS, run_script

SCRIPT = """
    import logging, os, sys, threading, time
    from autopar import parallel_loop

    log = logging.getLogger("app")
    lib = logging.getLogger("mylib")

    def setup():
        logging.getLogger("app.setup").info("initializer in %s", os.getpid())

    @parallel_loop(workers=2, initializer=setup, on_error="collect", {options})
    def work(x):
        time.sleep(0.01 * ((7 - x) % 4))  # later iterations often finish first
        log.info("info %d", x)
        log.debug("debug %d", x)
        lib.info("lib info %d", x)
        lib.warning("lib warning %d", x)
        if x == 3:
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("failed %d", x)
        if x == 4:
            log.info("unpicklable extra", extra={{"handle": threading.Lock()}})
        if x == 5:
            helper = threading.Thread(target=lambda: log.info("from a thread of %d", x))
            helper.start()
            helper.join()
        return x

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, format="%(autopar_index)s %(levelname)s %(message)s")
        lib.setLevel(logging.WARNING)
        kept = Keep()
        logging.getLogger().addHandler(kept)
        res = work.map(range(8))
        print("VALUES", list(res))
        extra = [r.handle for r in kept.records if r.getMessage() == "unpicklable extra"]
        print("EXTRA", [type(value).__name__ for value in extra], "lock" in str(extra))
        here = [r for r in kept.records if r.name == "app"]
        print("FROM WORKERS", all(r.process != os.getpid() for r in here))
"""

BACKENDS = [f'backend="process", start_method="{m}"' for m in START_METHODS] + ['backend="thread"', 'backend="serial"']


@pytest.mark.parametrize("options", BACKENDS, ids=lambda text: text.split('"')[-2])
def test_records_reach_the_parents_handlers_with_their_index(options: str, tmp_path: Path) -> None:
    result = run_script(SCRIPT.format(options=options), tmp_path)
    lines = result.stderr.splitlines()
    infos = [line for line in lines if re.fullmatch(r"\d+ INFO info \d+", line)]
    if "process" in options:  # handed over in input order, as results are collected
        assert infos == [f"{x} INFO info {x}" for x in range(8)], result.stderr
    else:  # handled as they are emitted
        assert sorted(infos) == [f"{x} INFO info {x}" for x in range(8)], result.stderr
    assert not [line for line in lines if "DEBUG" in line or "lib info" in line], result.stderr
    assert sorted(line for line in lines if "lib warning" in line) == [f"{x} WARNING lib warning {x}" for x in range(8)]
    failed = lines.index("3 ERROR failed 3")
    assert lines[failed + 1] == "Traceback (most recent call last):"
    assert "ZeroDivisionError: division by zero" in lines[failed + 2 : failed + 8]
    setup = [line for line in lines if re.fullmatch(r"None INFO initializer in \d+", line)]
    assert 1 <= len(setup) <= 2, result.stderr  # once per worker that ran a chunk
    assert "4 INFO unpicklable extra" in lines
    thread_index = 5 if "process" in options else None  # in this process: only the iteration's own thread
    assert f"{thread_index} INFO from a thread of 5" in lines
    assert "VALUES [0, 1, 2, 3, 4, 5, 6, 7]" in result.stdout
    if "process" in options:
        assert "EXTRA ['str'] True" in result.stdout  # replaced by its repr in the worker
        assert "FROM WORKERS True" in result.stdout
    else:
        assert "EXTRA ['lock'] True" in result.stdout


MODES = """
    import logging, os, sys
    from autopar import parallel_loop

    def setup():
        logging.getLogger("app").setLevel(logging.DEBUG)  # the workers' own level

    @parallel_loop(workers=2, initializer=setup, chunksize=2)
    def work(x):
        logging.getLogger("app").info("info %d", x)
        logging.getLogger("app").debug("debug %d", x)
        return x

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, format="%(process)d %(autopar_index)s %(levelname)s %(message)s")
        print("PARENT", os.getpid(), flush=True)
        for forward in sys.argv[2:]:
            print("LOOP", forward, file=sys.stderr, flush=True)
            work.options(start_method=sys.argv[1], forward_logging=forward == "on").map(range(6))
"""


def _loops(stderr: str) -> list[list[str]]:
    """Each loop's log lines, without the process id."""
    loops: list[list[str]] = []
    for line in stderr.splitlines():
        if line.startswith("LOOP"):
            loops.append([])
        elif loops and re.match(r"\d+ ", line):
            loops[-1].append(line.split(" ", 1)[1])
    return loops


def test_without_forwarding_records_stay_in_the_workers(tmp_path: Path) -> None:
    method = "spawn" if "spawn" in START_METHODS else START_METHODS[0]
    result = run_script(MODES, tmp_path, method, "off")
    assert _loops(result.stderr) == [[]], result.stderr  # no handler of the parent's ran there


@pytest.mark.skipif("fork" not in START_METHODS, reason="fork: the workers inherit the parent's handlers")
def test_a_forked_worker_switches_between_loops_with_and_without_forwarding(tmp_path: Path) -> None:
    result = run_script(MODES, tmp_path, "fork", "on", "off", "on")
    parent = re.search(r"PARENT (\d+)", result.stdout)
    assert parent is not None
    forwarded = [f"{x} INFO info {x}" for x in range(6)]
    first, own, again = _loops(result.stderr)
    assert first == forwarded  # once each: the inherited handler printed none of them
    # Without forwarding, the workers' handlers (inherited) print, at the workers' own levels.
    assert sorted(own) == sorted([*forwarded, *(f"{x} DEBUG debug {x}" for x in range(6))]), result.stderr
    assert again == forwarded
    workers_printed = {line.split(" ", 1)[0] for line in result.stderr.splitlines() if " DEBUG " in line}
    assert parent.group(1) not in workers_printed


def test_a_loop_that_ends_leaves_no_record_behind(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test_logs.many")
    res = parallel_loop(_many).options(workers=2, chunksize=7).map(range(200))
    assert list(res) == list(range(200))
    records = [r for r in caplog.records if r.name == "test_logs.many"]
    assert [(r.autopar_index, r.getMessage()) for r in records] == [  # type: ignore[attr-defined]
        (x, f"{x} {k}") for x in range(200) for k in range(5)
    ]


def _many(x: int) -> int:
    for k in range(5):
        logging.getLogger("test_logs.many").info("%d %d", x, k)
    return x


def _flaky(x: int, path: str) -> int:
    logging.getLogger("test_logs.flaky").warning("try %d", x)
    if x == 2 and not os.path.exists(path):
        Path(path).touch()
        raise RuntimeError("first try")
    return x


def test_what_a_retried_try_logged_is_handled_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test_logs.flaky")
    res = parallel_loop(_flaky).options(workers=2, retries=1).map(range(4), path=str(tmp_path / "tried"))
    assert list(res) == list(range(4))
    tries = [(r.autopar_index, r.getMessage()) for r in caplog.records if r.name == "test_logs.flaky"]  # type: ignore[attr-defined]
    assert tries == [(0, "try 0"), (1, "try 1"), (2, "try 2"), (2, "try 2"), (3, "try 3")]


@pytest.mark.skipif("fork" not in START_METHODS, reason="a forked executor")
def test_a_process_pool_of_your_own_forwards_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test_logs.many")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as executor:
        res = parallel_loop(_many).options(backend=executor).map(range(10))
    assert list(res) == list(range(10))
    records = [r for r in caplog.records if r.name == "test_logs.many"]
    assert [r.autopar_index for r in records] == [x for x in range(10) for _ in range(5)]  # type: ignore[attr-defined]
    assert {r.process for r in records} != {os.getpid()}


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_records_in_this_process_carry_the_index(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test_logs.many")
    parallel_loop(_many).options(backend=backend, workers=2).map(range(6))
    records = [r for r in caplog.records if r.name == "test_logs.many"]
    assert sorted((r.autopar_index, r.getMessage()) for r in records) == [  # type: ignore[attr-defined]
        (x, f"{x} {k}") for x in range(6) for k in range(5)
    ]
    logging.getLogger("test_logs.many").info("outside")
    assert caplog.records[-1].autopar_index is None  # type: ignore[attr-defined]


def test_a_record_is_made_picklable() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, "f.py", 1, "n=%d %s", (3, "y"), sys.exc_info(), extra={"lock": threading.Lock(), "n": 5}
        )
    portable = pickle.loads(pickle.dumps(_logs._portable(record, 7)))
    assert type(portable) is logging.LogRecord
    assert (portable.getMessage(), portable.args, portable.exc_info) == ("n=3 y", None, None)
    assert portable.exc_text.startswith("Traceback") and "ValueError: bad" in portable.exc_text
    assert portable.n == 5 and "lock" in portable.lock  # type: ignore[attr-defined]
    assert portable.autopar_index == 7  # type: ignore[attr-defined]
    assert "Traceback" in logging.Formatter().format(portable)


def test_a_message_that_does_not_format_still_comes_back() -> None:
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, "%d items", ("many",), None)
    portable = _logs._portable(record, None)
    assert "%d items" in portable.getMessage() and "could not format" in portable.getMessage()


def test_the_parents_levels_are_applied_and_given_back() -> None:
    mine, other = logging.getLogger("test_logs.mine"), logging.getLogger("test_logs.other")
    mine.setLevel(logging.DEBUG)
    other.setLevel(logging.ERROR)
    root_level = logging.getLogger().level
    try:
        parent = (logging.NOTSET, (("", logging.INFO), ("test_logs.other", logging.WARNING)))
        forwarding = _logs.LogForwarding(parent)
        forwarding.open()
        forwarding.close()
        assert (logging.getLogger().level, mine.level, other.level) == (logging.INFO, logging.NOTSET, logging.WARNING)
        again = _logs.LogForwarding(parent)
        again.open()  # the same levels: nothing walked
        again.close()
        _logs.standalone()
        assert (logging.getLogger().level, mine.level, other.level) == (root_level, logging.DEBUG, logging.ERROR)
    finally:
        _logs.standalone()
        mine.setLevel(logging.NOTSET)
        other.setLevel(logging.NOTSET)


def test_a_chunk_takes_every_record_and_gives_logging_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    levels = _logs.parent_levels()
    forwarding = _logs.LogForwarding(levels)
    forwarding.open()
    try:
        logging.getLogger("test_logs.chunk").info("taken")
    finally:
        forwarding.close()
        _logs.standalone()
    assert "taken" not in caplog.text  # it went to the chunk, not to this process's handlers
    assert [r.getMessage() for r in forwarding.records()[-1]] == ["taken"]  # outside an iteration
    logging.getLogger("test_logs.chunk").info("mine again")
    assert "mine again" in caplog.text


FAILING_SETUP = """
    import logging, sys
    from autopar import parallel_loop

    def setup():
        logging.getLogger("setup").warning("loading the model")
        raise RuntimeError("no model")

    @parallel_loop(workers=2, initializer=setup, on_error="collect", start_method=sys.argv[1])
    def work(x):
        return x

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, format="%(autopar_index)s %(levelname)s %(message)s")
        res = work.map(range(4))
        print("FAILED", len(res.failures))
"""


def test_what_a_failing_initializer_logged_reaches_the_parent(tmp_path: Path) -> None:
    method = "spawn" if "spawn" in START_METHODS else START_METHODS[0]
    result = run_script(FAILING_SETUP, tmp_path, method)
    assert "FAILED 4" in result.stdout
    assert "None WARNING loading the model" in result.stderr.splitlines(), result.stderr
