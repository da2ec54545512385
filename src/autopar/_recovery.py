"""Pool-break recovery: when a worker of autopar's own pool dies, ``concurrent.futures``
fails every chunk the pool held. Find the iteration that killed it and send the others again.

`Recovery.triage` is pure bookkeeping: it takes what the pool's post-mortem says (what each
worker was running, from the slots; how each one ended, from the exit codes; which ones a loop
stopped on purpose) and returns who failed and what to send again. It keeps only the state
that outlives one break: how often an unexplained break found each iteration running, and how
many breaks found nobody running at all.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from autopar._backends import PostMortem
from autopar._errors import IterationTimeout, WorkerCrashed, fresh_copy
from autopar._records import Calls, Failed
from autopar._slots import LOADING_ARGUMENTS, SENDING_RESULTS, Running

__all__ = ["FRUITLESS_BREAKS", "SUSPICIONS", "LostChunk", "Recovery", "Triage", "every_call_fails", "stage_of"]

SUSPICIONS = 3
"""Unexplained pool breaks an iteration may be present at before it is blamed."""
FRUITLESS_BREAKS = 3
"""Pool breaks with nobody running before the loop gives up on the pool."""

LostChunk = tuple[int, Calls]
"""A chunk the broken pool held: its id, and its calls."""


@dataclass
class Triage:
    """What to do after a break: ``failed``, calls that fail (with their errors, by position
    in those calls), and ``resend``, chunks to send again, in order, before any new input."""

    failed: list[tuple[Calls, dict[int, Failed]]] = field(default_factory=list)
    resend: list[Calls] = field(default_factory=list)


def stage_of(position: int) -> str:
    """What a worker was doing, by the position its slot showed (negative: around a call)."""
    return _STAGES.get(position, "running this iteration")


class Recovery:
    """One loop's recovery from the breaks of its pools."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._suspicions: dict[int, int] = {}  # by iteration index
        self._fruitless_breaks = 0

    @property
    def suspecting(self) -> bool:
        """Whether an unexplained break found some iteration running."""
        return bool(self._suspicions)

    def settled(self, indices: Sequence[int]) -> None:
        """These iterations finished: no suspicion stays on them."""
        for index in indices:
            self._suspicions.pop(index, None)

    def worked(self) -> None:
        """A chunk came back: the pool runs iterations, whatever broke it before."""
        self._fruitless_breaks = 0

    def triage(self, lost: Sequence[LostChunk], report: PostMortem, overdue: Mapping[int, Running]) -> Triage:
        """Who failed and what to send again. ``overdue``: by pid, what each worker this loop
        stopped past its timeout was running."""
        blamed = self._blame(report, overdue)
        if not blamed and report.stopped:  # another loop stopped a worker on purpose: no crash
            return Triage(resend=[calls for _, calls in lost])
        if not blamed:  # nobody to blame, in this loop or another one sharing the pool
            return self._suspect(lost, report.running)
        self._fruitless_breaks = 0
        triage = Triage()
        for chunk_id, calls in lost:
            culprits = blamed.get(chunk_id)
            if not culprits:
                triage.resend.append(calls)
                continue
            stage = min(culprits)
            if stage < 0 and len(calls) > 1:  # died around the chunk, not in a call: isolate
                triage.resend += [Calls.of([call]) for call in calls]
                continue
            # A death around a one-call chunk is that call's; otherwise the calls named.
            errors = {0: culprits[stage]} if stage < 0 else {p: e for p, e in culprits.items() if p >= 0}
            rest = [call for position, call in enumerate(calls) if position not in errors]
            if rest:
                triage.resend.append(Calls.of(rest))
            positions = sorted(errors)
            culprit_calls = Calls.of(calls[p] for p in positions)
            failed = {i: Failed(calls.index_of(p), errors[p]) for i, p in enumerate(positions)}
            triage.failed.append((culprit_calls, failed))
        return triage

    def _blame(self, report: PostMortem, overdue: Mapping[int, Running]) -> dict[int, dict[int, BaseException]]:
        """By chunk id, by position (or stage): the error of each iteration to blame."""
        blamed: dict[int, dict[int, BaseException]] = {}
        for pid, exit_code in report.exit_codes.items():
            where = overdue.get(pid) if pid in report.stopped else None
            if where is not None:
                doing = "the iteration" if where.position >= 0 else stage_of(where.position)
                error: BaseException = IterationTimeout(
                    f"{doing} ran longer than timeout={self.timeout:g} s; "
                    f"its worker (pid {pid}) was stopped and replaced"
                )
            elif pid in report.stopped:
                continue  # stopped on purpose by another loop: its timeout, or Ctrl-C
            elif exit_code is not None and exit_code != -signal.SIGTERM and pid in report.running:
                where = report.running[pid]
                error = WorkerCrashed(_death(pid, exit_code, where.position), exit_code, pid)
            else:
                continue
            blamed.setdefault(where.chunk_id, {})[where.position] = error
        return blamed

    def _suspect(self, lost: Sequence[LostChunk], running: Mapping[int, Running]) -> Triage:
        """The pool broke and no exit code points at anyone (a worker killed from outside with
        SIGTERM, an initializer that failed): send everything again, but blame an iteration
        present at too many such breaks, and give up on pools that break with nobody working."""
        by_chunk = dict(lost)
        present = [(r.chunk_id, r.position) for r in running.values() if r.chunk_id in by_chunk]
        if not present:
            self._fruitless_breaks += 1
        blamed: dict[int, set[int]] = {}
        for chunk_id, position in present:
            calls = by_chunk[chunk_id]
            index = calls.index_of(max(position, 0))
            self._suspicions[index] = self._suspicions.get(index, 0) + 1
            if self._suspicions[index] >= SUSPICIONS and (position >= 0 or len(calls) == 1):
                blamed.setdefault(chunk_id, set()).add(max(position, 0))
        triage = Triage()
        for chunk_id, calls in lost:
            if self._fruitless_breaks >= FRUITLESS_BREAKS:
                error = WorkerCrashed(
                    f"the worker pool broke {self._fruitless_breaks} times with no iteration running "
                    "(does the initializer fail, are workers killed from outside, or, under spawn or "
                    "forkserver, does the script start this loop again when a worker imports it, "
                    'without `if __name__ == "__main__":`?)'
                )
                triage.failed.append((calls, every_call_fails(calls, error)))
                continue
            positions = sorted(blamed.get(chunk_id, set()))
            rest = [call for position, call in enumerate(calls) if position not in positions]
            if rest:
                triage.resend.append(Calls.of(rest))
            if positions:
                error = WorkerCrashed(
                    f"its worker died {SUSPICIONS} times while running it, killed from outside or by SIGTERM"
                )
                culprits = Calls.of(calls[p] for p in positions)
                triage.failed.append((culprits, every_call_fails(culprits, error)))
        return triage


def every_call_fails(calls: Calls, error: BaseException, tb_text: str = "") -> dict[int, Failed]:
    """By position: every call fails with ``error``, each with its own copy (for its own notes)."""
    return {position: Failed(index, fresh_copy(error), tb_text) for position, index in enumerate(calls.index_list())}


def _death(pid: int, exit_code: int, position: int) -> str:
    """``worker process 123 died while running this iteration: killed by SIGKILL (...)``."""
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        how = f"killed by {name}{_SIGNAL_HINTS.get(name, '')}"
    else:
        how = f"exited with code {exit_code}"
    return f"worker process {pid} died while {stage_of(position)}: {how}"


_STAGES = {
    LOADING_ARGUMENTS: "unpickling this iteration's arguments",
    SENDING_RESULTS: "pickling this iteration's result",
}
"""What a worker does around an iteration, by the position its slot shows then."""


_SIGNAL_HINTS = {
    "SIGKILL": ": out of memory? (the kernel's OOM killer sends SIGKILL)",
    "SIGSEGV": ": a crash in native code (segmentation fault)",
    "SIGBUS": ": a crash in native code (bus error)",
    "SIGABRT": ": aborted, often a failed assertion in native code",
    "SIGFPE": ": a floating-point exception in native code",
}
