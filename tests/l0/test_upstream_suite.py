"""The drop-in claim, proven by l0-python 0.6.2's own test suite run against sparselens.l0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_l0_python_suite_passes_against_sparselens():
    """All 96 upstream tests (95 + a CUDA skip) pass through the `l0` import alias."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_l0_upstream_tests.py")],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode == 3 and "could not download" in out:
        pytest.skip("the l0-python sdist is not reachable (no network to PyPI)")
    assert proc.returncode == 0, out[-4000:]
    assert "95 passed, 0 failed, 0 errors, 1 skipped" in out, out[-2000:]
