"""The README is the user's door: its test command is what CI runs, and torch stays pinned."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [
        line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")
    ]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1, ci
    assert ci[0] in readme, (ci, readme)
    assert "pytest" in ci[0]


def test_every_install_pins_torch_exactly():
    """An unpinned torch pulls gigabytes of CUDA packages: every install names torch==2.13.0."""
    for cmd in _commands((ROOT / "README.md").read_text()):
        assert "torch==2.13.0" in cmd, cmd
    deps = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch==2\.13\.0"', deps)
