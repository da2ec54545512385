"""The plain records that cross the process boundary. No behaviour lives here.

Only these travel between the parent and a worker: never futures, locks or executors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias, overload

__all__ = [
    "BY_KEY",
    "Batch",
    "Call",
    "Calls",
    "Chunk",
    "ChunkResult",
    "Failed",
    "IterationOutput",
    "Payload",
    "Settings",
    "WireError",
]

Call: TypeAlias = tuple[int, tuple[Any, ...]]
"""One iteration's call: its index in the input and its positional arguments."""


class Calls(Sequence[Call]):
    """A chunk's calls: their positional arguments, and their indices in the input.

    The indices are almost always consecutive, so they are kept as ``first`` alone and the
    ``(index, args)`` pairs are made only when asked for: on tiny iterations, building and
    pickling a pair per call was a third of the parent's work. Likewise, when every call takes
    one argument (``f.map(xs)``), ``args`` holds the arguments themselves (``single``), not a
    1-tuple of each.
    """

    __slots__ = ("args", "first", "indices", "single")

    def __init__(
        self, args: Sequence[Any], first: int = 0, indices: list[int] | None = None, single: bool = False
    ) -> None:
        self.args = args
        self.first = first
        self.indices = indices
        self.single = single

    @classmethod
    def of(cls, calls: Iterable[Call]) -> Calls:
        pairs = list(calls)
        indices = [index for index, _ in pairs]
        first = indices[0] if indices else 0
        consecutive = indices == list(range(first, first + len(indices)))
        return cls([args for _, args in pairs], first, None if consecutive else indices)

    def index_list(self) -> Sequence[int]:
        """The input index of every call, in order: a ``range`` when they are consecutive."""
        return range(self.first, self.first + len(self.args)) if self.indices is None else self.indices

    def index_of(self, position: int) -> int:
        return self.first + position if self.indices is None else self.indices[position]

    def arguments(self, position: int) -> tuple[Any, ...]:
        """The positional arguments of the call at ``position``."""
        args = self.args[position]
        return (args,) if self.single else args

    def __len__(self) -> int:
        return len(self.args)

    @overload
    def __getitem__(self, position: int) -> Call: ...
    @overload
    def __getitem__(self, position: slice) -> Calls: ...
    def __getitem__(self, position: int | slice) -> Call | Calls:
        if isinstance(position, slice):
            return Calls.of(list(self)[position])
        return self.index_of(position), self.arguments(position)

    def __iter__(self) -> Iterator[Call]:
        arguments = ((args,) for args in self.args) if self.single else self.args
        return zip(self.index_list(), arguments, strict=True)

    def __reduce__(self) -> tuple[Any, ...]:
        return Calls, (self.args, self.first, self.indices, self.single)


class Payload(NamedTuple):
    """A pickled object, and where its out-of-band buffers lie in a shared-memory segment.

    This and `Chunk` are named tuples, not dataclasses: they are pickled and unpickled at
    every round trip, and a tuple does both in C (a dataclass runs ``__setstate__`` in Python).
    """

    data: bytes
    segment: str | None = None
    spans: tuple[tuple[int, int], ...] = ()
    use: int = 0
    """Which filling of the segment this is: segments are reused, so a worker caches by both."""
    pickle_span: tuple[int, int] | None = None
    """Where the pickle itself lies in the segment, when it was too large to travel inline."""


BY_KEY = Payload(b"")
"""Sent in place of a function or broadcast a worker has had before: it looks the object up
by key (a real payload is never empty: a pickle has bytes, or lies in a segment)."""


class Settings(NamedTuple):
    """How a worker runs each call of a loop: the same for every chunk of it."""

    timeout: float | None = None
    seed: int | None = None
    """The loop's ``seed=``: each iteration's random streams derive from it and its index."""
    keywords: tuple[str, ...] = ()
    """The last ``len(keywords)`` arguments of each call go by these keyword names (`each`)."""
    own_process: bool = False
    """The worker runs one chunk at a time in its process (autopar's pools, a user's
    `ProcessPoolExecutor`): it may seed the process-global random generators, and take over
    the process's streams and logging for the chunk."""
    capture_output: bool = False
    """Capture what each iteration writes to ``sys.stdout`` and ``sys.stderr``."""
    log_levels: tuple[int, tuple[tuple[str, int], ...]] | None = None
    """``forward_logging``: the parent's ``logging.disable`` level and the levels its loggers
    were given (root as ""), for the worker to create the records the parent would handle;
    None: records stay in the worker."""


class IterationOutput(NamedTuple):
    """What one iteration wrote and logged in its worker, to be written and handled in the
    parent (``capture_output=``, ``forward_logging=``)."""

    stdout: str = ""
    stderr: str = ""
    records: tuple[Any, ...] = ()
    """`logging.LogRecord`s, made picklable (message formatted, ``exc_info`` as text)."""


class Chunk(NamedTuple):
    """One chunk of iterations, as sent to a worker.

    ``function`` and ``broadcast`` are the cloudpickled function and broadcast keyword
    arguments, identical for every chunk of a loop; the worker caches what they unpickle to
    under ``function_key`` and ``broadcast_key``. ``calls`` is the cloudpickled `Calls`.
    Large buffers in any of them travel in shared memory (see `autopar._shared`); to other
    machines, a large function or broadcast is sent as `BY_KEY` once workers have it.
    ``loop_id`` and ``chunk_id`` make every chunk unique, so that an executor that
    deduplicates identical calls never merges two chunks.
    """

    loop_id: str
    chunk_id: int
    function_key: str
    function: Payload
    broadcast_key: str
    broadcast: Payload
    calls: Payload
    settings: Settings
    loop_token: int = 0
    """A small number naming the loop, for workers to skip the chunks of a stopped loop."""


class WireError(NamedTuple):
    """An iteration's exception on the way back: pickled when it could be, always described."""

    exception: bytes | None
    type_name: str
    message: str
    traceback: str
    notes: tuple[str, ...] = ()
    """Its ``__notes__``, for the stand-in when it cannot come back as itself."""


@dataclass(slots=True)
class Failed:
    """One failed iteration in the parent: the exception and the worker-side traceback."""

    index: int
    exception: BaseException
    traceback: str = ""
    attempts: int = 1


class ChunkResult(NamedTuple):
    """What a worker sends back for one chunk.

    ``values`` has one entry per call, in order, ``None`` where the call failed: the values
    themselves in-process; out of process, one pickle of the list when every value is a plain
    builtin, else a list of pickles, one per value (so that one that cannot be unpickled fails
    only its iteration). ``errors`` maps a call's position in the chunk to a
    `Failed` (in-process) or a `WireError`. ``seconds`` is the time spent running the calls.
    """

    values: Any
    errors: dict[int, Any]
    seconds: float
    worker: str = ""
    """The worker process that ran it (out of process): which workers hold what was sent by key."""
    setup_failed: bool = False
    """The worker's initializer failed: nothing ran, and its pool must not serve later loops."""
    outputs: dict[int, IterationOutput] | None = None
    """By position: what iterations wrote and logged, when captured (none when nothing was).
    Position -1: what the worker's initializer logged, sent with its first chunk."""
    returned: Any = None
    """The large buffers left out of ``values``' pickles, in shared memory (see
    `autopar._returns`): a ``Returned`` in the worker, a ``Received`` once unpickled here."""


@dataclass(slots=True)
class Batch:
    """Finished iterations handed from the engine to the collector (completion order)."""

    indices: Sequence[int]
    """A ``range`` when the iterations are consecutive (the common case)."""
    values: list[Any]
    failures: list[tuple[Call, Failed]]
    seconds: float
    outputs: dict[int, IterationOutput] | None = None
    """By input index: what iterations wrote and logged, when captured (-1: an initializer)."""

    @classmethod
    def empty(cls) -> Batch:
        """Nothing finished (the chunk was sent again)."""
        return cls([], [], [], 0.0)

    def joined(self, other: Batch) -> Batch:
        outputs = {**(self.outputs or {}), **(other.outputs or {})} or None
        return Batch(
            [*self.indices, *other.indices],
            self.values + other.values,
            self.failures + other.failures,
            self.seconds + other.seconds,
            outputs,
        )
