"""scripts/spd_sparsity_sweep.py: its grid configs and its Pareto front."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparselens.spd.config import bundled_config_path
from sparselens.train.config import load_yaml_mapping

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "spd_sparsity_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("spd_sparsity_sweep", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dominated(p, q) -> bool:
    """q dominates p (minimising both)."""
    return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])


def test_pareto_front_known_points(sweep) -> None:
    """Catches a front that keeps dominated points or sorts by the wrong coordinate."""
    pts = [(1.0, 5.0), (2.0, 3.0), (2.5, 4.0), (3.0, 1.0), (0.5, 9.0), (math.nan, 0.0)]
    assert sweep.pareto_front(pts) == [4, 0, 1, 3]


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=1, max_size=30))
def test_pareto_front_is_exactly_the_non_dominated_set(sweep, pts) -> None:
    """Property: every kept point is non-dominated, and every non-dominated point is kept (up to
    exact duplicates, where the first is kept)."""
    front = sweep.pareto_front(pts)
    for i in front:
        assert not any(_dominated(pts[i], q) for q in pts)
    kept = {pts[i] for i in front}
    for p in pts:
        if not any(_dominated(p, q) for q in pts):
            assert p in kept


def test_point_config_smooth_l0_with_frequency(sweep) -> None:
    """Smooth-L0 points anneal gamma 1 -> 0.1 with normalize_at_one and drop p; the frequency term
    uses frequency_coeff = coeff and a' = positions per batch. Catches a grid that silently
    keeps L_p (the bundled kind) or leaves the frequency term off."""
    base = load_yaml_mapping(bundled_config_path("tms_5-2"))
    cfg = sweep.point_config(base, "smooth_l0", 1e-2, True, 4096, 100, {})
    imp = cfg.losses.importance_minimality
    assert imp.kind == "smooth_l0" and imp.coeff == 1e-2 and imp.normalize_at_one
    assert imp.gamma.at(0.0) == pytest.approx(1.0) and imp.gamma.at(1.0) == pytest.approx(0.1)
    assert imp.frequency_coeff == 1e-2 and imp.reference_token_count == 4096
    assert cfg.steps == 100 and cfg.threads == 1
    lp = sweep.point_config(base, "lp", 3e-3, False, 4096, 100, {}).losses.importance_minimality
    assert lp.kind == "lp" and lp.frequency_coeff == 0.0 and lp.p.at(0.0) == 1.0
    with pytest.raises(ValueError, match="kind must be one of lp, smooth_l0"):
        sweep.point_config(base, "l1", 1e-3, False, 4096, 100, {})
