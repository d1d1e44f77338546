"""Progress bars that stay silent unless someone is watching a terminal."""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm


def progress_enabled(enabled: bool = True, file: IO[str] | None = None) -> bool:
    """True when ``enabled`` and ``file`` (default stderr) is an interactive terminal."""
    stream = file if file is not None else sys.stderr
    try:
        return bool(enabled) and stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(
    total: int | None,
    desc: str = "",
    *,
    enabled: bool = True,
    file: IO[str] | None = None,
    initial: int = 0,
    **kwargs: Any,
) -> tqdm:
    """A ``tqdm`` bar that is disabled (no output at all) off a TTY or when not ``enabled``."""
    stream = file if file is not None else sys.stderr
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        file=stream,
        disable=not progress_enabled(enabled, stream),
        dynamic_ncols=True,
        leave=False,
        **kwargs,
    )


__all__ = ["progress_bar", "progress_enabled"]
