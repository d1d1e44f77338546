"""Inputs of a calibration run: the problem (matrix ``M`` of targets x records, targets ``y``
and their optional weights, tolerances and groups), read from a scipy ``.npz`` and a targets CSV
or built as the bundled synthetic survey (:mod:`sparselens.l0.synthetic`); the initial weight;
and what the run's manifest records about the data (sizes and file hashes).
"""

from __future__ import annotations

import csv
import hashlib
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from sparselens.l0.synthetic import SyntheticSurvey, make_survey

if TYPE_CHECKING:
    from sparselens.l0.calibrate_job import CalibrateConfig

CSV_COLUMNS = ("name", "value", "weight", "tolerance", "group")


@dataclass
class CalibrationProblem:
    """A loaded calibration problem (``M``: targets x records, float64 CSR)."""

    M: sp.csr_array
    y: np.ndarray
    names: list[str]
    target_weights: np.ndarray | None = None
    tolerances: np.ndarray | None = None
    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    survey: SyntheticSurvey | None = None

    @property
    def n_targets(self) -> int:
        return int(self.M.shape[0])

    @property
    def n_records(self) -> int:
        return int(self.M.shape[1])


def _parse_float(path: Path, line: int, column: str, text: str, *, nonneg: bool = False) -> float:
    s = text.strip()
    if not s:
        raise ValueError(f"targets file {path} line {line}: missing {column}")
    try:
        v = float(s)
    except ValueError:
        raise ValueError(
            f"targets file {path} line {line}: {column} {s!r} is not a number"
        ) from None
    if not math.isfinite(v):
        raise ValueError(f"targets file {path} line {line}: {column} must be finite, got {s}")
    if nonneg and v < 0:
        raise ValueError(f"targets file {path} line {line}: {column} must be >= 0, got {s}")
    return v


def read_targets_csv(path: str | Path) -> dict[str, Any]:
    """Read a targets CSV: ``{"names", "y", "weight", "tolerance", "groups", "group_names"}``
    (absent optional columns are None). Raises with one line naming the file and the problem."""
    p = Path(path)
    try:
        f = open(p, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"targets file {p}: no such file") from None
    except OSError as e:
        raise ValueError(f"targets file {p}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"targets file {p}: not a readable CSV ({e})") from None
    if not rows:
        raise ValueError(f"targets file {p}: empty (expected a header name,value,...)")
    header = [h.strip().lower() for h in rows[0]]
    for col in header:
        if col not in CSV_COLUMNS:
            raise ValueError(
                f"targets file {p}: unknown column {col!r} (allowed: {', '.join(CSV_COLUMNS)})"
            )
    if len(set(header)) != len(header):
        raise ValueError(f"targets file {p}: duplicate column in header {','.join(header)}")
    for col in ("name", "value"):
        if col not in header:
            raise ValueError(
                f"targets file {p}: header must include {col!r} (got {','.join(header)})"
            )
    idx = {c: i for i, c in enumerate(header)}
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    if not body:
        raise ValueError(f"targets file {p}: no targets (only a header)")
    names: list[str] = []
    y, weight, tol, glabels = [], [], [], []
    for line, r in body:
        if len(r) != len(header):
            raise ValueError(
                f"targets file {p} line {line}: {len(r)} fields, header has {len(header)}"
            )
        names.append(r[idx["name"]].strip())
        y.append(_parse_float(p, line, "value", r[idx["value"]]))
        if "weight" in idx:
            weight.append(_parse_float(p, line, "weight", r[idx["weight"]], nonneg=True))
        if "tolerance" in idx:
            tol.append(_parse_float(p, line, "tolerance", r[idx["tolerance"]], nonneg=True))
        if "group" in idx:
            g = r[idx["group"]].strip()
            if not g:
                raise ValueError(f"targets file {p} line {line}: missing group")
            glabels.append(g)
    groups = group_names = None
    if glabels:
        group_names = list(dict.fromkeys(glabels))
        lookup = {g: i for i, g in enumerate(group_names)}
        groups = np.array([lookup[g] for g in glabels], dtype=np.int64)
    return {
        "names": names,
        "y": np.array(y, dtype=np.float64),
        "weight": np.array(weight) if weight else None,
        "tolerance": np.array(tol) if tol else None,
        "groups": groups,
        "group_names": group_names,
    }


def read_matrix(path: str | Path) -> sp.csr_array:
    """Load a ``scipy.sparse.save_npz`` file as a float64 CSR array (rows = targets)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"matrix file {p}: no such file")
    try:
        M = sp.load_npz(p)
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"matrix file {p}: cannot read ({e.strerror or e})") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(
            f"matrix file {p}: not a scipy sparse .npz from scipy.sparse.save_npz ({reason})"
        ) from None
    if M.ndim != 2:
        raise ValueError(f"matrix file {p}: must be 2-D (targets x records), got {M.ndim}-D")
    if M.dtype.kind not in "biuf":
        raise ValueError(f"matrix file {p}: must hold real numbers, got dtype {M.dtype}")
    M = sp.csr_array(M, dtype=np.float64)
    if not np.isfinite(M.data).all():
        bad = int(np.flatnonzero(~np.isfinite(M.data))[0])
        row = int(np.searchsorted(M.indptr, bad, side="right") - 1)
        raise ValueError(f"matrix file {p}: must be finite, found {M.data[bad]} in row {row}")
    if M.shape[1] == 0:
        raise ValueError(f"matrix file {p}: has no columns (records)")
    M.sum_duplicates()
    M.sort_indices()
    return M


def load_problem(config: CalibrateConfig) -> CalibrationProblem:
    """Load the files named in ``config`` (or build the synthetic survey) and check them."""
    if config.matrix is None or config.targets is None:
        s = make_survey(
            n_records=config.synthetic_records,
            n_targets=config.synthetic_targets,
            density=config.synthetic_density,
            seed=0,
        )
        problem = CalibrationProblem(
            M=s.M,
            y=s.y,
            names=list(s.target_names),
            groups=s.groups,
            group_names=list(s.group_names),
            survey=s,
        )
    else:
        M = read_matrix(config.matrix)
        t = read_targets_csv(config.targets)
        if M.shape[0] != len(t["y"]):
            raise ValueError(
                f"matrix file {config.matrix} has {M.shape[0]} rows but targets file "
                f"{config.targets} has {len(t['y'])} targets (matrix rows are targets)"
            )
        problem = CalibrationProblem(
            M=M,
            y=t["y"],
            names=t["names"],
            target_weights=t["weight"],
            tolerances=t["tolerance"],
            groups=t["groups"],
            group_names=t["group_names"],
        )
    if config.use_groups and problem.groups is None:
        raise ValueError(f"use_groups needs a 'group' column in targets file {config.targets}")
    if config.target_count is not None and config.target_count > problem.n_records:
        raise ValueError(
            f"target_count must be <= the number of records ({problem.n_records}), "
            f"got {config.target_count}"
        )
    if config.loss_type == "relative" and np.any(np.abs(problem.y + 1) < 1e-12):
        j = int(np.flatnonzero(np.abs(problem.y + 1) < 1e-12)[0])
        raise ValueError(
            f"target {problem.names[j]!r} is -1: loss_type 'relative' divides by y + 1; "
            "use loss_type relative_epsilon"
        )
    return problem


def initial_weight(config: CalibrateConfig, problem: CalibrationProblem) -> float:
    """``init_weight``, resolving ``'auto'`` to ``sum(y) / sum(M)``."""
    if config.init_weight != "auto":
        return float(config.init_weight)
    total = float(problem.M.sum())
    w0 = float(problem.y.sum()) / total if total != 0 else math.nan
    if not (math.isfinite(w0) and w0 > 0):
        raise ValueError(
            f"init_weight 'auto' needs sum(y) / sum(M) > 0, got {w0:g}; give a number instead"
        )
    return w0


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_info(config: CalibrateConfig, problem: CalibrationProblem) -> dict[str, Any]:
    """What the manifest records about the data: its source, sizes and, for files, their paths
    and SHA-256 digests (a resumed run checks that the files did not change)."""
    info: dict[str, Any] = {
        "n_records": problem.n_records,
        "n_targets": problem.n_targets,
        "nnz": int(problem.M.nnz),
    }
    if config.matrix is None or config.targets is None:
        return {"source": "synthetic", **info}
    return {
        "source": "files",
        "matrix": str(config.matrix),
        "matrix_sha256": file_sha256(config.matrix),
        "targets": str(config.targets),
        "targets_sha256": file_sha256(config.targets),
        **info,
    }


__all__ = [
    "CSV_COLUMNS",
    "CalibrationProblem",
    "data_info",
    "file_sha256",
    "initial_weight",
    "load_problem",
    "read_matrix",
    "read_targets_csv",
]
