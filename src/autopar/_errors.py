"""autopar's exceptions, and the helpers that dress a remote exception for the user.

Hierarchy::

    Exception
     └── AutoparError                      base of everything autopar raises itself
          ├── WorkerCrashed                the worker process died while running the iteration
          ├── IterationTimeout             (also a TimeoutError) the iteration ran past `timeout`
          ├── SerializationError           an argument, result or exception could not be pickled
          └── RemoteError                  stand-in for a worker exception that could not be
                                           carried back as its own type

    RemoteTraceback                        the worker-side traceback text, set as ``__cause__``

Every class here survives a pickle round-trip: its fields are rebuilt from ``self.args``.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import types
from typing import Any

__all__ = [
    "AutoparError",
    "ChunkArgumentsError",
    "IterationTimeout",
    "NotCachedHere",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "UnsafeLoopError",
    "WorkerCrashed",
    "add_iteration_note",
    "drop_earlier_iteration_note",
    "exception_fields",
    "fresh_copy",
    "rebuild_exception",
    "set_attribute",
]


class AutoparError(Exception):
    """Base class of the exceptions autopar raises itself."""


class WorkerCrashed(AutoparError):
    """The worker process died while it was running this iteration.

    ``exitcode`` is the process exit code, negative for a signal (as in
    `multiprocessing.Process.exitcode`), or ``None`` when the backend cannot tell.
    """

    def __init__(self, message: str, exitcode: int | None = None, pid: int | None = None) -> None:
        super().__init__(message, exitcode, pid)
        self.exitcode = exitcode
        self.pid = pid

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def signal_name(self) -> str | None:
        """The name of the signal that killed the worker (``"SIGKILL"``), if one did."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"


class IterationTimeout(AutoparError, TimeoutError):
    """The iteration ran longer than the ``timeout`` option allows."""


class SerializationError(AutoparError):
    """An argument, result or exception of one iteration could not be pickled or unpickled;
    or the function or a broadcast keyword argument could not be, which stops the whole loop."""


class UnsafeLoopError(AutoparError):
    """``AUTOPAR_VERIFY=N``: a loop's parallel run would not be its serial run. ``report`` is
    the `VerifyReport` that says what differs and what to change."""

    def __init__(self, report: Any) -> None:
        super().__init__(f"this loop is not safe to run in parallel as it is:\n{report}")
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        return UnsafeLoopError, (self.report,)


class ChunkArgumentsError(SerializationError):
    """A worker could not unpickle a chunk's arguments: the parent retries them one by one,
    so that only the culprit fails."""


class NotCachedHere(Exception):
    """A chunk named its function or keyword arguments by key, and this worker does not have
    them: the worker returns this (nothing ran) and the parent sends the chunk again, with
    them. ``worker`` is the worker's identity, as in `ChunkResult.worker`."""

    def __init__(self, message: str, worker: str) -> None:
        super().__init__(message, worker)
        self.worker = worker

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteError(AutoparError):
    """Stand-in for an exception raised in a worker that could not be carried back as itself.

    ``type_name`` is the original exception's qualified type name and ``message`` its text;
    the worker-side traceback is in ``__cause__`` and in the `Failure`.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text (like concurrent.futures)."""

    def __init__(self, tb_text: str) -> None:
        super().__init__(tb_text)
        self.tb_text = tb_text

    def __str__(self) -> str:
        return f'\n"""\n{self.tb_text.rstrip()}\n"""'


def set_attribute(exc: BaseException, name: str, value: Any) -> None:
    """Set an attribute on an exception, even a frozen one (a frozen dataclass, say)."""
    try:
        setattr(exc, name, value)
    except Exception:
        object.__setattr__(exc, name, value)


def fresh_copy(exc: BaseException) -> BaseException:
    """A copy of an exception that several iterations may share (one a whole chunk failed
    with, or the very object the user's code raised, and may raise again), so that each gets
    only its own note; the exception itself when it cannot be copied."""
    fresh = _copy_of(exc)
    if fresh is None:
        return exc
    try:  # past the class's __setattr__, which a frozen dataclass uses to refuse
        for name in ("__cause__", "__context__", "__suppress_context__", "__traceback__"):
            object.__setattr__(fresh, name, getattr(exc, name))
        if hasattr(exc, "__notes__"):
            vars(fresh)["__notes__"] = list(exc.__notes__)
    except Exception:
        return exc
    return fresh


def _copy_of(exc: BaseException) -> BaseException | None:
    """The exception rebuilt as pickling would, unless that changes it (an ``__init__`` that
    formats its message formats it twice); else from its class, ``args`` and attributes,
    without ``__init__``. Either way with its `exception_fields`."""
    try:
        fresh = copy.copy(exc)
        if getattr(fresh, "__dict__", None) is getattr(exc, "__dict__", False):
            # A copyreg reducer may hand the copy the original's own __dict__ (tblib's, which
            # importing Dask installs): the copy's note would then be the original's too.
            object.__setattr__(fresh, "__dict__", dict(vars(exc)))
        if fresh.args == exc.args and str(fresh) == str(exc):
            _set_fields(fresh, exception_fields(exc))  # beyond what reduce carries
            return fresh
    except Exception:
        pass
    try:
        return rebuild_exception(type(exc), exc.args, vars(exc), exception_fields(exc))
    except Exception:
        return None


def exception_fields(exc: BaseException) -> dict[str, Any]:
    """What an exception holds outside ``args`` and ``__dict__``: the C fields of builtin
    exceptions (an OSError's errno and file name, a SyntaxError's location, a UnicodeError's
    position, StopIteration.value, AttributeError.name) and ``__slots__``."""
    fields: dict[str, Any] = {}
    for klass in reversed(type(exc).__mro__):
        for name, member in vars(klass).items():
            if not isinstance(member, types.MemberDescriptorType) or name in ("__dict__", "__weakref__"):
                continue
            try:
                value = member.__get__(exc, type(exc))
            except AttributeError:  # a slot never set
                continue
            if value is not None or klass.__module__ != "builtins":  # None: a C field never set
                fields[name] = value
    return fields


def rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any], fields: dict[str, Any]
) -> BaseException:
    """An exception made from its parts, as unpickling makes an object: without calling its
    ``__init__`` (one that formats its message would format it twice) or its class's
    ``__setattr__`` (a frozen dataclass refuses it)."""
    exc = cls.__new__(cls, *args)
    object.__setattr__(exc, "args", args)
    vars(exc).update(state)
    _set_fields(exc, fields)
    return exc


def _set_fields(exc: BaseException, fields: dict[str, Any]) -> None:
    """Set `exception_fields` past the class's ``__setattr__``."""
    for name, value in fields.items():
        with contextlib.suppress(AttributeError, TypeError):  # a read-only member: keep its own
            object.__setattr__(exc, name, value)


_ITERATION_NOTE = "_autopar_iteration_note"


def add_iteration_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc`` once, tolerating exceptions that refuse new attributes."""
    notes = list(getattr(exc, "__notes__", ()))
    if note in notes:
        return
    try:
        exc.add_note(note)
    except Exception:
        set_attribute(exc, "__notes__", [*notes, note])
    set_attribute(exc, _ITERATION_NOTE, note)


def drop_earlier_iteration_note(exc: BaseException) -> None:
    """Remove the note an earlier loop added to this very object: in-process, a prebuilt
    exception (``NOT_FOUND = KeyError(...)``) raised again would pile up every loop's note."""
    earlier = getattr(exc, _ITERATION_NOTE, None)
    notes = getattr(exc, "__notes__", None)
    if earlier is not None and isinstance(notes, list) and earlier in notes:
        set_attribute(exc, "__notes__", [note for note in notes if note != earlier])
