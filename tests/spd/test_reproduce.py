"""Reproduce the SPD paper's TMS results with the bundled configs (slow: ~1-2 minutes each).

Targets (issue 5 §3, paper Table 1 and Figs 1-3, reference sheet §11-§12): MMCS >= 0.999,
ML2R 0.99 +- 0.02, exactly 5 non-negligible subcomponents (norm > 0.1 x max) in linear1 and
linear2 (and exactly 2 for the hidden identity), IdentityCIError 0 on linear1 (tol 0.1).
"""

from __future__ import annotations

import pytest

from sparselens.spd.config import load_config
from sparselens.spd.run import run_spd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["tms_5-2", "tms_5-2_id"])
def test_tms_recovers_the_ground_truth(name, tmp_path):
    s = run_spd(load_config(name, progress=False), tmp_path / name)
    assert s["mmcs"] >= 0.999
    assert s["ml2r"] == pytest.approx(0.99, abs=0.02)
    assert s["non_negligible"]["linear1"] == 5
    assert s["non_negligible"]["linear2"] == 5
    assert s["identity_ci_error"]["linear1"] == 0
    if name == "tms_5-2_id":
        assert s["non_negligible"]["hidden_layers.0"] == 2
        assert s["dense_ci_error"]["hidden_layers.0"] == 0
    # CI-L0 per layer near the mean number of active features (5 x 0.05)
    for layer in ("linear1", "linear2"):
        assert s["ci_l0"][layer] == pytest.approx(0.25, abs=0.1)
