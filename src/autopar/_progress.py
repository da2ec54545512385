"""An optional progress bar: tqdm when it is installed, a silent stand-in otherwise."""

from __future__ import annotations

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
    bar: ProgressBar = tqdm(total=total, desc=name, unit="it")
    return bar
