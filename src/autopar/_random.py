"""Randomness: every iteration's random numbers from ``(seed, index)`` alone, and fresh ones in
every new worker.

With ``seed=S``, iteration ``i`` draws from streams derived from ``(S, i)``, wherever and
whenever it runs: `rng` gives a `numpy.random.Generator` on
``SeedSequence(S, spawn_key=(i,))``; NumPy's global generator is seeded from that same
sequence, and Python's `random` from a hash of ``(S, i)`` (no NumPy needed).

Seeding a Mersenne Twister costs 4-11 us, more than a tiny iteration, and most loops
never draw. So the global generators are seeded lazily: while a seeded chunk runs, the
functions of the ``random`` and ``numpy.random`` modules are replaced by thin wrappers that
seed their generator on the iteration's first draw; an iteration that does not draw costs
one assignment. A generator reached another way (``from numpy.random import normal`` before
the loop, a library that holds ``np.random.mtrand._rand``) is not reseeded: `rng`, or a
``random_state=autopar.rng()`` argument, reaches every draw (`verify` shows the difference).

The global generators are process-wide: they are seeded only where one iteration runs at a
time (autopar's worker processes, ``"serial"``), and put back as they were after each chunk.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DrawWatch",
    "fresh_worker_streams",
    "global_states",
    "iteration_streams",
    "put_back_global_states",
    "rng",
    "seeded_chunk",
]

Stream = tuple[int, int]
"""``(seed, index)``: what an iteration's random numbers derive from."""

_local = threading.local()  # .stream: the running iteration's; .generator: (stream, Generator)
_WATCH: Stream = (-1, -1)
"""Due in place of a stream while `DrawWatch` looks: a draw is noted, not seeded."""
_due: dict[str, Stream | None] = {"random": None, "numpy": None}
"""Per global generator, the stream it must be seeded with at its next draw (or `_WATCH`)."""
_saved: dict[str, Any] = {}
"""Each global generator's state before this chunk first seeded it: put back at the chunk's end."""
_hooked: dict[str, dict[str, Callable[..., Any]]] = {}
"""Per module, the functions replaced by seeding wrappers: the originals, by name."""
_wrappers: dict[tuple[str, str], tuple[Callable[..., Any], Callable[..., Any]]] = {}
"""Per (generator, function name): the original, and its seeding wrapper, made once (a chunk
of ``"serial"`` is one iteration: building ~70 wrappers each time cost ~100 us)."""
_scanned: dict[str, dict[str, Callable[..., Any]]] = {}
"""Per generator, the functions of its module found to draw from it (scanned again when one
of them is no longer there)."""
_hook_lock = threading.Lock()
_owner: int | None = None
"""The thread whose seeded chunk holds the hooks (a nested seeded loop in it seeds too)."""


def rng() -> Any:
    """A `numpy.random.Generator` for the running iteration: with ``seed=`` on the loop, its
    numbers come from ``(seed, iteration index)`` alone (the same on every backend, worker
    count, chunking and retry); otherwise, and outside an iteration, freshly seeded."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("autopar.rng() returns a numpy.random.Generator: install numpy") from None
    stream: Stream | None = getattr(_local, "stream", None)
    if stream is None:
        return np.random.default_rng()
    held = getattr(_local, "generator", None)
    if held is None or held[0] is not stream:  # one Generator per iteration: later calls continue it
        held = (stream, np.random.default_rng(_seed_sequence(stream)))
        _local.generator = held
    return held[1]


def _seed_sequence(stream: Stream) -> Any:
    import numpy as np

    seed, index = stream
    return np.random.SeedSequence(seed, spawn_key=(index,))


@contextmanager
def seeded_chunk(seed: int | None, global_generators: bool) -> Iterator[Callable[[int], None] | None]:
    """Around a chunk: yields the function to call with each iteration's index before it
    runs (None without a seed). ``global_generators``: also seed ``random`` and NumPy's
    global generator, where no other iteration runs at the same time."""
    global _owner
    if seed is None:
        yield None
        return
    previous = getattr(_local, "stream", None)
    # A seeded loop nested in a seeded iteration of this thread runs on the outer one's hooks,
    # with its own streams; the outer iteration's generators are put back as they were after it.
    nested = global_generators and _owner == threading.get_ident()
    outer_due, outer_states = (dict(_due), global_states()) if nested else ({}, {})
    hooked = global_generators and not nested and _hook_lock.acquire(blocking=False)
    if global_generators and not nested and not hooked:
        warnings.warn(
            "a seeded loop started while another thread's seeded loop holds this process's random and "
            "numpy.random generators: its draws from them are not seeded (autopar.rng() is)",
            RuntimeWarning,
            stacklevel=2,
        )
    if hooked:
        _owner = threading.get_ident()
        _install_hooks()
    seeds = hooked or nested

    def begin(index: int) -> None:
        _local.stream = stream = (seed, index)
        if seeds:
            _due["random"] = _due["numpy"] = stream
            if "numpy" not in _hooked and "numpy" in sys.modules:  # imported by an earlier iteration
                _install_hooks()

    try:
        yield begin
    finally:
        _local.stream = previous
        if nested:
            put_back_global_states(outer_states)
            _due.update(outer_due)
        if hooked:
            _due["random"] = _due["numpy"] = None
            _uninstall_hooks()
            _put_back_states()
            _owner = None
            _hook_lock.release()


@contextmanager
def iteration_streams(seed: int | None, index: int) -> Iterator[None]:
    """One iteration run again in this process (a replay), its streams as in the loop."""
    with seeded_chunk(seed, global_generators=True) as begin:
        if begin is not None:
            begin(index)
        yield


def _after_fork_in_child() -> None:
    """A process forked while a seeded chunk ran (a process loop started in a seeded serial
    iteration) inherits the hooks, the held lock and the iteration's stream: its own seeded
    chunks would never seed the global generators, nor its unseeded ones get a fresh rng()."""
    global _hook_lock, _owner
    if _hooked:
        _uninstall_hooks()
    _due["random"] = _due["numpy"] = None
    _saved.clear()
    _hook_lock, _owner = threading.Lock(), None
    _local.stream = _local.generator = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class DrawWatch:
    """For `verify`: which process-global generators each iteration, run in this thread,
    draws from without choosing its own numbers first. A draw through the modules' functions
    before any ``seed()``/``set_state()`` counts; so does a change of state with no such call
    (a draw through a generator held elsewhere, ``scipy.stats``'s default). An iteration that
    seeds the generator itself, then draws, gives the same numbers anywhere: it does not."""

    def __init__(self) -> None:
        self.drew: set[str] = set()
        self.chose: set[str] = set()
        self._before: dict[str, Any] = {}
        self._hooked = False

    def __enter__(self) -> DrawWatch:
        global _owner, _watch
        self._hooked = _hook_lock.acquire(blocking=False)  # else: states alone, as a seeded loop holds them
        if self._hooked:
            _owner, _watch = threading.get_ident(), self
            _install_hooks()
        return self

    def begin(self) -> None:
        """Before an iteration."""
        self.drew.clear()
        self.chose.clear()
        if self._hooked:
            if "numpy" not in _hooked and "numpy" in sys.modules:
                _install_hooks()
            _due["random"] = _due["numpy"] = _WATCH
        self._before = global_states()

    def end(self) -> set[str]:
        """After the iteration: the generators it drew from, by module name."""
        after = global_states()
        changed = {g for g, state in after.items() if not _same_state(state, self._before.get(g, _MISSING))}
        return self.drew | (changed - self.chose)

    def __exit__(self, *exc_info: object) -> None:
        global _owner, _watch
        if self._hooked:
            _due["random"] = _due["numpy"] = None
            _uninstall_hooks()
            _owner, _watch = None, None
            _hook_lock.release()


_watch: DrawWatch | None = None
_MISSING = object()


def _same_state(state: Any, other: Any) -> bool:
    import pickle

    return other is not _MISSING and pickle.dumps(state) == pickle.dumps(other)


def fresh_worker_streams() -> None:
    """In a new worker process: NumPy's global generator from fresh entropy. A forked worker
    inherits its parent's state, so every worker would repeat the same draws (Python's
    `random` already reseeds itself after a fork)."""
    numpy_random = sys.modules.get("numpy.random")  # imported after the fork, it seeds itself
    if numpy_random is not None:
        numpy_random.seed()


def global_states() -> dict[str, Any]:
    """The state of each process-global generator, by the module whose functions draw from it."""
    return {generator: _get_state(instance) for generator, (_, instance, _) in _generators().items()}


def put_back_global_states(states: dict[str, Any]) -> None:
    generators = _generators()
    for generator, state in states.items():
        _set_state(generators[generator][1], state)


def _get_state(instance: Any) -> Any:
    return instance.getstate() if isinstance(instance, random.Random) else instance.get_state()


def _set_state(instance: Any, state: Any) -> None:
    if isinstance(instance, random.Random):
        instance.setstate(state)
    else:
        instance.set_state(state)


# --- the lazy seeding of the global generators ---


def _seed_random(stream: Stream) -> None:
    seed, index = stream
    material = hashlib.sha512(b"autopar random %d %d" % (seed, index)).digest()
    random._inst.seed(int.from_bytes(material, "big"))


def _seed_numpy(stream: Stream) -> None:
    import numpy as np

    # 128 bits from the sequence, through the legacy seeding (which also drops a cached gauss):
    # 11 us, where building the state through MT19937(sequence) took 120 us.
    np.random.mtrand._rand.seed(_seed_sequence(stream).generate_state(4))


def _generators() -> dict[str, tuple[Any, Any, Callable[[Stream], None]]]:
    """Per global generator now imported: its module, the object its functions are bound to,
    and how to seed it."""
    found: dict[str, tuple[Any, Any, Callable[[Stream], None]]] = {"random": (random, random._inst, _seed_random)}
    if "numpy" in sys.modules:  # numpy.random is imported on first use: use it now, to hook it
        import numpy.random as numpy_random

        found["numpy"] = (numpy_random, numpy_random.mtrand._rand, _seed_numpy)
    return found


_STATE_FUNCTIONS = ("seed", "get_state", "set_state", "getstate", "setstate")
"""Functions of a generator's module that act on its state (NumPy's are not bound methods)."""
_RESETS = ("seed", "set_state", "setstate")
"""Those that replace the state: an iteration calling one chose its own numbers."""


def _install_hooks() -> None:
    for generator, (module, instance, seed_it) in _generators().items():
        if generator in _hooked:
            continue
        namespace = vars(module)
        originals = _scanned.get(generator, {})
        if not originals or any(namespace.get(name) is not value for name, value in originals.items()):
            originals = {
                name: value
                for name, value in namespace.items()
                if not name.startswith("_")
                and (getattr(value, "__self__", None) is instance or (name in _STATE_FUNCTIONS and callable(value)))
            }
            _scanned[generator] = originals
        for name, original in originals.items():
            made = _wrappers.get((generator, name))
            if made is None or made[0] is not original:
                made = original, _seeding(generator, instance, seed_it, original, resets=name in _RESETS)
                _wrappers[generator, name] = made
            setattr(module, name, made[1])
        _hooked[generator] = originals


def _seeding(
    generator: str, instance: Any, seed_it: Callable[[Stream], None], original: Callable[..., Any], resets: bool
) -> Callable[..., Any]:
    """``original`` (``np.random.normal``, say), seeding its generator first when due; for
    a function that ``resets`` the state (``np.random.seed``), not seeding it at all."""

    @functools.wraps(original)
    def draw(*args: Any, **kwargs: Any) -> Any:
        stream = _due[generator]
        if stream is not None and _owner != threading.get_ident():  # another thread's draw: not its seeding
            return original(*args, **kwargs)
        if stream is _WATCH and _watch is not None:  # verify looks: note, do not seed
            _due[generator] = None
            (_watch.chose if resets else _watch.drew).add(generator)
        elif stream is not None:
            _due[generator] = None
            if generator not in _saved:
                _saved[generator] = _get_state(instance)
            if not resets:
                seed_it(stream)
        return original(*args, **kwargs)

    return draw


def _uninstall_hooks() -> None:
    modules = {generator: module for generator, (module, _, _) in _generators().items()}
    for generator, originals in _hooked.items():
        for name, original in originals.items():
            setattr(modules[generator], name, original)
    _hooked.clear()


def _put_back_states() -> None:
    put_back_global_states(_saved)
    _saved.clear()
