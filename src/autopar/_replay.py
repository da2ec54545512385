"""Running a loop's iterations again in this process: ``failure.replay()`` and
``res.retry_failures()``.

Each `Failure` and `LoopResult` keeps a `Rerun`: the loop's function, the names of its
per-iteration keyword arguments, and its options. The arguments are the failure's own. A
record pickled and loaded elsewhere looks its function up again; when that fails (a function
renamed or removed since), replaying it says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from autopar._collect import run_map
from autopar._debugger import post_mortem
from autopar._errors import AutoparError
from autopar._options import Options, resolve
from autopar._plan import Loop
from autopar._random import iteration_streams
from autopar._results import Failure, LoopResult
from autopar._serialize import describe, dumps, loads

__all__ = ["Rerun"]


class Rerun:
    """How to run one loop's iterations again (the `Rerunner` its records hand over to)."""

    def __init__(
        self,
        function: Callable[..., Any] | None,
        name: str,
        keywords: tuple[str, ...],
        options: Options,
        lost: str = "",
    ) -> None:
        self.function = function
        self.name = name
        self.keywords = keywords
        self.options = options
        self.lost = lost
        """Why ``function`` is None: it could not be found again where this was unpickled."""

    def replay(self, failure: Failure, debug: bool) -> Any:
        function = self._function(f"replay iteration {failure.index}")
        with iteration_streams(self.options.seed, failure.index):
            if not debug:
                return function(*failure.args, **failure.kwargs)
            try:
                return function(*failure.args, **failure.kwargs)
            except BaseException as exc:
                post_mortem(exc.__traceback__)
                raise

    def retry(self, result: LoopResult[Any], changes: dict[str, Any]) -> LoopResult[Any]:
        function = self._function("retry the failed iterations")
        options = self.options.merge(changes)
        failures = result.failures
        keywords = self.keywords
        broadcast = {name: value for name, value in failures[0].kwargs.items() if name not in keywords}
        arguments = [failure.args + tuple(failure.kwargs[name] for name in keywords) for failure in failures]
        rerun = Rerun(function, self.name, keywords, options)
        indices = [failure.index for failure in failures]
        loop = Loop(
            function, self.name, arguments, broadcast, resolve(options), len(arguments), False, keywords, indices, rerun
        )
        again = run_map(loop)
        values, new_values = list(result), list(again)
        for index in indices:
            values[index] = new_values[index] if index < len(new_values) else None
        tried = {failure.index: failure.attempts for failure in failures}
        still = [replace(failure, attempts=failure.attempts + tried[failure.index]) for failure in again.failures]
        return LoopResult(values, still, again.stats, list(result.missing), rerun)

    def _function(self, doing: str) -> Callable[..., Any]:
        if self.function is None:
            raise AutoparError(f"cannot {doing} of {self.name}: its function cannot be found any more ({self.lost})")
        return self.function

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its function when it can be (by reference where importable), and
        without it otherwise: a result must load even where its function is gone."""
        try:
            function: bytes | None = dumps(self.function)
            lost = ""
        except Exception as exc:
            function, lost = None, f"it could not be pickled with this record: {describe(exc)}"
        options = self.options if isinstance(self.options.backend, str) else replace(self.options, backend="process")
        try:
            dumps(options)
        except Exception:  # an initializer that cannot travel: the record still does
            options = replace(options, initializer=None, initargs=())
        return _unpickled_rerun, (function, lost or self.lost, self.name, self.keywords, options)


def _unpickled_rerun(
    function: bytes | None, lost: str, name: str, keywords: tuple[str, ...], options: Options
) -> Rerun:
    found: Callable[..., Any] | None = None
    if function is not None:
        try:
            found = loads(function)
        except Exception as exc:
            lost = describe(exc)
    return Rerun(found, name, keywords, options, lost)
