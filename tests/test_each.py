"""autopar.each(): keyword arguments with one value per iteration, beside broadcast ones."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from autopar import each, parallel_loop


def calc_stuff(parameter: float, offset: float = 0.0, scale: float = 1.0) -> tuple[float, float]:
    if parameter < 0:
        raise ValueError(f"negative parameter {parameter}")
    return parameter * scale + offset, scale


def test_each_alone_drives_the_loop_as_in_the_legacy_call(any_backend: dict[str, Any]) -> None:
    """``for j in range(10): calc_stuff(parameter=j * offset)``, unchanged in meaning."""
    offset = 0.5
    res = parallel_loop(calc_stuff).options(**any_backend).map(parameter=each(j * offset for j in range(10)))
    assert list(res) == [calc_stuff(parameter=j * offset) for j in range(10)]


def test_each_zips_with_positional_iterables_and_broadcast_stays(backend: dict[str, Any]) -> None:
    loop = parallel_loop(calc_stuff).options(**backend)
    res = loop.map([1.0, 2.0, 3.0], offset=each([10.0, 20.0, 30.0]), scale=2.0)
    assert list(res) == [(12.0, 2.0), (24.0, 2.0), (36.0, 2.0)]


def test_the_shortest_input_ends_the_loop(backend: dict[str, Any]) -> None:
    loop = parallel_loop(calc_stuff).options(**backend)
    assert len(loop.map(range(100), offset=each([1.0, 2.0]))) == 2
    assert len(loop.map([1.0, 2.0, 3.0], offset=each(iter(range(100))))) == 3


def test_each_with_starmap_and_imap(backend: dict[str, Any]) -> None:
    loop = parallel_loop(calc_stuff).options(**backend)
    assert list(loop.starmap([(1.0, 1.0), (2.0, 2.0)], scale=each([3.0, 4.0]))) == [(4.0, 3.0), (10.0, 4.0)]
    assert list(loop.imap(range(3), scale=each([1.0, 2.0, 3.0]))) == [(0.0, 1.0), (2.0, 2.0), (6.0, 3.0)]


def test_a_failure_shows_the_iterations_own_keyword_values(backend: dict[str, Any]) -> None:
    loop = parallel_loop(calc_stuff).options(on_error="collect", **backend)
    res = loop.map([1.0, -2.0], offset=each([5.0, 6.0]), scale=3.0)
    (failure,) = res.failures
    assert failure.index == 1
    assert failure.args == (-2.0,)
    assert failure.kwargs == {"offset": 6.0, "scale": 3.0}
    assert "iteration 1: calc_stuff(-2.0, offset=6.0, scale=3.0)" in failure.exception.__notes__


def test_each_needs_an_iterable_and_is_not_a_value() -> None:
    with pytest.raises(TypeError, match="each\\(\\) takes an iterable of per-iteration values, not int"):
        each(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="marks a keyword argument of map"):
        pickle.dumps(each([1]))


def test_no_iterable_at_all_is_refused() -> None:
    with pytest.raises(TypeError, match=r"map\(\) needs at least one iterable of arguments, or a keyword argument"):
        parallel_loop(calc_stuff).map(scale=2.0)


def test_an_option_given_as_each_says_where_options_go() -> None:
    with pytest.raises(TypeError, match=r"\.options\(timeout=each\(\.\.\.\)\)"):
        parallel_loop(calc_stuff).map([1.0], timeout=each([1]))


def test_a_known_length_is_kept_for_chunking() -> None:
    from autopar._calls import split_keywords, zip_calls

    per_iteration, _ = split_keywords({"offset": each([1, 2, 3])})
    assert zip_calls("map", (range(10),), per_iteration).total == 3
    assert zip_calls("map", (iter(range(10)),), per_iteration).total is None
