"""One schedule type for every annealed quantity: temperature, p, gamma, learning rate, k.

A :class:`Schedule` maps training progress ``f`` in [0, 1] (step / total steps) to a value. It holds
``start`` until ``start_frac``, moves to ``end`` by ``end_frac`` along its ``kind``, then holds
``end``. With ``t = (f - start_frac) / (end_frac - start_frac)``:

* constant:     start
* linear:       start + (end - start) t
* cosine:       end + (start - end) (1 + cos(pi t)) / 2
* exponential:  start (end / start)^t   (geometric; start and end must have the same sign, != 0)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

ScheduleKind = Literal["constant", "linear", "cosine", "exponential"]


class Schedule(BaseModel):
    """Anneal a value from ``start`` to ``end`` between progress ``start_frac`` and ``end_frac``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ScheduleKind = "constant"
    start: float
    end: float | None = None
    start_frac: float = 0.0
    end_frac: float = 1.0

    @model_validator(mode="after")
    def _validate(self) -> Schedule:
        for name in ("start", "end", "start_frac", "end_frac"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        if not 0.0 <= self.start_frac <= self.end_frac <= 1.0:
            raise ValueError(
                "start_frac and end_frac must satisfy 0 <= start_frac <= end_frac <= 1, "
                f"got {self.start_frac}, {self.end_frac}"
            )
        if self.kind == "constant" and self.end is not None and self.end != self.start:
            raise ValueError(
                f"end must be omitted (or equal start) for a constant schedule, got {self.end}"
            )
        if self.kind == "exponential" and (self.start * self.final <= 0):
            raise ValueError(
                f"exponential schedule needs start and end of the same sign and non-zero, "
                f"got start={self.start}, end={self.final}"
            )
        return self

    @property
    def final(self) -> float:
        """The end value (``start`` when no end is given)."""
        return self.start if self.end is None else self.end

    def interpolate(self, t: float) -> float:
        """The curve at local time ``t`` (0 = start, 1 = end), without clamping ``t``."""
        s, e = self.start, self.final
        if self.kind == "constant":
            return s
        if self.kind == "linear":
            return s + (e - s) * t
        if self.kind == "cosine":
            return e + (s - e) * (1.0 + math.cos(math.pi * t)) / 2.0
        return s * (e / s) ** t

    def at(self, progress: float) -> float:
        """The value at ``progress`` in [0, 1]; held constant outside [start_frac, end_frac]."""
        if progress <= self.start_frac:
            return self.start
        if progress >= self.end_frac:
            return self.final
        t = (progress - self.start_frac) / (self.end_frac - self.start_frac)
        return self.interpolate(t)

    def at_step(self, step: int, total_steps: int) -> float:
        """The value at ``step`` of ``total_steps`` (progress ``step / total_steps``)."""
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        return self.at(step / total_steps)

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls(kind="constant", start=value)
