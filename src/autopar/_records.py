"""The plain records that cross the process boundary. No behaviour lives here.

Only these travel between the parent and a worker: never futures, locks or executors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Chunk", "Item", "Outcome", "WireError", "WireOutcome"]


class Item(NamedTuple):
    """One iteration's call, as the parent knows it."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here uses
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of iterations, as sent to a worker.

    ``function`` and ``broadcast`` are the cloudpickled function and broadcast keyword
    arguments, identical for every chunk of a loop; the worker caches what they unpickle to
    under ``function_key`` and ``broadcast_key``. ``items`` is the cloudpickled list of
    ``(index, args, kwargs)``. ``loop_id`` and ``chunk_id`` make every chunk unique, so that
    an executor that deduplicates identical calls never merges two chunks.
    """

    loop_id: str
    chunk_id: int
    function_key: str
    function: bytes
    broadcast_key: str
    broadcast: bytes
    items: bytes


class WireError(NamedTuple):
    """An iteration's exception on the way back: pickled when it could be, always described."""

    exception: bytes | None
    type_name: str
    message: str
    traceback: str


class WireOutcome(NamedTuple):
    """One iteration's outcome on the way back: a pickled value, or a `WireError`."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here uses
    value: bytes | None
    error: WireError | None
    seconds: float


@dataclass(slots=True)
class Outcome:
    """One iteration's outcome in the parent: its value, or the exception and traceback."""

    index: int
    value: Any = None
    exception: BaseException | None = None
    traceback: str = ""
    seconds: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.exception is None
