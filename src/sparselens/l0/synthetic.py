"""A small, deterministic synthetic survey with a known feasible calibration.

Records are households; targets are regional totals of a few household measures (the layout of a
microsimulation calibration matrix). The numbers follow the benchmark of the l0-python reference
(§9): each (target, household) entry is non-zero with probability ``density`` with a
lognormal(1.5, 0.25) value, a random ``active_fraction`` of the households carry a
lognormal(2, 1) true weight and the rest weight 0, and the targets are ``y = M @ w_true``, so an
exact sparse solution exists.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

MEASURES: tuple[str, ...] = (
    "households",
    "people",
    "employment_income",
    "benefit_income",
    "council_tax",
)
"""Target kinds, cycled over regions; ``groups[j]`` is the index of target ``j``'s kind."""


@dataclass(frozen=True, eq=False)
class SyntheticSurvey:
    """A calibration problem with its ground truth.

    Attributes: ``M`` (targets x records CSR array), ``y`` (targets), ``w_true`` (records, zero
    for inactive households), ``target_names`` (``"region_03/people"``), ``groups`` (int kind id
    per target), ``group_names`` (kind names, indexed by group id).
    """

    M: sp.csr_array
    y: np.ndarray
    w_true: np.ndarray
    target_names: list[str]
    groups: np.ndarray
    group_names: tuple[str, ...] = field(default=MEASURES)

    @property
    def n_targets(self) -> int:
        return int(self.M.shape[0])

    @property
    def n_records(self) -> int:
        return int(self.M.shape[1])

    @property
    def active(self) -> np.ndarray:
        """Indices of the households with a non-zero true weight."""
        return np.flatnonzero(self.w_true)

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Save as ``matrix.npz`` (``scipy.sparse.save_npz``) and ``targets.csv``
        (``name,value,group``), the input format of ``sparselens calibrate``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        mpath, tpath = out / "matrix.npz", out / "targets.csv"
        sp.save_npz(mpath, sp.csr_matrix(self.M))
        with open(tpath, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["name", "value", "group"])
            for name, value, g in zip(self.target_names, self.y, self.groups, strict=True):
                w.writerow([name, repr(float(value)), self.group_names[int(g)]])
        return mpath, tpath


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value}")
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError(f"{name} must be a number > 0 and <= 1, got {value}")
    return v


def make_survey(
    n_records: int = 2000,
    n_targets: int = 100,
    density: float = 0.1,
    active_fraction: float = 0.5,
    seed: int = 0,
) -> SyntheticSurvey:
    """Build the survey; the same arguments always give the same arrays.

    Target ``j`` is measure ``MEASURES[j % 5]`` of region ``j // 5``. At least one household is
    active (``round(active_fraction * n_records)``, minimum 1).
    """
    n_records = _check_int("n_records", n_records, 1)
    n_targets = _check_int("n_targets", n_targets, 1)
    density = _check_fraction("density", density)
    active_fraction = _check_fraction("active_fraction", active_fraction)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)

    n_active = max(1, round(active_fraction * n_records))
    active = np.sort(rng.choice(n_records, size=n_active, replace=False))
    w_true = np.zeros(n_records)
    w_true[active] = rng.lognormal(2.0, 1.0, size=n_active)

    # one row at a time: memory O(n_records), the same stream for any n_targets prefix
    indptr = [0]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for _ in range(n_targets):
        cols = np.flatnonzero(rng.random(n_records) < density)
        indices.append(cols)
        data.append(rng.lognormal(1.5, 0.25, size=cols.size))
        indptr.append(indptr[-1] + cols.size)
    M = sp.csr_array(
        (
            np.concatenate(data) if data else np.zeros(0),
            np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32),
            np.asarray(indptr, dtype=np.int32 if indptr[-1] < 2**31 else np.int64),
        ),
        shape=(n_targets, n_records),
    )
    y = M @ w_true

    k = len(MEASURES)
    width = max(2, len(str((n_targets - 1) // k)))
    target_names = [f"region_{j // k:0{width}d}/{MEASURES[j % k]}" for j in range(n_targets)]
    groups = np.arange(n_targets, dtype=np.int64) % k
    return SyntheticSurvey(M=M, y=y, w_true=w_true, target_names=target_names, groups=groups)


__all__ = ["MEASURES", "SyntheticSurvey", "make_survey"]
