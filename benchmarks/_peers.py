"""What every side-by-side benchmark shares: a peer library in its own venv (torch pinned to
2.13.0), each measured run in a fresh worker process, progress lines on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TORCH_PIN = "torch==2.13.0"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def probe(python: Path, code: str) -> dict[str, str] | None:
    """Run ``code`` (which prints one JSON object last) in ``python``; None if it fails."""
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        err = (getattr(e, "stderr", "") or str(e)).strip()
        log(f"{python}: probe failed: {err.splitlines()[-1] if err else e}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_venv(
    venv: Path,
    name: str,
    installs: Sequence[Sequence[str]],
    check: Callable[[Path], dict[str, str] | None],
) -> tuple[Path, dict[str, str]]:
    """Reuse or create ``venv`` (pip ``installs`` in order; each should repeat the torch pin so
    pip cannot swap it); return its interpreter and ``check``'s version report."""
    python = venv_python(venv)
    found = check(python) if python.exists() else None
    if found is None:
        log(f"creating the {name} venv in {venv} (once) ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in installs:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
        found = check(python)
        if found is None:
            raise RuntimeError(f"{python}: {name} is not importable after installation")
    return python, found


def run_worker(
    python: Path, worker: Path, library: str, args: Sequence[str], threads: int, out: Path
) -> dict[str, Any]:
    """One measured run in a fresh process; the worker writes JSON to ``out``. Returns it with
    the process wall time added as ``process_s``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(worker), "--library", library, *args, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{library} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result
