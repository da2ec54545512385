"""Seeing what workers do: each iteration's printed output (``capture_output=``) and its log
records (``forward_logging=``, in `autopar._logs`), caught where the iteration runs and
handed to the parent with the chunk's results, by position.

In a worker process that runs one chunk at a time, ``sys.stdout`` and ``sys.stderr`` are
replaced by string buffers for the chunk, and each iteration's text is the part of them
written between its start and its end: two ``tell()`` calls per iteration, nothing more. In
this process (``"thread"``, ``"serial"``), where other threads write too, the streams are
replaced by a proxy that sends each thread's writes to the buffer of the iteration it runs,
and everything else on to the real stream.

What writes to the file descriptors 1 and 2 directly (a C extension's ``printf``, a child
process that inherited them) is not caught: it reaches the worker's own stdout and stderr,
as without capture.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TextIO

from autopar._logs import LogForwarding, handle
from autopar._records import IterationOutput, Settings

__all__ = ["Echo", "Observer"]


class Observer:
    """One chunk's capture, iteration by iteration: `begin` before each call, `end` after."""

    def __init__(self, settings: Settings, own_process: bool) -> None:
        self._streams = _Buffers(own_process) if settings.capture_output else None
        levels = settings.log_levels
        self._logs = LogForwarding(levels) if levels is not None and own_process else None
        self._spans: dict[int, tuple[int, int, int, int]] = {}
        self._marks = (0, 0)
        self.per_iteration = self._streams is not None
        """`begin` and `end` have work to do (log records find their iteration themselves)."""

    def __enter__(self) -> Observer:
        if self._streams is not None:
            self._streams.open()
        if self._logs is not None:
            self._logs.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._streams is not None:
            self._streams.close()
        if self._logs is not None:
            self._logs.close()

    def begin(self, position: int) -> None:
        streams = self._streams
        if streams is not None:
            self._marks = (streams.stdout.tell(), streams.stderr.tell())

    def end(self, position: int) -> None:
        streams = self._streams
        if streams is not None:
            out, err = streams.stdout.tell(), streams.stderr.tell()
            if (out, err) != self._marks:
                self._spans[position] = (*self._marks, out, err)

    def outputs(self) -> dict[int, IterationOutput] | None:
        """By position: what each iteration wrote and logged; None when nothing was."""
        found: dict[int, IterationOutput] = {}
        if self._streams is not None and self._spans:
            stdout, stderr = self._streams.stdout.getvalue(), self._streams.stderr.getvalue()
            for position, (out_from, err_from, out_to, err_to) in self._spans.items():
                found[position] = IterationOutput(stdout[out_from:out_to], stderr[err_from:err_to])
        if self._logs is not None:
            for position, records in self._logs.records().items():
                found[position] = found.get(position, IterationOutput())._replace(records=tuple(records))
        return found or None


class _Buffers:
    """The chunk's two string buffers, standing in for ``sys.stdout`` and ``sys.stderr``."""

    def __init__(self, own_process: bool) -> None:
        self.own_process = own_process
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self._saved: tuple[Any, Any] | None = None

    def open(self) -> None:
        if self.own_process:
            self._saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = self.stdout, self.stderr
        else:
            _ThreadStreams.attach(self.stdout, self.stderr)

    def close(self) -> None:
        if self.own_process and self._saved is not None:
            sys.stdout, sys.stderr = self._saved
        elif not self.own_process:
            _ThreadStreams.detach()


class _Proxy:
    """``sys.stdout`` (or ``sys.stderr``) while iterations capture in this process: a thread
    running such an iteration writes to its buffer, any other to the real stream."""

    def __init__(self, real: TextIO, which: str) -> None:
        self._real = real
        self._which = which

    def write(self, text: str) -> int:
        buffer: io.StringIO | None = getattr(_ThreadStreams.local, self._which, None)
        return (buffer if buffer is not None else self._real).write(text)

    def flush(self) -> None:
        buffer = getattr(_ThreadStreams.local, self._which, None)
        if buffer is None:
            self._real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _ThreadStreams:
    """The proxies on ``sys.stdout`` and ``sys.stderr``, put there by the first capturing
    iteration in this process and taken away after the last."""

    local = threading.local()
    _lock = threading.Lock()
    _users = 0
    _proxies: tuple[_Proxy, _Proxy] | None = None

    @classmethod
    def attach(cls, stdout: io.StringIO, stderr: io.StringIO) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._proxies = _Proxy(sys.stdout, "stdout"), _Proxy(sys.stderr, "stderr")
                sys.stdout, sys.stderr = cls._proxies
            cls._users += 1
        cls.local.stdout, cls.local.stderr = stdout, stderr

    @classmethod
    def detach(cls) -> None:
        cls.local.stdout = cls.local.stderr = None
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._proxies is not None:
                stdout, stderr = cls._proxies
                if sys.stdout is stdout:  # not replaced since (by the program, or pytest)
                    sys.stdout = stdout._real
                if sys.stderr is stderr:
                    sys.stderr = stderr._real
                cls._proxies = None


class Echo:
    """In this process, what iterations wrote and logged: written to ``sys.stdout`` and
    ``sys.stderr`` (through ``write``, which a progress bar may take over) and handed to the
    loggers, in input order as results are collected (``in_order``), else as they come."""

    def __init__(
        self, write: Callable[[str, TextIO], None], aside: Callable[[], AbstractContextManager[Any]], in_order: bool
    ) -> None:
        self._write = write
        self._aside = aside
        self._in_order = in_order
        self._pending: dict[int, IterationOutput] = {}
        self._finished: dict[int, int] = {}  # runs of finished indices: first -> one past the last
        self._next = 0  # every iteration before it has finished

    def add(self, indices: Sequence[int], outputs: dict[int, IterationOutput] | None) -> None:
        """Iterations ``indices`` finished, with these ``outputs`` (by index; -1: a worker's
        initializer, shown at once)."""
        outputs = outputs or {}
        if not self._in_order:
            for index in sorted(outputs):
                self.show(outputs[index])
            return
        if outputs:
            setup = outputs.pop(-1, None)
            if setup is not None:
                self.show(setup)
            for index, output in outputs.items():
                earlier = self._pending.get(index)  # what a failed try logged, before a retry
                if earlier is not None:
                    output = output._replace(records=earlier.records + output.records)
                self._pending[index] = output
        if isinstance(indices, range):
            if indices:
                self._finished[indices.start] = indices.stop
        else:
            self._finished.update((index, index + 1) for index in indices)
        while self._next in self._finished:
            self._next = self._finished.pop(self._next)
        if self._pending:
            for index in sorted(index for index in self._pending if index < self._next):
                self.show(self._pending.pop(index))

    def show(self, output: IterationOutput) -> None:
        if output.records:
            with self._aside():  # a handler writing to the terminal must not tear a progress bar
                handle(output.records)
        if output.stdout:
            self._write(output.stdout, sys.stdout)
        if output.stderr:
            self._write(output.stderr, sys.stderr)
