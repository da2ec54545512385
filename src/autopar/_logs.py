"""``forward_logging=``: log records that iterations emit in worker processes, handled by the
parent's ``logging`` configuration as if emitted there, with ``record.autopar_index``.

Worker side, `LogForwarding` (used by `autopar._capture.Observer`) collects each iteration's
records for the chunk's result; parent side, `handle` gives them to the parent's loggers.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LogForwarding", "handle", "parent_levels"]


def parent_levels() -> tuple[int, tuple[tuple[str, int], ...]]:
    """What the workers need to create the records this process would handle: the
    ``logging.disable`` level, and the level of every logger that was given one."""
    manager = logging.Logger.manager
    levels = [("", logging.getLogger().level)]
    levels += [
        (name, logger.level)
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    ]
    return manager.disable, tuple(levels)


class LogForwarding:
    """A chunk's records, by position in the chunk (-1: emitted outside an iteration)."""

    def __init__(self, levels: tuple[int, tuple[tuple[str, int], ...]]) -> None:
        self.levels = levels
        self._records: dict[int, list[Any]] = {}

    def open(self) -> None:
        """Take over this process's logging for the chunk."""

    def begin(self, position: int, index: int) -> None:
        """Records from now on belong to the iteration at ``position`` (input ``index``)."""

    def close(self) -> None:
        """Give this process's logging back."""

    def records(self) -> dict[int, list[Any]]:
        return self._records


def handle(records: tuple[Any, ...]) -> None:
    """Give records from a worker to this process's loggers, as if emitted here."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
