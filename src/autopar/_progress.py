"""An optional progress bar: tqdm when it is installed, a silent stand-in otherwise.

Where the loop runs picks the bar. In a terminal (or a log), tqdm's text bar on stderr, and
what iterations printed is written above it in whole lines (a line an iteration left open is
held until one ends it: the bar, redrawn after each write, would draw over it). In a Jupyter
notebook, tqdm's widget when ipywidgets is installed; without it, the same text bar drawn in
one output of the cell, updated in place. Drawn on the cell's stderr instead, the bar would be
cut into pieces by the printed lines (the cell's stdout), and the cell shows every piece.

Only the outermost loop draws a bar: `autopar._options.resolve` turns it off for a loop
started inside an iteration.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from contextlib import AbstractContextManager
from typing import Any, Protocol, TextIO

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar(Protocol):
    def update(self, n: int) -> Any: ...
    def close(self) -> Any: ...
    def write(self, text: str, stream: TextIO) -> None:
        """Write text an iteration printed, without tearing the bar."""

    def aside(self) -> AbstractContextManager[Any]:
        """Around writes the bar does not see (log handlers): clear it, draw it again after."""


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, text: str, stream: TextIO) -> None:
        stream.write(text)

    def aside(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()


class _Bar:
    """A tqdm bar; text goes above it, as ``tqdm.write`` writes it, a whole line at a time."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._open_lines: dict[int, tuple[TextIO, str]] = {}  # by id(stream): text after its last newline

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        open_lines, self._open_lines = self._open_lines, {}
        for stream, text in open_lines.values():  # below the finished bar, as the loop left them
            stream.write(text)
            stream.flush()

    def aside(self) -> AbstractContextManager[Any]:
        return self._bar.external_write_mode(file=sys.stderr)  # type: ignore[no-any-return]

    def write(self, text: str, stream: TextIO) -> None:
        _, held = self._open_lines.pop(id(stream), (stream, ""))
        lines, newline, rest = (held + text).rpartition("\n")
        if rest:
            self._open_lines[id(stream)] = (stream, rest)
        if newline:
            with self._bar.external_write_mode(file=stream):  # tqdm.write, which does not flush
                stream.write(lines + newline)
                stream.flush()  # before the bar is drawn again: stdout may be a pipe, buffered


class _CellLine:
    """The file tqdm's text bar writes to in a notebook without ipywidgets: each status line
    it draws replaces the last, in one display output of the running cell."""

    encoding = "utf-8"  # so that tqdm draws the bar with block characters

    def __init__(self) -> None:
        self._line = ""
        self._shown = ""
        self._handle: Any = None

    def write(self, text: str) -> int:
        drawn = [part.rstrip() for part in re.split(r"[\r\n]", text) if part.strip()]
        if drawn:  # not the blanks that clear the line
            self._line = drawn[-1]
        return len(text)

    def flush(self) -> None:
        if self._line == self._shown:
            return
        from IPython import display as ipython_display

        data = {"text/plain": self._line}
        if self._handle is None:
            display: Any = ipython_display.display  # untyped
            self._handle = display(data, raw=True, display_id=True)
        else:
            self._handle.update(data, raw=True)
        self._shown = self._line


def _in_notebook() -> bool:
    """True in a Jupyter kernel whose front end shows outputs in cells (Notebook, Lab, VS
    Code), as tqdm.auto decides: not qtconsole or Spyder, which draw text bars themselves."""
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    ipython = sys.modules.get("IPython")
    if zmqshell is None or ipython is None:
        return False
    if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
        return False
    shell = ipython.get_ipython()
    kind = type(shell).__name__.lower()
    return isinstance(shell, zmqshell.ZMQInteractiveShell) and "qt" not in kind and "spyder" not in kind


def _tqdm() -> Any:
    """tqdm.auto's class. In a notebook without ipywidgets, importing it warns that it draws
    text instead of a widget: the bar below is drawn in place, so that warning is noise."""
    if "tqdm.auto" in sys.modules:
        from tqdm.auto import tqdm
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IProgress not found")
            from tqdm.auto import tqdm
    return tqdm


def progress_bar(enabled: bool, total: int | None, name: str) -> ProgressBar:
    """A tqdm bar counting iterations when ``enabled``, else a no-op with the same interface."""
    if not enabled:
        return _NoProgress()
    try:
        tqdm = _tqdm()
    except ImportError as exc:  # not installed, or broken: a bar is not worth failing the loop
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "tqdm"
        why = (
            "needs tqdm (pip install tqdm, or autopar's progress extra)"
            if missing
            else f"could not import tqdm ({exc})"
        )
        warnings.warn(f"progress=True {why}; running without a bar", stacklevel=5)
        return _NoProgress()
    widget = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    if _in_notebook() and not widget:
        return _Bar(tqdm(total=total, desc=name, unit="it", file=_CellLine()))
    return _Bar(tqdm(total=total, desc=name, unit="it"))
