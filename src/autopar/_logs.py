"""``forward_logging=``: log records that iterations emit in worker processes, handled by the
parent's ``logging`` configuration as if emitted there, with ``record.autopar_index``.

Records travel back with the chunk's results (``IterationOutput.records``, by position), not
through a queue: nothing to start or drain, none lost when a loop ends, and the same on any
executor that runs `autopar._worker.run_chunk` in a process of its own. The collector's `Echo`
gives them to the parent's loggers in input order (`handle`).

Worker side, `LogForwarding` (used by `autopar._capture.Observer`), for one chunk:

- the parent's levels (`parent_levels`) are applied, so that the worker creates the records
  the parent would handle; walking the loggers happens only when those levels change, and
  the worker's own levels come back for a loop without forwarding (`standalone`);
- ``Logger.callHandlers`` is replaced for the chunk: every record that passes its logger's
  level and filters comes here and nowhere else, whatever handlers the worker has (a forked
  worker inherits the parent's, on any logger): no record is printed in the worker and
  forwarded too, and a handler added during the chunk changes nothing. Swapping one class
  attribute at each end of a chunk costs nothing: no logger is walked;
- each record is made picklable and filed under the position of the iteration the chunk's
  thread runs when it is emitted, whichever thread emits it (-1 outside an iteration).

Which iteration runs is read from the frames of `autopar._worker._run` (its locals
``position`` and ``calls``) when a record is created, so that iterations pay nothing: a loop
that logs nothing runs as without forwarding. The same lookup gives ``autopar_index`` to
records emitted in this process (``"thread"``, ``"serial"``), through a log record factory
installed when autopar is imported: every record of a process that imported autopar has the
attribute (None outside an iteration), so a format string may name it.

What the user's ``initializer`` logs at worker start is kept (`begin_setup`, `end_setup`) and
sent with the worker's first chunk, at position -1.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Protocol, TypeAlias, cast

__all__ = [
    "Levels",
    "LogForwarding",
    "begin_setup",
    "end_setup",
    "handle",
    "index_records",
    "parent_levels",
    "pending_setup_records",
    "standalone",
    "watch_iterations",
]

Levels: TypeAlias = tuple[int, tuple[tuple[str, int], ...]]
"""The ``logging.disable`` level, and ``(name, level)`` for every logger given one (root: "")."""


def parent_levels() -> Levels:
    """What the workers need to create the records this process would handle: the
    ``logging.disable`` level, and the level of every logger that was given one."""
    manager = logging.Logger.manager
    levels = [("", logging.getLogger().level)]
    levels += [
        (name, logger.level)
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    ]
    return manager.disable, tuple(levels)


# Which iteration runs ---------------------------------------------------------------------

_run_code: CodeType | None = None
"""The code of the function that runs a chunk's calls (`autopar._worker._run`)."""


def _no_depth() -> int:
    return 0


_depth: Callable[[], int] = _no_depth
"""How many chunks this thread is running, one inside the other (nested serial loops)."""


def watch_iterations(run_code: CodeType, depth: Callable[[], int]) -> None:
    """Called once by `autopar._worker`: the code whose frames run iterations (their locals
    ``position`` and ``calls`` say which), and how many of them the calling thread is in."""
    global _run_code, _depth
    _run_code, _depth = run_code, depth


def _running(frame: FrameType | None, depth: int = -1) -> tuple[int, int] | None:
    """``(position, index)`` of the iteration running in the stack that ``frame`` is on top
    of, for its outermost chunk (a loop nested in an iteration runs serially in it: its
    records are that iteration's). ``depth``: how many chunks the stack holds, when known
    (the walk stops at the last); -1: walk it all."""
    found = None
    while frame is not None and depth != 0:
        if frame.f_code is _run_code:
            found = frame
            depth -= 1
        frame = frame.f_back
    if found is None:
        return None
    local = found.f_locals
    position, calls = local.get("position"), local.get("calls")
    if position is None or calls is None:  # not yet in its first iteration
        return None
    return position, calls.index_of(position)


def _index_here() -> int | None:
    """The input index of the iteration this thread runs, or None."""
    depth = _depth()
    if depth <= 0:
        return None
    found = _running(sys._getframe(2), depth)
    return None if found is None else found[1]


_installed: Callable[..., logging.LogRecord] | None = None


def index_records() -> None:
    """Make every record carry ``autopar_index`` (None outside an iteration): a factory
    wrapping the one in place, installed again only if another has replaced it since."""
    global _installed
    previous = logging.getLogRecordFactory()
    if previous is _installed:
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            index = _index_here()
        except Exception:  # a record must always be made
            index = None
        record.__dict__["autopar_index"] = index
        return record

    _installed = make_record
    logging.setLogRecordFactory(make_record)


index_records()


# Making records picklable -----------------------------------------------------------------

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "autopar_index", "taskName"}
_PLAIN = (str, int, float, bool, type(None), bytes)


def _portable(record: logging.LogRecord, index: int | None) -> logging.LogRecord:
    """A plain `LogRecord` that pickles and means the same in the parent: the message
    formatted, ``exc_info`` as ``exc_text``, an extra attribute that does not pickle as its
    repr, and ``autopar_index``."""
    fields = dict(record.__dict__)
    try:
        fields["msg"] = record.getMessage()
    except Exception as exc:  # logging would report it in the worker, and lose the record
        fields["msg"] = f"{_safe_repr(record.msg)} % {_safe_repr(record.args)} (could not format the message: {exc!r})"
    fields["args"] = None
    exc_info = fields.get("exc_info")
    if exc_info:
        if not fields.get("exc_text"):
            fields["exc_text"] = _FORMATTER.formatException(exc_info)
        fields["exc_info"] = None
    fields.pop("message", None)  # a filter's formatting in the worker: the parent formats again
    for name in fields.keys() - _STANDARD:
        value = fields[name]
        if not isinstance(value, _PLAIN):
            try:
                pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            except Exception:
                fields[name] = _safe_repr(value)
    fields["autopar_index"] = index
    portable = logging.LogRecord.__new__(logging.LogRecord)
    portable.__dict__.update(fields)
    return portable


_FORMATTER = logging.Formatter()


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object (no repr)>"


# This process's logging, taken over ---------------------------------------------------------

_call_handlers = logging.Logger.callHandlers
"""logging's own: where a record goes when no chunk takes it."""
_lock = threading.Lock()
_sink: _Sink | None = None
"""What takes the records while logging is taken over: a chunk's `LogForwarding`, or the
initializer's `_Setup`."""
_applied: Levels | None = None
"""The parent's levels, as applied here (None: this process's own are in place)."""
_saved: dict[str, tuple[int, int]] = {}
"""By logger name: its own level, and the parent's applied over it."""
_saved_disable: int | None = None
_pending: list[logging.LogRecord] = []
"""Records the initializer emitted, for the first chunk."""


class _Sink(Protocol):
    """What takes the records while logging is taken over."""

    def add(self, record: logging.LogRecord) -> None: ...


def _taken(self: logging.Logger, record: logging.LogRecord) -> None:
    """``Logger.callHandlers`` while logging is taken over: every record, to the sink."""
    sink = _sink
    if sink is None:  # given back meanwhile, by another thread
        _call_handlers(self, record)
    else:
        sink.add(record)


def _take_over(sink: _Sink, levels: Levels) -> None:
    global _sink
    _apply(levels)
    with _lock:
        _sink = sink
    logging.Logger.callHandlers = _taken  # type: ignore[method-assign]


def _give_back() -> None:
    global _sink
    if logging.Logger.__dict__.get("callHandlers") is _taken:
        logging.Logger.callHandlers = _call_handlers  # type: ignore[method-assign]
    with _lock:
        _sink = None


def _loggers() -> list[tuple[str, logging.Logger]]:
    manager = logging.Logger.manager
    found: list[tuple[str, logging.Logger]] = [("", logging.getLogger())]
    found += [(name, logger) for name, logger in list(manager.loggerDict.items()) if isinstance(logger, logging.Logger)]
    return found


def _apply(levels: Levels) -> None:
    """Give this process's loggers the parent's levels: each logger the parent gave a level
    has it, every other none (NOTSET), ``logging.disable`` as there. Walks the loggers only
    when the levels asked for are not those applied (a cheap look at the parent's loggers
    first: an iteration may have changed one)."""
    global _applied, _saved_disable
    disable, named = levels
    manager = logging.Logger.manager
    if levels == _applied and manager.disable == disable and all(_level_of(name) == level for name, level in named):
        return
    wanted = dict(named)
    for name, logger in _loggers():
        level = wanted.pop(name, logging.NOTSET)
        if logger.level != level:
            own = _saved[name][0] if name in _saved else logger.level
            _saved[name] = (own, level)
            logger.level = level
    for name, level in wanted.items():  # loggers the parent has and this process not yet
        if level != logging.NOTSET:
            _saved.setdefault(name, (logging.NOTSET, level))
            logging.getLogger(name).level = level
    if manager.disable != disable:
        if _saved_disable is None:
            _saved_disable = manager.disable
        manager.disable = disable
    cast(Any, manager)._clear_cache()  # the loggers' isEnabledFor answers
    _applied = levels


def _level_of(name: str) -> int | None:
    logger = logging.getLogger() if name == "" else logging.Logger.manager.loggerDict.get(name)
    return logger.level if isinstance(logger, logging.Logger) else None


def _restore() -> None:
    """This process's own levels again, where the parent's are still in place (a level the
    program set since stays)."""
    global _applied, _saved_disable
    manager = logging.Logger.manager
    for name, (own, theirs) in _saved.items():
        logger = logging.getLogger() if name == "" else manager.loggerDict.get(name)
        if isinstance(logger, logging.Logger) and logger.level == theirs:
            logger.level = own
    if _saved_disable is not None and _applied is not None and manager.disable == _applied[0]:
        manager.disable = _saved_disable
    _saved.clear()
    _saved_disable = None
    _applied = None
    cast(Any, manager)._clear_cache()  # the loggers' isEnabledFor answers


def standalone() -> None:
    """A chunk of a loop without ``forward_logging`` runs next in this process: its records
    are this process's to handle, with its own levels, as they were before any loop
    forwarded them; what the initializer logged is handled here too. Costs nothing when
    nothing was taken over."""
    if _applied is not None:
        _restore()
    if _pending:
        records = pending_setup_records()
        handle(records)


# The initializer ----------------------------------------------------------------------------


class _Setup(_Sink):
    def add(self, record: logging.LogRecord) -> None:
        portable = _portable(record, None)
        with _lock:
            _pending.append(portable)


def begin_setup(levels: Levels) -> None:
    """The user's initializer runs now, in a new worker: keep what it logs for the first chunk."""
    _take_over(_Setup(), levels)


def end_setup() -> None:
    _give_back()


def pending_setup_records() -> tuple[logging.LogRecord, ...]:
    """What the initializer logged and no chunk has taken yet (taken now)."""
    with _lock:
        records = tuple(_pending)
        _pending.clear()
    return records


# A chunk ------------------------------------------------------------------------------------


class LogForwarding(_Sink):
    """A chunk's records, by position in the chunk (-1: emitted outside an iteration, or by
    the worker's initializer)."""

    def __init__(self, levels: Levels) -> None:
        self.levels = levels
        self._records: dict[int, list[logging.LogRecord]] = {}
        self._thread = 0
        self._closed = False

    def open(self) -> None:
        """Take over this process's logging for the chunk."""
        index_records()  # in case the program replaced the factory since
        self._thread = threading.get_ident()
        setup = pending_setup_records()
        if setup:
            self._records[-1] = list(setup)
        _take_over(self, self.levels)

    def add(self, record: logging.LogRecord) -> None:
        if threading.get_ident() == self._thread:
            found = _running(sys._getframe(1), _depth())
        else:  # a thread the iteration started: it goes with the iteration running now
            found = _running(sys._current_frames().get(self._thread))
        position, index = found if found is not None else (-1, None)
        portable = _portable(record, index)
        with _lock:
            taken = not self._closed
            if taken:
                self._records.setdefault(position, []).append(portable)
        if not taken:  # the chunk ended while the record was being made: handled here
            _call_handlers(logging.getLogger(record.name), record)

    def close(self) -> None:
        """Give this process's logging back (the parent's levels stay until a loop without
        forwarding runs here: see `standalone`)."""
        _give_back()
        with _lock:
            self._closed = True

    def records(self) -> dict[int, list[logging.LogRecord]]:
        return self._records


def handle(records: tuple[Any, ...]) -> None:
    """Give records from a worker to this process's loggers, as if emitted here."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
