"""Logging for applications: library code only calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys
from typing import IO

_HANDLER_FLAG = "_sparselens_handler"
LEVELS = ("debug", "info", "warning", "error")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(
    level: int | str = "info",
    stream: IO[str] | None = None,
    fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
    logger_name: str = "sparselens",
) -> logging.Logger:
    """Send ``logger_name`` records at ``level`` or above to ``stream`` (default: the current
    ``sys.stderr``).

    Idempotent: a handler added by an earlier call is replaced, never duplicated.
    """
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
        level = getattr(logging, level.upper())
    logger = logging.getLogger(logger_name)
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_FLAG, False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    setattr(handler, _HANDLER_FLAG, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


__all__ = ["LEVELS", "setup_logging"]
