"""The public surface matches the contract in API.md."""

from __future__ import annotations

import autopar

CONTRACT_NAMES = {
    "parallel_loop",
    "LoopResult",
    "Failure",
    "LoopStats",
    "WorkerCrashed",
    "IterationTimeout",
    "shutdown",
}


def test_contract_names_are_exported() -> None:
    assert set(autopar.__all__) >= CONTRACT_NAMES
    for name in autopar.__all__:
        assert hasattr(autopar, name), name


def test_public_objects_belong_to_autopar() -> None:
    """Tracebacks read autopar.WorkerCrashed, not autopar._errors.WorkerCrashed."""
    for name in autopar.__all__:
        obj = getattr(autopar, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "autopar", name


def test_exception_hierarchy() -> None:
    assert issubclass(autopar.IterationTimeout, TimeoutError)
    for exc in (autopar.WorkerCrashed, autopar.IterationTimeout, autopar.SerializationError, autopar.RemoteError):
        assert issubclass(exc, autopar.AutoparError)
