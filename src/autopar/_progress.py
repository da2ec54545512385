"""An optional progress bar: tqdm when it is installed, a silent stand-in otherwise."""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Protocol

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar(Protocol):
    def update(self, n: int) -> Any: ...
    def close(self) -> Any: ...


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, name: str) -> ProgressBar:
    """A tqdm bar counting iterations when ``enabled``, else a no-op with the same interface."""
    if not enabled:
        return _NoProgress()
    if importlib.util.find_spec("tqdm") is None:
        warnings.warn(
            "progress=True needs tqdm (pip install tqdm, or autopar's progress extra); running without a bar",
            stacklevel=5,
        )
        return _NoProgress()
    from tqdm.auto import tqdm

    bar: ProgressBar = tqdm(total=total, desc=name, unit="it")
    return bar
