"""Large buffers travel through shared memory: read-only views, no copies, no leaks."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from pickle import PickleBuffer
from typing import Any

import pytest

import autopar
from _helpers import (
    CountedFunction,
    CountsLoads,
    append_to,
    array_info,
    broadcast_sum,
    bytes_len,
    doubles_in_place,
    lookup,
    uses_counted,
    writes_broadcast,
)
from autopar import parallel_loop
from autopar._shared import SHARE_ABOVE, pack, release, segment_prefix, unpack

DEV_SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm")


def segments(pid: int | None = None) -> set[str]:
    """The shared-memory segments of this process (or of ``pid``)."""
    prefix = segment_prefix(pid)
    return {p.name for p in DEV_SHM.iterdir() if p.name.startswith(prefix)}


def test_large_buffers_leave_the_pickle_and_come_back() -> None:
    """A large out-of-band buffer goes to a segment; small data stays in the pickle."""
    big, small = bytearray(b"x" * (SHARE_ABOVE * 2)), bytearray(b"y" * 100)
    payload, segment = pack({"big": PickleBuffer(big), "small": PickleBuffer(small)}, shared=True)
    try:
        assert segment is not None and payload.segment == segment.name
        assert len(payload.data) < SHARE_ABOVE
        restored = unpack(payload)
        assert bytes(restored["big"]) == bytes(big)
        assert bytes(restored["small"]) == bytes(small)
        assert restored["big"].readonly
    finally:
        release(segment, reuse=False)
    plain, none = pack(PickleBuffer(big), shared=False)
    assert none is None
    assert plain.segment is None
    assert bytes(unpack(plain)) == bytes(big)


def test_numpy_arguments_arrive_as_writable_views_whose_writes_stay_there() -> None:
    np = pytest.importorskip("numpy")
    arrays = [np.full(50_000, i, dtype=np.float64) for i in range(6)]
    res = parallel_loop(array_info, workers=2).map(arrays)
    assert list(res) == [(50_000.0 * i, True) for i in range(6)]
    sums = parallel_loop(doubles_in_place, workers=2, chunksize=3).map(arrays)
    assert list(sums) == [2 * 50_000.0 * i for i in range(6)]  # each saw only its own write
    assert all((array == i).all() for i, array in enumerate(arrays))  # none reached this process
    again = parallel_loop(array_info, workers=2, chunksize=3).map(arrays)  # the segment, reused
    assert list(again) == [(50_000.0 * i, True) for i in range(6)]


def test_a_broadcast_array_stays_read_only_as_iterations_share_it() -> None:
    np = pytest.importorskip("numpy")
    table = np.ones(100_000)
    res = parallel_loop(writes_broadcast, workers=2, on_error="collect").map(range(2), table=table)
    assert all("read-only" in str(failure.exception) for failure in res.failures)
    assert len(res.failures) == 2


def test_broadcast_array_is_shared_by_every_iteration() -> None:
    np = pytest.importorskip("numpy")
    table = np.arange(1_000_000, dtype=np.float64)
    calc = parallel_loop(broadcast_sum, workers=2, chunksize=1)
    res = calc.map(range(0, 1_000_000, 50_000), table=table)
    assert list(res) == list(range(0, 1_000_000, 50_000))
    assert res.stats.bytes_sent < 1.5 * table.nbytes, "sent once, not with each of the 20 chunks"
    table[0] = 42.0  # a changed array is sent again, never a stale copy
    assert calc.map([0], table=table)[0] == 42.0


def test_without_numpy_any_buffer_object_benefits() -> None:
    """Anything that pickles its data as a PickleBuffer travels through shared memory."""
    blob = bytearray(range(256)) * 1024
    res = parallel_loop(bytes_len, workers=2, chunksize=1).map(range(3), blob=PickleBuffer(blob))
    assert list(res) == [(len(blob), 0), (len(blob), 1), (len(blob), 2)]
    assert res.stats.bytes_sent < 1.5 * len(blob), "sent once, not with each of the 3 chunks"


def test_a_large_pickle_travels_through_shared_memory_too() -> None:
    """A big broadcast of many small objects (no buffer to take out) goes once, as a whole."""
    table = {f"key{i}": i for i in range(100_000)}
    res = parallel_loop(lookup, workers=2, chunksize=1).map(["key7", "key99999"] * 10, table=table)
    assert list(res) == [7, 99_999] * 10
    assert res.stats.bytes_sent < 1.5 * len(pickle.dumps(table))


def test_broadcast_is_unpickled_once_per_worker_and_loop(tmp_path: Path) -> None:
    """Broadcast arguments are unpickled once in each worker, not once per chunk; the next
    loop gets a fresh copy (one an iteration mutated is not handed on)."""
    log = tmp_path / "loads"
    counted = CountsLoads(str(log))
    calc = parallel_loop(uses_counted, workers=2, chunksize=1)
    assert list(calc.map(range(40), counted=counted)) == list(range(40))
    first = log.read_text().split()
    assert len(first) == len(set(first)) <= 2
    assert list(calc.map(range(40), counted=counted)) == list(range(40))
    second = log.read_text().split()[len(first) :]
    assert len(second) == len(set(second)) <= 2


def test_a_mutated_broadcast_does_not_carry_over_to_the_next_loop() -> None:
    calc = parallel_loop(append_to, workers=1)
    assert list(calc.map([1, 2], seen=[])) == [[1], [1, 2]]
    assert list(calc.map([3], seen=[])) == [[3]]


def test_no_segment_outlives_shutdown() -> None:
    np = pytest.importorskip("numpy")
    before = segments()
    parallel_loop(array_info, workers=2).map([np.ones(100_000)] * 4)
    parallel_loop(broadcast_sum, workers=2).map(range(3), table=np.ones(100_000))
    autopar.shutdown()
    assert segments() - before == set()


def test_a_forked_child_leaves_the_parents_kept_segments_alone() -> None:
    np = pytest.importorskip("numpy")
    calc = parallel_loop(broadcast_sum, workers=2)
    table = np.ones(100_000)
    calc.map(range(3), table=table)  # its segment is released, and kept for reuse
    kept = segments()
    assert kept
    child = os.fork()
    if child == 0:  # what a forked child's exit runs, and a loop of its own
        try:
            autopar.shutdown()
            ok = list(calc.options(backend="serial").map(range(2), table=table)) == [1.0, 1.0]
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(child, 0)[1] == 0
    assert segments() >= kept, "the child removed the parent's segments"
    assert list(calc.map(range(3), table=table)) == [1.0, 1.0, 1.0]


def test_a_failed_loop_leaves_no_segment() -> None:
    np = pytest.importorskip("numpy")
    before = segments()

    def boom(a: object) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        parallel_loop(boom, workers=2).map([np.ones(100_000)] * 8)
    autopar.shutdown()
    assert segments() - before == set()


def test_segments_of_a_killed_parent_are_removed(tmp_path: Path) -> None:
    """If the parent is killed outright, multiprocessing's resource tracker removes its segments."""
    pytest.importorskip("numpy")
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal
            import numpy as np
            from autopar import parallel_loop

            def total(a, table):
                return float(a.sum() + table[0])

            if __name__ == "__main__":
                parallel_loop(total, workers=2).map([np.ones(100_000)] * 4, table=np.ones(100_000))
                print(" ".join(sorted(p for p in os.listdir("/dev/shm") if p.startswith("autopar_"))), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60).stdout
    created = set(out.split())
    assert created, "the script should have kept segments for reuse"
    deadline = time.monotonic() + 10
    while any((DEV_SHM / name).exists() for name in created) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any((DEV_SHM / name).exists() for name in created)


def test_ctrl_c_at_any_moment_leaves_no_segment(tmp_path: Path) -> None:
    """Ctrl-C landing between a segment's creation and the loop's bookkeeping of it left it to
    no one: after shutdown(), or for good when it landed inside SharedMemory() itself."""
    pytest.importorskip("numpy")
    script = tmp_path / "interrupted.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, random, signal, threading, time
            import numpy as np
            import autopar
            from autopar import parallel_loop

            def first(a, table):
                return float(a[0] + table[0])

            if __name__ == "__main__":
                calc = parallel_loop(first, workers=2, start_method="spawn")
                chance = random.Random(21)
                arrays = [np.full(100_000, float(i)) for i in range(40)]
                for trial in range(24):
                    timer = threading.Timer(chance.uniform(0, 0.3), os.kill, (os.getpid(), signal.SIGINT))
                    timer.start()
                    try:
                        calc.map(arrays, table=np.zeros(4_000_000))
                        time.sleep(0.35)
                    except KeyboardInterrupt:
                        pass
                    timer.join()
                autopar.shutdown()
                print(sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"autopar_{os.getpid()}_")), os.getpid())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    left, pid = result.stdout.split("] ")
    assert left == "[", f"segments left after shutdown(): {left}]"
    assert "leaked shared_memory" not in result.stderr
    assert not [name for name in os.listdir(DEV_SHM) if name.startswith(segment_prefix(int(pid)))]


def test_function_is_unpickled_once_per_worker(tmp_path: Path) -> None:
    """The function is unpickled once in each worker and kept warm across calls."""
    log = tmp_path / "loads"
    calc = parallel_loop(CountedFunction(str(log)), workers=2, chunksize=1)
    assert list(calc.map(range(30))) == list(range(1, 31))
    assert list(calc.map(range(30))) == list(range(1, 31))
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) <= 2


def test_a_nearly_full_dev_shm_keeps_arrays_in_the_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing to a full tmpfs mapping kills the writer with SIGBUS: with less than a quarter
    of /dev/shm free, large arrays travel pickled (a writeable copy) and no segment is made."""
    np = pytest.importorskip("numpy")
    real = os.statvfs(DEV_SHM)

    def nearly_full(path: Any) -> os.statvfs_result:
        blocks = real.f_blocks
        fields = list(real)
        fields[3] = fields[4] = blocks // 10  # f_bfree, f_bavail: a tenth left
        return os.statvfs_result(fields)

    monkeypatch.setattr("autopar._shared.os.statvfs", nearly_full)
    before = segments()
    arrays = [np.full(1 << 17, float(i)) for i in range(4)]
    res = parallel_loop(array_info, workers=2).map(arrays)
    assert list(res) == [(float(i) * (1 << 17), True) for i in range(4)]
    assert segments() == before


def test_a_raising_signal_handler_cannot_leave_ctrl_c_held_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """signal.signal() runs pending handlers first: one that raises (a SIGALRM timeout's) on
    the way out of a segment's creation must not leave Ctrl-C swallowed for good."""
    from autopar import _shared

    real = signal.signal
    calls: list[Any] = []

    def pending_alarm_first(signum: int, handler: Any) -> Any:
        calls.append(handler)
        if len(calls) == 2:  # putting the user's handler back
            raise TimeoutError("a SIGALRM timeout's handler")
        return real(signum, handler)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(signal, "signal", pending_alarm_first)
    with pytest.raises(TimeoutError), _shared._interrupts_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before
