"""Pickling at the process boundary, where every failure belongs to one iteration.

Functions, broadcast keyword arguments and arguments travel by cloudpickle, so lambdas,
closures and classes defined in ``__main__`` or a notebook work under any start method.
Results travel item by item, by plain pickle where it can (several times faster) and by
cloudpickle where it cannot, so one bad result never costs another iteration its value.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
import linecache
import marshal
import os
import pickle
import re
import sys
import traceback
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import CodeType, TracebackType
from typing import Any, ClassVar

import cloudpickle

from autopar._errors import RemoteError, SerializationError, exception_fields, rebuild_exception
from autopar._records import Call, Calls, Failed, WireError

__all__ = [
    "decode_error",
    "decode_values",
    "describe",
    "digest",
    "dumps",
    "split_unpicklable",
    "stage_error",
    "encode_error",
    "encode_value",
    "encode_values",
    "format_worker_traceback",
    "loads",
    "OutOfBand",
    "reduce_with",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
loads = pickle.loads


def _reduce_code(code: CodeType) -> tuple[Any, tuple[bytes]]:
    return marshal.loads, (marshal.dumps(code),)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, except that code keeps its file name.

    cloudpickle renames the file of every function it ships by value to ``<dynamic-code>``
    (for deterministic pickles), which hides the user's file and line from the worker's
    traceback. marshal carries a code object whole; workers run the same Python version.
    """

    # A live view, like cloudpickle's own: reducers registered with copyreg later still count.
    dispatch_table: ClassVar[Any] = ChainMap({CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def reduce_with(cls: type, reducer: Callable[[Any], Any]) -> None:
    """Make autopar's pickler reduce instances of ``cls`` (exactly) with ``reducer``."""
    _Pickler.dispatch_table.maps[0][cls] = reducer


def dumps(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    """Pickle ``obj`` by value where plain pickle would go by reference (cloudpickle)."""
    if _is_plain(obj):  # the common chunk: C pickle alone, without cloudpickle's per-object hooks
        return pickle.dumps(obj, _PROTOCOL)
    file = io.BytesIO()
    _Pickler(file, protocol=_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return file.getvalue()


def digest(data: bytes) -> str:
    """A short content hash, the key under which a worker caches what ``data`` unpickles to."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def describe(exc: BaseException) -> str:
    """``"TypeError: cannot pickle '_thread.lock' object"``."""
    text = _text_of(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, or what `traceback` prints when the exception's ``__str__`` fails: one
    broken exception must not take its chunk's other iterations down with it."""
    try:
        return str(exc)
    except Exception:  # __str__ raised, or returned something else than a str
        return "<exception str() failed>"


def stage_error(what: str, exc: BaseException) -> SerializationError:
    """``SerializationError("<what>: TypeError: cannot pickle ...")`` caused by ``exc``."""
    error = SerializationError(f"{what}: {describe(exc)}")
    error.__cause__ = exc
    return error


def split_unpicklable(calls: Iterable[Call]) -> tuple[list[Call], list[Failed]]:
    """Separate the calls whose arguments pickle from those that do not, failing the latter.

    Called only when a whole chunk failed to pickle, so that one unpicklable argument costs
    only its own iteration.
    """
    good: list[Call] = []
    failed: list[Failed] = []
    for call in calls:
        try:
            dumps(call)
        except Exception as exc:
            failed.append(Failed(call[0], stage_error(f"arguments of iteration {call[0]} could not be pickled", exc)))
        else:
            good.append(call)
    return good, failed


class OutOfBand:
    """A pickler's ``buffer_callback`` that takes each contiguous buffer of at least ``above``
    bytes (a NumPy array's data) out of the pickle stream, for `autopar._returns` to send
    through shared memory. ``counts``: how many each value took, when values are pickled one
    by one (None when they are pickled in one go)."""

    def __init__(self, above: int) -> None:
        self.above = above
        self.buffers: list[memoryview] = []
        self.counts: list[int] | None = None

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if raw.nbytes < self.above:
            return True  # kept in the pickle
        self.buffers.append(raw)
        return False


def encode_value(value: Any, out_of_band: OutOfBand | None = None) -> bytes:
    """Pickle one result: plain pickle first (fast), cloudpickle when that fails."""
    taken = len(out_of_band.buffers) if out_of_band is not None else 0
    try:
        return pickle.dumps(value, _PROTOCOL, buffer_callback=out_of_band)
    except Exception:
        if out_of_band is not None:
            del out_of_band.buffers[taken:]  # what the failed try took
        return dumps(value, out_of_band)


_dumps_plain = functools.partial(pickle.dumps, protocol=_PROTOCOL)


_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})
_SEQUENCES = (tuple, list)
_NUMPY_PLAIN: set[type] = set()
"""NumPy scalar types met in results: they unpickle wherever NumPy does, as builtins do."""


def _all_plain(values: Iterable[Any], numbers: bool = False) -> bool:
    """True when every value is a builtin scalar, or a tuple or list of them: values that
    always unpickle, so that the whole chunk can travel as one pickle. With ``numbers``
    (results), NumPy scalars and arrays of numbers too, which unpickle wherever NumPy is
    installed: an ``np.float64`` alone pickles to 117 bytes, and one pickle per value made
    a loop returning them 5x slower. (Not for arguments: their arrays go out of band.)"""
    kinds = set(map(type, values))
    if kinds <= _PLAIN:
        return True
    others = kinds - _PLAIN - set(_SEQUENCES)
    if others and not (numbers and all(kind in _NUMPY_PLAIN or _numpy_plain(kind) for kind in others)):
        return False
    if _ARRAY in kinds and any(type(value) is _ARRAY and value.dtype.hasobject for value in values):
        return False
    nested = itertools.chain.from_iterable(value for value in values if type(value) in _SEQUENCES)
    return set(map(type, nested)) <= _PLAIN


def _column(values: list[Any]) -> Any:
    """The values, or, when they are NumPy scalars of one type (a loop returning
    ``np.float64``), one array of them: 8 bytes a value, where each scalar pickles with its
    dtype, and unpickled by a C loop (``list(array)`` gives the same scalars back), where
    rebuilding scalars one by one took 1 us each in the parent."""
    if len(values) < 2:
        return values
    first: Any = values[0]
    if type(first) not in _NUMPY_PLAIN or type(first) is _ARRAY or first.dtype.kind not in "biufc":
        return values  # strings and dates: their dtype varies by value (length, unit)
    kind, dtype = type(first), first.dtype
    if any(type(value) is not kind or value.dtype != dtype for value in values):
        return values
    return sys.modules["numpy"].array(values, dtype=dtype)


def _numpy_plain(kind: type) -> bool:
    """Whether ``kind`` is a NumPy scalar type, or the array type (whose arrays of numbers
    are plain: checked per value), noting it for the next chunks."""
    global _ARRAY
    numpy = sys.modules.get("numpy")
    if numpy is None or not getattr(kind, "__module__", "").startswith("numpy"):
        return False
    if kind is numpy.ndarray:
        _ARRAY = kind
    elif not issubclass(kind, numpy.generic) or issubclass(kind, numpy.void | numpy.object_):
        return False  # a structured or object scalar may hold anything
    _NUMPY_PLAIN.add(kind)
    return True


_ARRAY: Any = None


def _is_plain(obj: Any) -> bool:
    """True for what plain pickle carries exactly as cloudpickle would: the calls of a chunk,
    or a dict, made only of builtin scalars (and tuples or lists of them), or a range."""
    if type(obj) is Calls:
        return type(obj.args) is range or _all_plain(obj.args)
    return type(obj) is dict and _all_plain(obj) and _all_plain(obj.values())


def encode_values(
    values: list[Any], calls: Calls, errors: dict[int, WireError], out_of_band: OutOfBand | None = None
) -> bytes | list[bytes]:
    """Pickle the results: in one go when they are plain builtins (fast on both ends),
    otherwise each on its own, so that one that cannot be pickled or unpickled fails only its
    iteration (a pickling failure here becomes its call's error). With ``out_of_band``, large
    buffers are left out of the pickles, for the caller to send another way."""
    if _all_plain(values, numbers=True):
        return pickle.dumps(_column(values), _PROTOCOL, buffer_callback=out_of_band)
    if out_of_band is None:
        try:
            return list(map(_dumps_plain, values))
        except Exception:
            pass
    else:
        out_of_band.counts = []
    encoded: list[bytes] = []
    for position, value in enumerate(values):
        taken = len(out_of_band.buffers) if out_of_band is not None else 0
        try:
            encoded.append(encode_value(value, out_of_band))
        except Exception as exc:
            if out_of_band is not None:
                del out_of_band.buffers[taken:]
            error = stage_error(f"result of iteration {calls.index_of(position)} could not be pickled", exc)
            errors[position] = encode_error(error, "")
            encoded.append(_NONE)
        if out_of_band is not None and out_of_band.counts is not None:
            out_of_band.counts.append(len(out_of_band.buffers) - taken)
    return encoded


_NONE = pickle.dumps(None)


def decode_values(
    blobs: bytes | list[bytes],
    calls: Calls,
    buffers: Sequence[Any] | None = None,
    counts: Sequence[int] | None = None,
) -> tuple[list[Any], dict[int, Failed]]:
    """Unpickle the results in the parent; one that cannot be unpickled fails its iteration.
    ``buffers``: what `encode_values` left out of the pickles, in order; ``counts``: how many
    of them each value took, when values were pickled one by one."""
    if isinstance(blobs, bytes):
        try:
            values: list[Any] = loads(blobs, buffers=buffers)  # builtins and NumPy numbers
            if type(values) is not list:  # NumPy scalars of one type, as one array
                values = list(values)
        except Exception as exc:  # NumPy missing here: every value of the chunk is lost
            error = stage_error("results of this chunk could not be unpickled", exc)
            return [None] * len(calls), {p: Failed(i, copy.copy(error)) for p, i in enumerate(calls.index_list())}
        return values, {}
    own: list[Any] = [None] * len(blobs)  # each value's buffers
    if buffers is not None and counts is not None:
        taken = list(itertools.accumulate(counts, initial=0))
        own = [buffers[start:end] for start, end in itertools.pairwise(taken)]
    else:
        try:
            return list(map(loads, blobs)), {}
        except Exception:
            pass
    values = []
    failed: dict[int, Failed] = {}
    for position, blob in enumerate(blobs):
        try:
            values.append(loads(blob, buffers=own[position]))
        except Exception as exc:
            index = calls.index_of(position)
            failed[position] = Failed(index, stage_error(f"result of iteration {index} could not be unpickled", exc))
            values.append(None)
    return values, failed


def encode_error(exc: BaseException, tb_text: str) -> WireError:
    """Describe an exception for the trip home, pickled so that it can come back as itself.

    An exception that pickles but does not unpickle as itself (an ``__init__`` with two
    required arguments, or one that formats its message, a frozen dataclass) travels as its
    class, ``args`` and ``__dict__`` instead, rebuilt without calling ``__init__``.
    """
    payload: bytes | None = None
    try:
        payload = encode_value(exc)
        # An __init__ that formats its message formats it twice now. (Compared as pickles: a
        # NaN, or an object without __eq__, never equals its copy.)
        if dumps(loads(payload).args) != dumps(exc.args):
            raise ValueError("the exception unpickles with other arguments")
    except Exception:
        try:
            payload = dumps(_ExceptionParts(type(exc), exc.args, dict(vars(exc)), exception_fields(exc)))
        except Exception:
            payload = None
    notes = getattr(exc, "__notes__", ())
    notes = tuple(note for note in notes if isinstance(note, str)) if isinstance(notes, list | tuple) else ()
    return WireError(payload, _type_name(type(exc)), _text_of(exc), tb_text, notes)


class _ExceptionParts:
    """An exception rebuilt without calling its ``__init__`` or ``__setattr__``."""

    def __init__(
        self, cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any], fields: dict[str, Any]
    ) -> None:
        self.cls, self.args, self.state, self.fields = cls, args, state, fields

    def rebuild(self) -> BaseException:
        return rebuild_exception(self.cls, self.args, self.state, self.fields)


def decode_error(index: int, wire: WireError) -> Failed:
    """The worker's exception for one iteration, with its traceback text."""
    return Failed(index, _rebuild_exception(wire), fill_source_lines(wire.traceback))


def _rebuild_exception(wire: WireError) -> BaseException:
    """The worker's exception as its own type where possible, else a `RemoteError`."""
    if wire.exception is not None:
        try:
            exc = loads(wire.exception)
            if isinstance(exc, _ExceptionParts):
                exc = exc.rebuild()
            if isinstance(exc, BaseException):
                return exc
        except Exception:
            pass
    stand_in = RemoteError(wire.type_name, wire.message)
    for note in wire.notes:
        stand_in.add_note(note)
    return stand_in


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def format_worker_traceback(exc: BaseException) -> str:
    """Format ``exc`` as the worker saw it, starting at the user's code: autopar's own outer
    frames (the runner, the decorator's call-through) are left out."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_own_frame(tb):
        tb = tb.tb_next
    chained = exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__)
    if tb is None or chained:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    # The iterations of a loop mostly fail at the same few places: format each place's frames
    # once (reading and parsing source lines costs ~0.1 ms a failure in a busy worker).
    where = tuple((frame.tb_frame.f_code, frame.tb_lasti) for frame in _walk(tb))
    frames = _formatted_frames.get(where)
    if frames is None:
        if len(_formatted_frames) >= _FORMATTED_FRAMES_KEPT:
            _formatted_frames.clear()
        frames = _formatted_frames[where] = "".join(traceback.StackSummary.extract(traceback.walk_tb(tb)).format())
    return "Traceback (most recent call last):\n" + frames + "".join(traceback.format_exception_only(type(exc), exc))


_FORMATTED_FRAMES_KEPT = 64
_formatted_frames: dict[tuple[tuple[CodeType, int], ...], str] = {}


def _walk(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _is_own_frame(tb: TracebackType) -> bool:
    return os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _PACKAGE_DIR


_FRAME_LINE = re.compile(r'^(\s*)File "(.+)", line (\d+), in .*$')


def fill_source_lines(tb_text: str) -> str:
    """Add the source line under each frame the worker could not read it for.

    A worker on another machine, or one running a function defined in a notebook cell,
    has no copy of the source; the parent usually has it in ``linecache``.
    """
    lines = tb_text.splitlines(keepends=True)
    out: list[str] = []
    for position, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line.rstrip("\n"))
        if match is None:
            continue
        following = lines[position + 1] if position + 1 < len(lines) else ""
        if following.startswith(match.group(1) + "  ") and not _FRAME_LINE.match(following.rstrip("\n")):
            continue  # the worker already showed the source line
        source = linecache.getline(match.group(2), int(match.group(3))).strip()
        if source:
            out.append(f"{match.group(1)}  {source}\n")
    return "".join(out)
