"""A stand-in debugger for PYTHONBREAKPOINT=_debughook.set_trace: records where it stopped."""

from __future__ import annotations

from types import TracebackType

STOPPED: list[tuple[str, int, dict[str, object]]] = []
"""(function name, line number, locals) of each frame a post-mortem stopped at."""


def set_trace() -> None:
    STOPPED.append(("set_trace", 0, {}))


def post_mortem(tb: TracebackType | None) -> None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    assert tb is not None
    frame = tb.tb_frame
    STOPPED.append((frame.f_code.co_name, tb.tb_lineno, dict(frame.f_locals)))
