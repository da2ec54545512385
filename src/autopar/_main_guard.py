"""A script that starts a loop without ``if __name__ == "__main__":`` gets one clear error.

Workers started by spawn or forkserver import the main module again (as ``__mp_main__``)
while multiprocessing sets them up, so a loop at a script's top level starts again in each
of them. An error raised there would print a traceback per worker, and the parent would
only see its pool break. Instead autopar's own workers, which their name tells apart while
they are set up, exit at once, quietly, with `UNGUARDED_EXIT_CODE`; the parent turns that
into one `WorkerCrashed` that names the script, and the line to put under the guard.
"""

from __future__ import annotations

import ast
import linecache
import multiprocessing
import os
import sys
from collections.abc import Container, Mapping
from multiprocessing.context import BaseContext, SpawnContext, SpawnProcess
from types import ModuleType

from autopar._errors import WorkerCrashed

__all__ = ["UNGUARDED_EXIT_CODE", "naming_workers", "raise_if_script_unguarded", "refuse_while_importing_main"]

UNGUARDED_EXIT_CODE = 78
"""How a worker of ours exits when the main module it imports starts a loop (EX_CONFIG)."""


class AutoparSpawnWorker(SpawnProcess):
    """A worker process of autopar's own pool, started by spawn."""


class _SpawnWorkers(SpawnContext):
    Process = AutoparSpawnWorker


_OWN_CONTEXTS: dict[type[BaseContext], BaseContext] = {SpawnContext: _SpawnWorkers()}
_WORKER_NAMES: tuple[str, ...] = (f"{AutoparSpawnWorker.__name__}-",)

if sys.platform != "win32":
    from multiprocessing.context import ForkServerContext, ForkServerProcess

    class AutoparForkServerWorker(ForkServerProcess):
        """A worker process of autopar's own pool, started by the fork server."""

    class _ForkServerWorkers(ForkServerContext):
        Process = AutoparForkServerWorker

    _OWN_CONTEXTS[ForkServerContext] = _ForkServerWorkers()
    _WORKER_NAMES += (f"{AutoparForkServerWorker.__name__}-",)


def naming_workers(context: BaseContext) -> BaseContext:
    """``context``, starting processes whose default name says they are autopar's workers: a
    worker knows its name before it imports the main module (spawn and forkserver)."""
    return _OWN_CONTEXTS.get(type(context), context)


def refuse_while_importing_main(start_method: str) -> None:
    """Refuse to start workers by spawn or forkserver while this process is being set up as
    such a worker itself: they would import the main module too, without end. A worker of
    ours exits quietly, for its parent to explain; any other process raises."""
    process = multiprocessing.current_process()
    if start_method == "fork" or not getattr(process, "_inheriting", False):
        return
    if process.name.startswith(_WORKER_NAMES):
        # Raised, this would print a traceback in every worker; the parent explains instead.
        # Nothing of ours runs here yet, and the script's exit hooks are the parent's to run.
        os._exit(UNGUARDED_EXIT_CODE)
    raise RuntimeError(
        "a loop started while a new worker process imports your main module: put the "
        'script\'s loop under `if __name__ == "__main__":` (workers started by spawn or '
        "forkserver, and with max_tasks_per_worker, import the main module again)"
    )


def raise_if_script_unguarded(exit_codes: Mapping[int, int | None], running: Container[int]) -> None:
    """Raise the one error for a pool that broke because its workers found the script's loop
    unguarded: one exited with `UNGUARDED_EXIT_CODE` before it ran anything of ours."""
    for pid, exit_code in exit_codes.items():
        if exit_code == UNGUARDED_EXIT_CODE and pid not in running:
            raise WorkerCrashed(_advice(), exit_code, pid)


def _advice() -> str:
    """What to put under the guard, and why."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str):
        path = None
    line = _unguarded_line(main, path) if main is not None and path is not None else None
    if path is None or line is None:
        what, again = f"the loops at the top level of {path or 'your main module'}", "a loop there"
    else:
        source = linecache.getline(path, line).strip()
        what, again = f"line {line} of {path}{f', `{source}`,' if source else ''}", "this loop again there"
    return (
        f'put {what} under `if __name__ == "__main__":`: each new worker process (started by spawn or '
        f"forkserver, as with max_tasks_per_worker) imports the script, and would start {again}"
    )


def _unguarded_line(main: ModuleType, path: str) -> int | None:
    """The first line of the script's top-level statement that this thread runs now (the loop,
    or a call that leads to it); None when it is under the guard already (the workers stopped
    at another loop) or cannot be found (a loop run by another thread)."""
    frame = sys._getframe()
    while frame.f_code.co_name != "<module>" or frame.f_globals is not vars(main):
        if frame.f_back is None:
            return None
        frame = frame.f_back
    try:
        statements = ast.parse("".join(linecache.getlines(path)), path).body
    except (SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for statement in statements:
        if statement.lineno <= line <= (statement.end_lineno or statement.lineno):
            return None if isinstance(statement, ast.If) and _tests_main(statement.test) else statement.lineno
    return None


def _tests_main(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = (test.left, test.comparators[0])
    names = [isinstance(side, ast.Name) and side.id == "__name__" for side in sides]
    mains = [isinstance(side, ast.Constant) and side.value == "__main__" for side in sides]
    return (names[0] and mains[1]) or (mains[0] and names[1])
