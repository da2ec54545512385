"""How many iterations to send at once, from the measured cost of an iteration.

Pure arithmetic, no processes: the engine calls `ChunkSizer.next_size` before each
submission and `ChunkSizer.record` when a chunk comes back.

The automatic policy: start with one iteration per chunk, so the first results arrive at once
and an expensive loop is balanced from the start; once iterations have been timed, size each
chunk to take about ``target_seconds`` of work (at the loop's mean cost per iteration, or the
last chunk's when that was dearer); never more than ``growth`` times the largest chunk
timed so far, so a few cheap first iterations cannot produce one huge chunk (50 free
iterations, then 400 of 5 ms, took 1.68 x the ideal time when one-iteration chunks coming
back one after another compounded their growth; 1.01 x now);
and never send more than `MAX_CHUNK` iterations, or `CHUNK_BYTES` of arguments and results,
at once.

Every round trip costs the parent ~0.15-0.3 ms of CPU, and when the workers fill every core
each one also stalls the worker it serves by about as much: the fewer chunks, the better, as
long as the workers finish together. When the input's length is known, that balance comes
from the tail: each chunk takes at most 1 / (``chunks_per_worker`` x workers) of what is left
(guided self-scheduling), down to ``tail_seconds`` of work but never more than a worker's
share of what is left, so the last chunks are small and spread over every worker however
uneven the iterations. (Without that share, a floor priced from cheap first iterations
handed 8 workers four chunks of 49 dear ones: 2.1 x the ideal time in simulation, 1.02
now; 20,000 cheap then 200 dear: 5.7 x, now 1.1. The price: a uniform cheap loop's tail
shrinks to single iterations, about 1.5 x the round trips, which at 32 workers took 100,000
x 5 us from 1.28 to 1.44 x ideal in simulation; nothing measurable on 2.)

The target can then be long (`KNOWN_LENGTH_TARGET`), a cap that keeps progress reports and
crash losses short, not the rule that sizes most chunks. Without a known length the tail
cannot shrink, so the last chunk may leave the other workers idle for up to a chunk's
duration: chunks then aim at the much shorter `UNKNOWN_LENGTH_TARGET`.
"""

from __future__ import annotations

import math

__all__ = ["CHUNK_BYTES", "KNOWN_LENGTH_TARGET", "MAX_CHUNK", "UNKNOWN_LENGTH_TARGET", "ChunkSizer"]

KNOWN_LENGTH_TARGET = 0.5
UNKNOWN_LENGTH_TARGET = 0.02
"""Seconds of work per automatic chunk, with and without a known input length."""

MAX_CHUNK = 10_000
"""The most iterations an automatic chunk holds: beyond it the round trip is already a
negligible share, and a lazy ``imap`` over an endless input would read far ahead."""

CHUNK_BYTES = 8 << 20
"""Pickled arguments and results an automatic chunk carries at most: chunks in flight hold
their arguments (in shared memory when large), a worker holds a chunk's results until it is
done, and ``imap`` buffers them behind a slow first iteration, so this bounds the memory a
loop of big arguments or results takes."""


class ChunkSizer:
    """Chunk sizes for one loop: fixed, or adapted to measured iteration cost."""

    def __init__(
        self,
        fixed: int | None,
        workers: int,
        total: int | None = None,
        *,
        target_seconds: float | None = None,
        tail_seconds: float = 0.005,
        growth: int = 8,
        chunks_per_worker: int = 2,
    ) -> None:
        self.fixed = fixed
        self.workers = workers
        self.total = total
        if target_seconds is None:
            target_seconds = UNKNOWN_LENGTH_TARGET if total is None else KNOWN_LENGTH_TARGET
        self.target_seconds = target_seconds
        self.tail_seconds = tail_seconds
        self.growth = growth
        self.chunks_per_worker = chunks_per_worker
        self.size = fixed or 1
        self._iterations = 0
        self._largest = 0
        self._seconds = 0.0
        self._bytes = 0
        self._handed_out = 0
        self._tail_size = 1

    def next_size(self) -> int:
        """The size of the next chunk to send."""
        size = self.size
        if self.fixed is None and self.total is not None:
            remaining = max(self.total - self._handed_out, 1)
            spread = math.ceil(remaining / (self.workers * self.chunks_per_worker))
            # The floor never hands one worker more than its share of what is left: it was
            # priced at the cost measured so far, and iterations may get dearer.
            floor = min(self._tail_size, math.ceil(remaining / self.workers))
            size = min(size, max(spread, floor))
        self._handed_out += size
        return size

    def record(self, iterations: int, seconds: float, nbytes: int = 0) -> None:
        """Account for a chunk of ``iterations`` that kept a worker busy for ``seconds`` and
        whose arguments and results took ``nbytes`` (pickled)."""
        self._iterations += iterations
        self._largest = max(self._largest, iterations)
        self._seconds += seconds
        self._bytes += nbytes
        if self.fixed is not None or not self._iterations:
            return
        # Size by the loop's mean cost, or by this chunk's when it was dearer: iterations
        # that get more expensive (input sorted cheapest first) shrink the chunks at once.
        mean = max(self._seconds / self._iterations, seconds / max(iterations, 1), 1e-7)
        wanted = max(1, round(self.target_seconds / mean))
        self._tail_size = max(1, int(self.tail_seconds / mean))
        by_bytes = CHUNK_BYTES * self._iterations // max(self._bytes, 1)
        self.size = max(1, min(wanted, self._largest * self.growth, MAX_CHUNK, by_bytes))
