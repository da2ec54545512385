"""An optional progress bar: tqdm when it is installed, a silent stand-in otherwise."""

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
    """A tqdm bar; text goes above it, through ``tqdm.write``."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def write(self, text: str, stream: TextIO) -> None:
        self._bar.write(text, file=stream, end="")


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
