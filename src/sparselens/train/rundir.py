"""A run is a directory::

    <run>/config.yaml      the resolved config
    <run>/manifest.json    seed, versions, git commit, command, hardware, start/end, status
    <run>/metrics.jsonl    one JSON object per logged step
    <run>/checkpoints/     atomic checkpoints (safetensors + json, or .pt)
    <run>/plots/*.png
    <run>/report.md

Every file is written atomically. Final outputs go through :meth:`RunDir.staging`: they are
written into a hidden staging folder and moved into place only when all of them are complete,
so a killed run leaves its checkpoints, config, manifest and metrics, but no partial results.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sparselens.train import checkpoint as ckpt
from sparselens.train.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    remove_temp_files,
)
from sparselens.train.config import check_resume_config, config_to_yaml_dict, load_yaml_mapping
from sparselens.train.manifest import build_manifest, utc_now

logger = logging.getLogger(__name__)

STAGING = ".staging"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file ([] if there is none); a torn line (a kill, or a
    run still writing) is skipped. Reading never changes the run directory."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


class RunDir:
    """Create (``resume=False``) or reopen (``resume=True``) a run directory.

    A new run refuses a directory that already holds files, so results are never mixed; a
    resumed run requires the directory and removes leftovers of the interrupted process
    (hidden temporary files and the staging folder).
    """

    CONFIG = "config.yaml"
    MANIFEST = "manifest.json"
    METRICS = "metrics.jsonl"
    REPORT = "report.md"

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.path = Path(path).resolve()
        if resume:
            if not (self.path / self.CONFIG).is_file():
                raise FileNotFoundError(
                    f"cannot resume {self.path}: no {self.CONFIG} there (not a run directory)"
                )
            self.cleanup()
        else:
            if self.path.exists() and not self.path.is_dir():
                raise FileExistsError(f"run directory {self.path} is a file")
            if self.path.is_dir() and any(self.path.iterdir()):
                raise FileExistsError(
                    f"run directory {self.path} already exists and is not empty; "
                    "pass --resume to continue it or choose another --out"
                )
            self.path.mkdir(parents=True, exist_ok=True)
        self.resumed = resume

    # -- layout ---------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        """``<run>/checkpoints`` (created on first use)."""
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        """``<run>/plots``."""
        return self.path / "plots"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    def cleanup(self) -> None:
        """Remove temporary files and the staging folder an interrupted process left behind."""
        for p in remove_temp_files(self.path):
            logger.debug("removed leftover temporary file %s", p)
        shutil.rmtree(self.path / STAGING, ignore_errors=True)

    # -- config and manifest --------------------------------------------------------------------
    def write_config(self, config: BaseModel | Mapping[str, Any]) -> Path:
        """Write the resolved config to ``config.yaml``."""
        data = config_to_yaml_dict(config) if isinstance(config, BaseModel) else dict(config)
        return atomic_write_yaml(self.config_path, data)

    def read_config(self) -> dict[str, Any]:
        """The saved ``config.yaml`` as a mapping."""
        return load_yaml_mapping(self.config_path)

    def read_manifest(self) -> dict[str, Any]:
        """The saved ``manifest.json`` (``{}`` when there is none yet)."""
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def start(
        self,
        *,
        kind: str,
        seed: int | None,
        command: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``manifest.json`` for a new run, or record a resume in the existing one."""
        fresh = build_manifest(kind=kind, seed=seed, command=command, extra=extra)
        old = self.read_manifest() if self.resumed else {}
        if old:
            old.setdefault("resumes", []).append(
                {
                    "time": fresh["start_time"],
                    "command": fresh["command"],
                    "previous_status": old.get("status"),
                    "versions": fresh["versions"],
                    "git": fresh["git"],
                    "hardware": fresh["hardware"],
                }
            )
            old.update({"status": "running", "end_time": None})
            manifest = old
        else:
            manifest = fresh
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``manifest.json``."""
        manifest = self.read_manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def finish(self, status: str = "completed", **fields: Any) -> dict[str, Any]:
        """Record the end time and final ``status`` (completed, interrupted, failed)."""
        return self.update_manifest(status=status, end_time=utc_now(), **fields)

    # -- metrics --------------------------------------------------------------------------------
    def append_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append one JSON line per record to ``metrics.jsonl`` in a single write."""
        text = "".join(json.dumps(dict(r)) + "\n" for r in records)
        if not text:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically (used on resume: back to the checkpoint)."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(dict(r)) + "\n" for r in records))

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` (a torn last line, from a kill, is skipped)."""
        return read_metrics(self.metrics_path)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(
        self,
        state: Any,
        step: int,
        *,
        meta: dict[str, Any] | None = None,
        prefix: str = "ckpt",
        fmt: str = "safetensors",
        keep_last: int | None = 2,
    ) -> Path:
        """Save ``state`` for ``step`` atomically and keep the newest ``keep_last`` (None: all)."""
        path = ckpt.save_checkpoint(
            self.checkpoints, state, step, meta=meta, prefix=prefix, fmt=fmt
        )
        if keep_last is not None:
            ckpt.prune_checkpoints(self.checkpoints, keep_last, prefix)
        logger.debug("checkpoint %s", path.name)
        return path

    def latest_checkpoint(self, prefix: str | None = None) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = ckpt.list_checkpoints(self.checkpoints, prefix)
        return found[-1][1] if found else None

    def load_checkpoint(self, path: str | Path | None = None) -> tuple[Any, int, dict[str, Any]]:
        """``(state, step, meta)`` of ``path`` (default: the newest checkpoint)."""
        path = path or self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.checkpoints}")
        return ckpt.load_checkpoint(path)

    # -- final outputs --------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, last: Iterable[str] = (REPORT,)) -> Iterator[Path]:
        """Yield an empty hidden folder; on a clean exit move its files into the run directory.

        Paths keep their place relative to the folder (``plots/a.png`` → ``<run>/plots/a.png``).
        Files named in ``last`` (default ``report.md``) move last, so they mark completion. If
        the body raises (or the process is interrupted) the folder is deleted and nothing moves.
        """
        stage = self.path / STAGING
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            yield stage
            files = sorted(p for p in stage.rglob("*") if p.is_file())
            tail = {str(n) for n in last}
            rel = [p.relative_to(stage) for p in files]
            order = [r for r in rel if str(r) not in tail] + [r for r in rel if str(r) in tail]
            for r in order:
                dest = self.path / r
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / r, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def write_report(self, text: str) -> Path:
        """Write ``report.md`` atomically (outside :meth:`staging`)."""
        return atomic_write_text(self.report_path, text)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


__all__ = ["STAGING", "RunDir", "read_metrics", "save_figure"]


def check_resumable(
    run_path: Path, config: BaseModel, resumable: frozenset[str]
) -> dict[str, Any] | None:
    """Before resuming ``run_path``: its saved config must equal ``config`` (but for the
    ``resumable`` fields); return the saved ``summary.json`` if the run already completed."""
    cfg_file = run_path / RunDir.CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"cannot resume {run_path}: no {RunDir.CONFIG} there")
    saved = type(config).model_validate(load_yaml_mapping(cfg_file))
    check_resume_config(saved, config, resumable)
    summary = run_path / "summary.json"
    if summary.is_file() and (run_path / RunDir.REPORT).is_file():
        logger.info("%s is already complete", run_path)
        return dict(json.loads(summary.read_text(encoding="utf-8")))
    return None
