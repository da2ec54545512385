"""f.as_completed(xs): (index, value) pairs in the order iterations finish."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from autopar import LoopIterator, UnsafeLoopError, each, parallel_loop

COUNTER = 0


def slow_first(x: int) -> int:
    time.sleep(0.3 if x == 0 else 0.01)
    return x * 10


def fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x


def counts(x: int) -> int:
    global COUNTER
    COUNTER += 1
    return COUNTER


def test_pairs_come_as_iterations_finish(any_backend: dict[str, Any]) -> None:
    loop = parallel_loop(slow_first).options(chunksize=1, **any_backend)
    pairs = list(loop.as_completed(range(6)))
    assert sorted(pairs) == [(x, x * 10) for x in range(6)]
    if any_backend["backend"] != "serial":
        assert pairs[-1] == (0, 0)  # the slow first one finished last


def test_collect_yields_none_for_a_failure_and_lists_it(backend: dict[str, Any]) -> None:
    it = parallel_loop(fail_on_two).options(on_error="collect", **backend).as_completed(range(5))
    assert isinstance(it, LoopIterator)
    assert dict(it) == {0: 0, 1: 1, 2: None, 3: 3, 4: 4}
    assert [f.index for f in it.failures] == [2]
    assert it.stats.iterations == 5
    assert it.stats.failed == 1


def test_raise_raises_the_failure_when_it_comes(backend: dict[str, Any]) -> None:
    seen = []
    with pytest.raises(ValueError, match="two") as caught:
        for index, value in parallel_loop(fail_on_two).options(**backend).as_completed(range(5)):
            seen.append((index, value))
    assert (2, None) not in seen
    assert caught.value.failure.index == 2  # type: ignore[attr-defined]
    assert "iteration 2: fail_on_two(2)" in caught.value.__notes__


def test_an_endless_input_is_read_only_as_far_as_needed() -> None:
    it = parallel_loop(slow_first).options(workers=2).as_completed(itertools.count())
    found = [pair for pair, _ in zip(it, range(20), strict=False)]
    it.close()
    assert len(found) == 20
    assert it._collector.dispatcher.counters.consumed < 2000  # bounded, as with imap


def test_each_keyword_arguments() -> None:
    def scaled(x: int, factor: int) -> int:
        return x * factor

    pairs = parallel_loop(scaled).options(backend="thread", workers=2).as_completed([1, 2], factor=each([10, 100]))
    assert sorted(pairs) == [(0, 10), (1, 200)]


def test_autopar_verify_checks_as_completed_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAR_VERIFY", "3")
    with pytest.raises(UnsafeLoopError):
        list(parallel_loop(counts).options(workers=2).as_completed(range(10)))
