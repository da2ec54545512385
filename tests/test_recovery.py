"""Recovery.triage: who failed when a pool broke, and what to send again. No processes: the
post-mortem is written by hand, as the slots and exit codes would say it."""

from __future__ import annotations

import signal

from autopar import IterationTimeout, WorkerCrashed
from autopar._backends import PostMortem
from autopar._records import Calls
from autopar._recovery import FRUITLESS_BREAKS, SUSPICIONS, Recovery
from autopar._slots import LOADING_ARGUMENTS, SENDING_RESULTS, Running


def chunk(first: int, count: int) -> Calls:
    return Calls(list(range(first, first + count)), first, single=True)


def indices(calls: Calls) -> list[int]:
    return list(calls.index_list())


def test_a_crash_fails_the_call_it_ran_and_resends_the_rest() -> None:
    lost = [(7, chunk(0, 4)), (8, chunk(4, 4))]
    report = PostMortem({111: Running(7, 2, 0)}, {111: -signal.SIGSEGV, 222: None})
    triage = Recovery(None).triage(lost, report, {})
    ((calls, failed),) = triage.failed
    assert indices(calls) == [2]
    assert failed[0].index == 2
    error = failed[0].exception
    assert isinstance(error, WorkerCrashed)
    assert (error.exitcode, error.pid) == (-signal.SIGSEGV, 111)
    assert "worker process 111 died while running this iteration: killed by SIGSEGV" in str(error)
    assert [indices(c) for c in triage.resend] == [[0, 1, 3], [4, 5, 6, 7]]


def test_a_death_while_loading_a_chunk_isolates_its_calls() -> None:
    lost = [(1, chunk(0, 3))]
    report = PostMortem({5: Running(1, LOADING_ARGUMENTS, 0)}, {5: -signal.SIGKILL})
    triage = Recovery(None).triage(lost, report, {})
    assert triage.failed == []
    assert [indices(c) for c in triage.resend] == [[0], [1], [2]]  # one by one: the next death names it


def test_a_death_while_loading_a_single_call_fails_it_naming_the_stage() -> None:
    lost = [(1, chunk(5, 1))]
    report = PostMortem({5: Running(1, LOADING_ARGUMENTS, 0)}, {5: -signal.SIGKILL})
    ((calls, failed),) = Recovery(None).triage(lost, report, {}).failed
    assert indices(calls) == [5]
    assert "while unpickling this iteration's arguments: killed by SIGKILL: out of memory?" in str(failed[0].exception)


def test_an_overdue_worker_this_loop_stopped_is_a_timeout() -> None:
    lost = [(3, chunk(10, 2))]
    overdue = {42: Running(3, 1, 123)}
    report = PostMortem({42: Running(3, 1, 123)}, {42: -signal.SIGTERM}, frozenset({42}))
    triage = Recovery(2.5).triage(lost, report, overdue)
    ((calls, failed),) = triage.failed
    assert indices(calls) == [11]
    assert isinstance(failed[0].exception, IterationTimeout)
    assert "the iteration ran longer than timeout=2.5 s; its worker (pid 42) was stopped" in str(failed[0].exception)
    assert [indices(c) for c in triage.resend] == [[10]]


def test_a_timeout_while_pickling_the_result_says_so() -> None:
    lost = [(3, chunk(0, 1))]
    stuck = Running(3, SENDING_RESULTS, 9)
    report = PostMortem({42: stuck}, {42: -signal.SIGKILL}, frozenset({42}))
    ((_, failed),) = Recovery(1).triage(lost, report, {42: stuck}).failed
    assert str(failed[0].exception).startswith("pickling this iteration's result ran longer than timeout=1 s")


def test_a_worker_another_loop_stopped_is_no_crash_here() -> None:
    lost = [(3, chunk(0, 2))]
    report = PostMortem({42: Running(99, 0, 1)}, {42: -signal.SIGTERM}, frozenset({42}))
    triage = Recovery(None).triage(lost, report, {})
    assert triage.failed == []
    assert [indices(c) for c in triage.resend] == [[0, 1]]


def test_unexplained_breaks_blame_an_iteration_present_at_each() -> None:
    recovery = Recovery(None)
    lost = [(1, chunk(0, 2))]
    report = PostMortem({9: Running(1, 1, 0)}, {9: -signal.SIGTERM})  # killed from outside
    for _ in range(SUSPICIONS - 1):
        triage = recovery.triage(lost, report, {})
        assert triage.failed == []
        assert [indices(c) for c in triage.resend] == [[0, 1]]
    triage = recovery.triage(lost, report, {})
    ((calls, failed),) = triage.failed
    assert indices(calls) == [1]
    assert f"its worker died {SUSPICIONS} times" in str(failed[0].exception)
    assert [indices(c) for c in triage.resend] == [[0]]


def test_a_settled_iteration_is_no_longer_suspected() -> None:
    recovery = Recovery(None)
    lost = [(1, chunk(0, 1))]
    report = PostMortem({9: Running(1, 0, 0)}, {9: -signal.SIGTERM})
    for _ in range(SUSPICIONS - 1):
        recovery.triage(lost, report, {})
    assert recovery.suspecting
    recovery.settled([0])
    assert not recovery.suspecting
    assert recovery.triage(lost, report, {}).failed == []


def test_breaks_with_nobody_running_give_up_on_the_pool() -> None:
    recovery = Recovery(None)
    lost = [(1, chunk(0, 2))]
    report = PostMortem({}, {9: 1})
    for _ in range(FRUITLESS_BREAKS - 1):
        assert recovery.triage(lost, report, {}).failed == []
    ((calls, failed),) = recovery.triage(lost, report, {}).failed
    assert indices(calls) == [0, 1]
    assert "broke 3 times with no iteration running" in str(failed[0].exception)
    assert failed[0].exception is not failed[1].exception  # each iteration its own notes


def test_a_chunk_that_worked_resets_the_count_of_fruitless_breaks() -> None:
    recovery = Recovery(None)
    lost = [(1, chunk(0, 1))]
    report = PostMortem({}, {9: 1})
    for _ in range(FRUITLESS_BREAKS - 1):
        recovery.triage(lost, report, {})
    recovery.worked()
    assert recovery.triage(lost, report, {}).failed == []
