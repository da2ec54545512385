"""Pickling at the process boundary: plain chunks take the fast path, the rest cloudpickle."""

from __future__ import annotations

import copyreg
import pickle
import threading
from typing import Any

import pytest

from autopar import _serialize, parallel_loop
from autopar._records import Calls
from autopar._serialize import dumps, loads


class _NoCloudpickle:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("cloudpickle was used for a plain object")


@pytest.mark.parametrize(
    "obj",
    [
        Calls(range(10, 20), 10, single=True),
        Calls([1, 2.5, "x", None, b"y", True], 3, single=True),
        Calls([(1, "a"), (2, 3.0, None)], 0, indices=[4, 9]),
        {"scale": 2, "names": ("a", "b")},
        {},
    ],
    ids=["range", "scalars", "tuples", "dict", "empty"],
)
def test_plain_chunks_skip_cloudpickle(obj: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_serialize, "_Pickler", _NoCloudpickle)
    data = dumps(obj)
    assert data == pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    again = loads(data)
    if isinstance(obj, Calls):
        assert list(again) == list(obj)
    else:
        assert again == obj


def test_what_plain_pickle_cannot_carry_goes_by_cloudpickle() -> None:
    class Local(int):  # a subclass of a plain type, and defined where pickle cannot find it
        pass

    for calls in (
        Calls([1, Local(2)], 0, single=True),
        Calls([(1, lambda x: x + 1)], 0),
        Calls([[Local(3)]], 0, single=True),
    ):
        with pytest.raises((pickle.PicklingError, AttributeError)):
            pickle.dumps(calls)
        again = loads(dumps(calls))
        assert [index for index, _ in again] == [index for index, _ in calls]
    assert loads(dumps({"offset": Local(5)}))["offset"] == 5


class _Handle:
    """Holds a lock, so it pickles only through the reducer registered below."""

    def __init__(self, n: int) -> None:
        self.n, self.lock = n, threading.Lock()


def test_reducers_registered_with_copyreg_after_import_are_used() -> None:
    with pytest.raises(TypeError):
        dumps([_Handle(1)])
    copyreg.pickle(_Handle, lambda handle: (_Handle, (handle.n,)))
    try:
        assert loads(dumps([_Handle(7)]))[0].n == 7
    finally:
        del copyreg.dispatch_table[_Handle]


def numpy_results(x: int) -> Any:
    import numpy as np

    return [np.float64(x) * 1.5, np.int32(x), np.arange(3.0) * x, np.array(["a", "b"]), np.bool_(x % 2)][x % 5]


def test_numpy_results_travel_as_one_pickle_per_chunk_and_come_back_equal() -> None:
    import numpy as np

    from autopar._records import Calls
    from autopar._serialize import encode_values

    values = [numpy_results(x) for x in range(10)]
    assert isinstance(encode_values(values, Calls(list(range(10))), {}), bytes)  # one pickle
    objects = [np.array([object()], dtype=object)]
    assert isinstance(encode_values(objects, Calls([0]), {}), list)  # may hold anything: one by one
    res = parallel_loop(numpy_results).options(workers=2, chunksize=5).map(range(10))
    for got, want in zip(res, values, strict=True):
        assert type(got) is type(want)
        assert np.array_equal(got, want)
    assert res.stats.bytes_received < 10 * 117  # not a pickle per np.float64


def test_numpy_scalars_of_one_type_come_back_as_those_scalars() -> None:
    import numpy as np

    cases = [
        [np.float64(1.5), np.float64("nan")],
        [np.int32(3), np.int32(-4)],
        [np.str_("a"), np.str_("bc")],  # a dtype per length: not one column
        [np.datetime64("2020-01-01"), np.datetime64("2021-01-01T10")],  # a unit per value
        [np.float32(1), np.float64(2)],
    ]
    for values in cases:
        calls = Calls(list(range(len(values))))
        decoded, failed = _serialize.decode_values(_serialize.encode_values(values, calls, {}), calls)
        assert failed == {}
        assert [type(value) for value in decoded] == [type(value) for value in values]
        assert [str(value) for value in decoded] == [str(value) for value in values]
