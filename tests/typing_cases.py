"""Type-checked, never run: what mypy --strict infers for user code (see test_typing.py)."""

from __future__ import annotations

from typing import Any, assert_type

from autopar import Failure, LoopIterator, LoopResult, VerifyReport, each, parallel_loop


@parallel_loop(workers=2)
def three(parameter: float) -> tuple[float, int, str]:
    return parameter, int(parameter), str(parameter)


@parallel_loop
def named(parameter: float) -> dict[str, float]:
    return {"value": parameter}


@parallel_loop
def ragged(parameter: int) -> tuple[int, ...]:
    return (parameter,) * parameter


@parallel_loop
def square(x: int) -> int:
    return x * x


class Animal: ...


class Dog(Animal): ...


@parallel_loop
def adopt(name: str) -> Dog:
    return Dog()


class Model:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @parallel_loop
    def scale(self, x: int) -> int:
        return self.factor * x

    @parallel_loop
    @staticmethod
    def twice(x: int) -> int:
        return 2 * x


def animals(result: LoopResult[Animal]) -> list[Animal]:
    return list(result)


def cases() -> None:
    assert_type(square(3), int)
    assert_type(square.map(range(3)), LoopResult[int])
    assert_type(square.imap(range(3)), LoopIterator[int])
    assert_type(square.map(range(3))[0], int)
    first, second, third = three.map([1.0, 2.0]).unzip()
    assert_type(first, list[float])
    assert_type(second, list[int])
    assert_type(third, list[str])
    assert_type(named.map([1.0]).unzip(), dict[str, list[float]])
    assert_type(ragged.map([1, 2]).unzip(), tuple[list[int], ...])
    assert_type(square.map([1]).unzip(), Any)  # not a tuple: unzip refuses it at run time
    animals(adopt.map(["rex"]))  # read-only results are covariant
    parallel_loop(workers=2, timeout=1.5, backend="thread", on_error="collect")(square)
    square.options(chunksize=8, start_method="spawn", initargs=(1,))
    # Misspelt options and wrong values are errors (an unused ignore would fail the check):
    parallel_loop(worker=4)(square)  # type: ignore[call-overload]
    square.options(on_error="colect")  # type: ignore[arg-type]
    square.options(timeout="5")  # type: ignore[arg-type]
    model = Model(3)
    assert_type(model.scale(2), int)
    assert_type(Model.scale(model, 2), int)
    assert_type(model.scale.map([1, 2]), LoopResult[int])
    assert_type(Model.twice(2), int)
    assert_type(Model.twice.map([1, 2]), LoopResult[int])
    # Part 2: each, verify, seed, replay, retry_failures, on_error="debug"
    assert_type(three.map(parameter=each([1.0, 2.0])), LoopResult[tuple[float, int, str]])
    assert_type(square.verify(range(3), sample=8), VerifyReport)
    assert_type(square.options(seed=7, on_error="debug").map(range(3)).retry_failures(timeout=5), LoopResult[int])
    failures: list[Failure] = square.map(range(3)).failures
    failures[0].replay(debug=True)
    square.options(seed="7")  # type: ignore[arg-type]
