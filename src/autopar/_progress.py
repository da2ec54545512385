"""An optional progress bar: tqdm when it is installed, a silent stand-in otherwise.

What iterations printed is written above the bar in whole lines: a line an iteration left open
is held until one ends it, since the bar, drawn again after each write, would draw over it.
Only the outermost loop draws a bar: `autopar._options.resolve` turns it off for a loop
started inside an iteration.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, TextIO

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar(Protocol):
    def update(self, n: int) -> Any: ...
    def close(self) -> Any: ...
    def write(self, text: str, stream: TextIO) -> None:
        """Write text an iteration printed, without tearing the bar."""


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, text: str, stream: TextIO) -> None:
        stream.write(text)


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

    def write(self, text: str, stream: TextIO) -> None:
        _, held = self._open_lines.pop(id(stream), (stream, ""))
        lines, newline, rest = (held + text).rpartition("\n")
        if rest:
            self._open_lines[id(stream)] = (stream, rest)
        if newline:
            with self._bar.external_write_mode(file=stream):  # tqdm.write, which does not flush
                stream.write(lines + newline)
                stream.flush()  # before the bar is drawn again: stdout may be a pipe, buffered


def progress_bar(enabled: bool, total: int | None, name: str) -> ProgressBar:
    """A tqdm bar counting iterations when ``enabled``, else a no-op with the same interface."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # not installed, or broken: a bar is not worth failing the loop
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "tqdm"
        why = (
            "needs tqdm (pip install tqdm, or autopar's progress extra)"
            if missing
            else f"could not import tqdm ({exc})"
        )
        warnings.warn(f"progress=True {why}; running without a bar", stacklevel=5)
        return _NoProgress()
    return _Bar(tqdm(total=total, desc=name, unit="it"))
