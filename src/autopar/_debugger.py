"""The debugger: ``on_error="debug"`` and ``failure.replay(debug=True)`` stop in it where the
iteration raised.

The debugger is ``pdb``'s post-mortem, or that of the module ``PYTHONBREAKPOINT`` names
(``ipdb.set_trace`` gives ``ipdb.post_mortem``); ``PYTHONBREAKPOINT=0`` turns it off, as it
does for ``breakpoint()``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

__all__ = ["debug_failure", "interactive", "post_mortem"]


class _Replayable(Protocol):
    @property
    def index(self) -> int: ...

    def replay(self, debug: bool = False) -> Any: ...


def interactive() -> bool:
    """Whether a person can answer a debugger here: stdin is a terminal."""
    stdin = sys.stdin
    try:
        return stdin is not None and stdin.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def post_mortem(tb: TracebackType | None) -> None:
    """Open the debugger on ``tb``, at the frame that raised."""
    debugger = _post_mortem_function()
    if debugger is not None:
        debugger(tb)


def _post_mortem_function() -> Callable[[TracebackType | None], Any] | None:
    hook = os.environ.get("PYTHONBREAKPOINT", "").strip()
    if hook == "0":
        return None
    if not hook:
        import pdb

        return pdb.post_mortem
    module_name, _, name = hook.rpartition(".")
    try:
        module = importlib.import_module(module_name or "builtins")
    except ImportError as exc:
        raise RuntimeError(f"PYTHONBREAKPOINT={hook!r} names a module that cannot be imported: {exc}") from exc
    found = getattr(module, "post_mortem", None)
    if callable(found):
        return found  # type: ignore[no-any-return]
    breakpoint_hook = getattr(module, name, None)
    if not callable(breakpoint_hook):
        raise RuntimeError(f"PYTHONBREAKPOINT={hook!r} names no function")
    return lambda tb: breakpoint_hook()  # no post-mortem there: at least stop in its debugger


def debug_failure(failure: _Replayable) -> None:
    """``on_error="debug"``: run the failed iteration again here under the debugger, when a
    person can answer it (stdin is a terminal, ``PYTHONBREAKPOINT`` is not 0). The caller
    then raises the loop's own exception, with its notes and results so far."""
    if not interactive() or os.environ.get("PYTHONBREAKPOINT", "").strip() == "0":
        return
    print(
        f"autopar: iteration {failure.index} failed; running it again in this process under the debugger",
        file=sys.stderr,
    )
    try:
        failure.replay(debug=True)
    except KeyboardInterrupt:
        raise
    except BaseException:  # the debugger has shown it; the loop's exception follows
        return
    print(
        f"autopar: iteration {failure.index} did not fail when run again in this process "
        "(did it depend on the worker: its memory, a crash, a timeout?); raising the loop's exception",
        file=sys.stderr,
    )
