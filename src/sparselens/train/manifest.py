"""What a run records about where it ran: versions, git commit, command line, hardware."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("sparselens", "torch", "numpy", "scipy", "pydantic", "safetensors", "matplotlib")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with microseconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None when missing) plus the Python version."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import torch

    out["torch"] = torch.__version__
    return out


def git_info(path: str | Path | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package's
    source), or None when it is not in a git checkout or git is unavailable."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        dirty: bool | None = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def hardware_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads and the visible CUDA devices."""
    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    }
    return info


def build_manifest(
    *,
    kind: str,
    seed: int | None,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh manifest for a run that starts now (``status: "running"``)."""
    return {
        "kind": kind,
        "status": "running",
        "seed": seed,
        "command": list(sys.argv if command is None else command),
        "cwd": os.getcwd(),
        "start_time": utc_now(),
        "end_time": None,
        "versions": package_versions(),
        "git": git_info(),
        "hardware": hardware_info(),
        "resumes": [],
        **(extra or {}),
    }


__all__ = ["build_manifest", "git_info", "hardware_info", "package_versions", "utc_now"]
