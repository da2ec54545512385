"""The decorator keeps the function a function: plain calls, metadata, methods, pickling."""

from __future__ import annotations

import copy
import inspect
import pickle
import typing
from typing import Any

import cloudpickle
import pytest

from _helpers import Scaler, decorated_square, square
from autopar import BoundLoopFunction, LoopFunction, parallel_loop
from autopar._serialize import dumps as autopar_dumps


def test_plain_call_is_untouched() -> None:
    """Calling the decorated function runs it once, here, as before."""
    assert decorated_square(7) == 49


def test_metadata_and_signature_are_kept() -> None:
    def calc_stuff(parameter: float, offset: float = 1.0) -> tuple[float, float]:
        """Compute two things."""
        return parameter, offset

    decorated = parallel_loop(workers=2)(calc_stuff)
    assert decorated.__name__ == "calc_stuff"
    assert decorated.__doc__ == "Compute two things."
    assert decorated.__wrapped__ is calc_stuff
    assert inspect.signature(decorated) == inspect.signature(calc_stuff)
    assert decorated.__module__ == __name__
    assert isinstance(decorated, LoopFunction)


def test_annotations_and_attributes_are_the_functions() -> None:
    """Tools that read annotations (typing.get_type_hints, functools.singledispatch) and
    attributes see the function's, as through any wrapt proxy, not the wrapper's own."""

    def calc_stuff(parameter: int, *, offset: float = 1.0) -> str:
        return str(parameter + offset)

    calc_stuff.unit = "m"  # type: ignore[attr-defined]
    decorated = parallel_loop(workers=2)(calc_stuff)
    hints = {"parameter": int, "offset": float, "return": str}
    assert typing.get_type_hints(decorated) == hints == inspect.get_annotations(decorated, eval_str=True)
    assert decorated.__dict__ == {"unit": "m"}
    assert typing.get_type_hints(Scaler(2).scale) == typing.get_type_hints(Scaler.scale.__wrapped__)


def test_bare_and_called_forms_are_equivalent() -> None:
    bare = parallel_loop(square)
    called = parallel_loop()(square)
    assert isinstance(bare, LoopFunction) and isinstance(called, LoopFunction)
    assert list(bare.options(backend="serial").map([3])) == list(called.options(backend="serial").map([3])) == [9]


def test_methods_bind_to_their_instance() -> None:
    scaler = Scaler(5)
    assert scaler.scale(2) == 10
    assert isinstance(scaler.scale, BoundLoopFunction)
    assert Scaler.scale(scaler, 3) == 15
    assert list(scaler.scale.options(backend="serial").map([1, 2])) == [5, 10]


def test_options_returns_a_copy() -> None:
    """options() changes a copy; the original keeps its options."""
    base = parallel_loop(square, workers=3)
    changed = base.options(workers=1, on_error="collect")
    assert changed is not base
    assert base._self_options.workers == 3 and base._self_options.on_error == "raise"
    assert changed._self_options.workers == 1 and changed._self_options.on_error == "collect"
    assert changed.__wrapped__ is square


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_module_level_function_pickles_by_reference(dumps: Any) -> None:
    assert pickle.loads(dumps(decorated_square)) is decorated_square


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_copies_closures_and_lambdas_pickle_as_loop_functions(dumps: Any) -> None:
    """Whatever is not importable travels by value, and stays a LoopFunction with its options."""
    factor = 4
    closure = parallel_loop(lambda x: x * factor, workers=2, on_error="collect")
    for original in (closure, decorated_square.options(chunksize=3)):
        restored = pickle.loads(dumps(original))
        assert isinstance(restored, LoopFunction)
        assert restored._self_options == original._self_options
        assert restored(3) == original(3)
        assert list(restored.options(backend="serial").map([2])) == [original(2)]


@pytest.mark.parametrize(
    "dumps", [pickle.dumps, cloudpickle.dumps, autopar_dumps], ids=["pickle", "cloudpickle", "autopar"]
)
def test_a_closure_that_calls_itself_pickles(dumps: Any) -> None:
    """Its pickle refers back to the loop function: one pickler and memo must end the cycle."""

    @parallel_loop(workers=2)
    def fibonacci(n: int) -> int:
        return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)

    restored = pickle.loads(dumps(fibonacci))
    assert isinstance(restored, LoopFunction) and restored(10) == 55
    assert list(fibonacci.map(range(8))) == [0, 1, 1, 2, 3, 5, 8, 13]


def test_options_with_an_executor_instance_pickle_without_it() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as executor:
        restored = pickle.loads(pickle.dumps(parallel_loop(lambda x: x, backend=executor)))
    assert restored._self_options.backend == "process"


def test_copy_module_works() -> None:
    clone = copy.deepcopy(decorated_square)
    assert isinstance(clone, LoopFunction) and clone(3) == 9


def test_decorating_something_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="decorates a function, not int"):
        parallel_loop(workers=2)(5)  # type: ignore[arg-type]


def test_map_needs_iterables() -> None:
    with pytest.raises(TypeError, match="at least one iterable"):
        decorated_square.map()
    with pytest.raises(TypeError, match="argument 1 must be iterable, not int"):
        decorated_square.map(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_methods_pickle(dumps: Any) -> None:
    scaler = Scaler(3)
    bound = pickle.loads(dumps(scaler.scale))
    assert bound(2) == 6
    assert isinstance(bound, BoundLoopFunction)
    assert isinstance(pickle.loads(dumps(Scaler.scale)), BoundLoopFunction)


def test_classmethods_and_staticmethods_can_be_decorated() -> None:
    class Maths:
        base = 10

        @parallel_loop(backend="serial")
        @classmethod
        def shifted(cls, x: int) -> int:
            return cls.base + x

        @parallel_loop(backend="serial")
        @staticmethod
        def doubled(x: int) -> int:
            return 2 * x

    assert Maths.shifted(1) == 11
    assert Maths.doubled(4) == 8
    assert list(Maths.doubled.map([1, 2])) == [2, 4]
