"""Tests of sparselens.spd.metrics against hand-computed cases and independent references.

Each metric is pinned to a reference computed differently (explicit rank-1 matrices, brute-force
assignments, Python loops) and to a case that fails for its known wrong variant: MMCS over rows
instead of columns, unsigned cosines, ML2R at the largest ratio instead of at the best cosine,
identity error without the Hungarian permutation (or with a greedy one), dense error without
sorting by mass, CI-L0 with ``>=`` or summed over positions.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselens.spd import metrics as M

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

# -- CI-L0 --------------------------------------------------------------------------------------


def test_ci_l0_hand_computed_strict_threshold_mean_over_positions():
    """Fails for ``>=`` (the 0.1 entry would count) and for a sum over positions (6, not 1.5)."""
    ci = torch.tensor([[[0.1, 0.5, 0.0], [1.0, 0.2, 0.11]], [[0.0, 0.0, 0.0], [0.3, 0.09, 1.0]]])
    # per position counts above 0.1: 1, 3, 0, 2 -> mean 1.5
    assert M.ci_l0(ci, threshold=0.1).item() == pytest.approx(1.5)
    assert M.ci_l0(ci, threshold=0.0).item() == pytest.approx((2 + 3 + 0 + 3) / 4)


@SETTINGS
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
        elements=st.floats(0, 1, width=32),
    ),
    st.floats(0, 1),
)
def test_ci_l0_matches_numpy(ci, thr):
    ref = float((ci > np.float32(thr)).sum(axis=-1).mean())
    assert M.ci_l0(torch.from_numpy(ci), threshold=thr).item() == pytest.approx(ref)


def test_ci_l0_rejects_bad_input():
    with pytest.raises(ValueError, match="ci_lower"):
        M.ci_l0(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="ci_lower"):
        M.ci_l0([0.5])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        M.ci_l0(torch.zeros(2, 3), threshold=float("nan"))


# -- subcomponent norms ---------------------------------------------------------------------------


def _rank1(V: torch.Tensor, U: torch.Tensor, c: int) -> torch.Tensor:
    """Subcomponent c in nn.Linear layout (d_out, d_in), formed explicitly."""
    return torch.outer(V[:, c], U[c]).T


def test_subcomponent_norms_equal_frobenius_of_explicit_rank1():
    g = torch.Generator().manual_seed(0)
    V, U = torch.randn(7, 4, generator=g), torch.randn(4, 3, generator=g)
    ref = torch.stack([_rank1(V, U, c).norm() for c in range(4)])
    torch.testing.assert_close(M.subcomponent_norms(V, U), ref)


def test_count_non_negligible_is_relative_to_max_and_strict():
    """Fails for an absolute cut (0.5 > 0.1 would count all four) and for ``>=``."""
    norms = torch.tensor([10.0, 1.0, 0.5, 2.0])
    assert M.count_non_negligible(norms, 0.1) == 2  # 10 and 2; 1.0 == 0.1 * 10 is not above
    assert M.count_non_negligible(norms * 0.01, 0.1) == 2
    assert M.count_non_negligible(norms, 0.0) == 4
    with pytest.raises(ValueError, match="frac"):
        M.count_non_negligible(norms, 1.5)


def test_count_active_counts_columns_on_for_some_input_strictly_above_tol():
    """A subcomponent counts once however many inputs it is on for, and only strictly above
    ``tol``. Catches counting entries instead of columns (4 here) and ``>=`` (3 here)."""
    ci = torch.tensor(
        [
            [1.0, 0.0, 0.10, 0.0],
            [0.9, 0.0, 0.0, 0.0],
            [0.0, 0.2, 0.0, 0.1],
        ]
    )
    assert M.count_active(ci, 0.1) == 2
    assert M.count_active(ci, 0.0) == 4
    assert M.count_active(torch.zeros(3, 5), 0.1) == 0
    with pytest.raises(ValueError, match="tol"):
        M.count_active(ci, 1.0)


# -- MMCS / ML2R --------------------------------------------------------------------------------


def _mmcs_ml2r_reference(V, U, W):
    """Paper definition with explicit rank-1 matrices and Python loops (float64)."""
    V, U, W = V.double(), U.double(), W.double()
    C, d_in = V.shape[1], V.shape[0]
    best, ratio = [], []
    for j in range(d_in):
        w = W[:, j]
        cands = []
        for c in range(C):
            col = _rank1(V, U, c)[:, j]
            n = col.norm()
            cos = float(col @ w / (n * w.norm())) if n > 0 else 0.0
            cands.append((cos, float(n / w.norm())))
        cos, r = max(cands, key=lambda t: t[0])
        best.append(cos)
        ratio.append(r)
    return float(np.mean(best)), float(np.mean(ratio))


def _mmcs_over_rows(V, U, W):
    """The wrong variant: rows of each subcomponent against rows of W."""
    vals = []
    for i in range(W.shape[0]):
        w = W[i]
        vals.append(
            max(
                float(torch.cosine_similarity(_rank1(V, U, c)[i], w, dim=0))
                for c in range(V.shape[1])
            )
        )
    return float(np.mean(vals))


def test_mmcs_columns_not_rows():
    """A per-column decomposition of a non-square W: MMCS = ML2R = 1 exactly. Fails if MMCS
    compares rows (each row of W mixes both columns, so row cosines are < 1)."""
    W = torch.tensor([[1.0, 0.2], [0.5, -1.0], [0.3, 0.8]])  # (d_out 3, d_in 2)
    V = torch.eye(2)  # (d_in, C): subcomponent c reads input c only
    U = W.T.clone()  # (C, d_out): U[c] = W[:, c]
    mmcs, ml2r = M.mmcs_ml2r(V, U, W)
    assert mmcs == pytest.approx(1.0, abs=1e-12)
    assert ml2r == pytest.approx(1.0, abs=1e-12)
    assert _mmcs_over_rows(V, U, W) < 0.95  # the wrong variant really differs here


def test_mmcs_is_signed_and_ml2r_taken_at_the_best_cosine():
    """c0 matches column 0 at half its norm; c1 is anti-aligned at 3x. MMCS 1 and ML2R 0.5.
    Fails for unsigned cosines (c1 would tie at 1) and for ML2R at the max ratio (3)."""
    W = torch.tensor([[2.0], [0.0]])  # (d_out 2, d_in 1)
    V = torch.tensor([[1.0, -1.0]])  # (d_in 1, C 2)
    U = torch.tensor([[1.0, 0.0], [6.0, 0.0]])  # c0 -> (1,0), c1 -> (-6, 0)
    assert M.mmcs_ml2r(V, U, W) == pytest.approx((1.0, 0.5))
    assert M.mmcs_ml2r(V[:, 1:], U[1:], W) == pytest.approx((-1.0, 3.0))


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_mmcs_ml2r_match_explicit_reference(d_in, d_out, C, seed):
    g = torch.Generator().manual_seed(seed)
    V, U = torch.randn(d_in, C, generator=g), torch.randn(C, d_out, generator=g)
    W = torch.randn(d_out, d_in, generator=g) + 0.1
    V[0, 0] = 0.0  # a zero subcomponent column: cosine 0, ratio 0
    got = M.mmcs_ml2r(V, U, W)
    assert got == pytest.approx(_mmcs_ml2r_reference(V, U, W), abs=1e-9)


def test_mmcs_ml2r_reject_bad_shapes_and_zero_columns():
    V, U = torch.ones(3, 2), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"W must have shape \(d_out, d_in\) = \(4, 3\)"):
        M.mmcs_ml2r(V, U, torch.ones(3, 4))
    with pytest.raises(ValueError, match="U must have shape"):
        M.mmcs_ml2r(V, torch.ones(3, 4), torch.ones(4, 3))
    W = torch.ones(4, 3)
    W[:, 1] = 0
    with pytest.raises(ValueError, match="all-zero column 1"):
        M.mmcs_ml2r(V, U, W)


# -- identity / dense CI errors -------------------------------------------------------------------


def _identity_error_bruteforce(ci: np.ndarray, tol: float) -> int:
    """Best diagonal-sum assignment by enumeration, then the same counting rule."""
    n, C = ci.shape
    best = max(itertools.permutations(range(C), n), key=lambda p: ci[range(n), list(p)].sum())
    rest = [c for c in range(C) if c not in best]
    p = ci[:, list(best) + rest]
    diag = np.zeros_like(p, dtype=bool)
    diag[range(n), range(n)] = True
    return int((p[~diag] > tol).sum() + (p[diag] < 1 - tol).sum())


def test_identity_error_zero_for_permuted_identity_only_with_permutation():
    """A permuted identity with two spare columns: 0. Fails if the permutation is skipped."""
    perm = [3, 0, 4, 1]
    ci = torch.zeros(4, 6)
    ci[torch.arange(4), torch.tensor(perm)] = 1.0
    assert M.identity_ci_error(ci) == 0
    diag = torch.zeros(4, 6, dtype=torch.bool)
    diag[range(4), range(4)] = True
    unpermuted = int((ci[~diag] > 0.1).sum() + (ci[diag] < 0.9).sum())
    assert unpermuted > 0  # what skipping the permutation would report


def test_identity_error_hungarian_beats_greedy_hand_case():
    """Greedy gives row 0 its max (col 0) and leaves row 1 with 0.0: error 3. Hungarian takes
    the better total (0.94 + 0.93): error 1 (the 0.95 left off the diagonal)."""
    ci = torch.tensor([[0.95, 0.94], [0.93, 0.0]])
    assert M.identity_ci_error(ci, method="greedy") == 3
    assert M.identity_ci_error(ci, method="hungarian") == 1
    assert M.identity_ci_error(ci) == 1


def test_clean_inputs_needs_an_own_fully_on_subcomponent_and_nothing_else():
    """Row by row: exactly one entry >= 1 - tol, every other entry <= tol, and that column off
    (<= tol) for every other input. Catches a per-row check without column exclusivity (a
    subcomponent shared by inputs 2 and 3 would count both: 4 here), ignoring small stray
    entries (row 1's 0.15: 3 here) and ``>`` instead of ``>=`` at 1 - tol (row 0's 0.9: 1)."""
    ci = torch.tensor(
        [
            [0.9, 0.0, 0.0, 0.0, 0.1],  # clean: 0.9 = 1 - tol is on, 0.1 = tol is off
            [0.0, 1.0, 0.15, 0.0, 0.0],  # a stray 0.15
            [0.0, 0.0, 0.0, 1.0, 0.0],  # column 3 is also on for row 3
            [0.0, 0.0, 0.0, 0.95, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.05],  # nothing on
        ]
    )
    assert M.clean_inputs(ci, 0.1) == 1
    assert M.clean_inputs(ci, 0.2) == 2  # the stray 0.15 is now below tol
    assert M.clean_inputs(torch.eye(4)[:, torch.tensor([2, 0, 3, 1])], 0.1) == 4
    assert M.clean_inputs(torch.zeros(3, 5), 0.1) == 0
    with pytest.raises(ValueError, match="tol"):
        M.clean_inputs(ci, 0.5)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_clean_inputs_matches_a_loop_and_bounds_the_identity_error(n, C, seed):
    """Against a plain loop over rows and columns; a CI matrix with identity error 0 has every
    input clean (catches counting columns, or rows with no entry on)."""
    rng = np.random.default_rng(seed)
    ci = rng.choice([0.0, 0.05, 0.5, 0.95, 1.0], size=(n, C))
    expected = 0
    for i in range(n):
        on = [c for c in range(C) if ci[i, c] >= 0.9]
        rest_off = all(ci[i, c] <= 0.1 for c in range(C) if c not in on)
        if len(on) == 1 and rest_off and all(ci[j, on[0]] <= 0.1 for j in range(n) if j != i):
            expected += 1
    t = torch.from_numpy(ci)
    assert M.clean_inputs(t, 0.1) == expected
    if C >= n and M.identity_ci_error(t, 0.1) == 0:
        assert expected == n


def test_identity_error_counts_spare_columns_and_tolerance():
    ci = torch.tensor([[0.85, 0.0, 0.15], [0.0, 1.0, 0.0]])
    assert M.identity_ci_error(ci, tol=0.1) == 2  # 0.85 < 0.9 on the diagonal, 0.15 > 0.1 spare
    assert M.identity_ci_error(ci, tol=0.2) == 0


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 2), st.integers(0, 2**31 - 1))
def test_identity_error_matches_bruteforce(n, spare, seed):
    rng = np.random.default_rng(seed)
    ci = rng.random((n, n + spare))
    ci[ci < 0.5] = 0.0  # sparse-ish, still tie-free among the non-zeros
    for tol in (0.1, 0.2):
        assert M.identity_ci_error(torch.from_numpy(ci), tol=tol) == _identity_error_bruteforce(
            ci, tol
        )


def test_auto_switches_to_greedy_at_500(monkeypatch):
    """auto uses Hungarian below HUNGARIAN_MAX_DIM and greedy from it on (fails if either side
    of the switch calls the other method)."""
    calls: list[tuple[int, int]] = []
    real = M.linear_sum_assignment

    def spy(cost):
        calls.append(cost.shape)
        return real(cost)

    monkeypatch.setattr(M, "linear_sum_assignment", spy)
    n = M.HUNGARIAN_MAX_DIM
    big = torch.eye(n)[:, torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    assert M.identity_ci_error(big) == 0  # greedy, still exact on a permutation
    assert calls == []
    assert M.identity_ci_error(big[: n - 1]) == 0
    assert calls == [(n - 1, n)]


def test_greedy_takes_rows_in_order():
    p, perm = M.permute_to_identity(torch.tensor([[0.95, 0.94], [0.93, 0.0]]), "greedy")
    assert perm.tolist() == [0, 1]
    assert torch.equal(p, torch.tensor([[0.95, 0.94], [0.93, 0.0]]))


def test_identity_error_rejects_bad_input():
    with pytest.raises(ValueError, match="at least as many components as inputs"):
        M.identity_ci_error(torch.ones(3, 2))
    with pytest.raises(ValueError, match="ci must be finite"):
        M.identity_ci_error(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="method must be one of"):
        M.identity_ci_error(torch.ones(1, 1), method="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol"):
        M.identity_ci_error(torch.ones(1, 1), tol=0.7)


def _dense_error_loops(ci: np.ndarray, k: int, tol: float) -> int:
    mass = ci.sum(axis=0)
    order = sorted(range(ci.shape[1]), key=lambda c: -mass[c])
    err = 0
    for rank, c in enumerate(order):
        col = ci[:, c]
        if rank < k:
            err += 0 if (col >= 1 - tol).any() else 1
        else:
            err += int((col > tol).sum())
    return err


def test_dense_error_hand_case_sorted_by_mass():
    """k = 2: the two densest columns are 2 and 0 (not the first two). Column 2 has a strong
    entry, column 0 does not (+1); the leftover column 1 has one entry above tol (+1). Fails if
    the first k columns are taken unsorted (column 1 would be 'dense' and column 2 'extra')."""
    ci = torch.tensor([[0.8, 0.3, 1.0], [0.85, 0.0, 1.0], [0.8, 0.05, 0.95]])
    assert M.dense_ci_error(ci, k=2) == 2
    unsorted = int((ci[:, 2:] > 0.1).sum()) + sum(int(not (ci[:, c] >= 0.9).any()) for c in (0, 1))
    assert unsorted != 2  # what skipping the sort would report
    assert M.dense_ci_error(ci, k=2, tol=0.2) == 1  # 0.85 counts as strong at tol 0.2
    assert M.dense_ci_error(ci, k=3) == 2  # no leftovers; columns 0 and 1 lack a strong entry


def test_dense_error_perfect_pattern_is_zero():
    ci = torch.zeros(5, 7)
    ci[:, [4, 1]] = 1.0
    assert M.dense_ci_error(ci, k=2) == 0
    assert M.dense_ci_error(ci, k=1) == 5  # the second dense column is now 5 stray entries


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_dense_error_matches_loops(n, C, seed):
    ci = np.random.default_rng(seed).random((n, C))
    for k in range(1, C + 1):
        assert M.dense_ci_error(torch.from_numpy(ci), k=k) == _dense_error_loops(ci, k, 0.1)


def test_dense_error_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be <= the number of components 3"):
        M.dense_ci_error(torch.ones(2, 3), k=4)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        M.dense_ci_error(torch.ones(2, 3), k=0)


# -- one-hot CI -----------------------------------------------------------------------------------


class _FakeComponentModel(torch.nn.Module):
    """Records the inputs it sees; CI lower = the cached input's first C columns."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def target_output(self, x, *, cache_inputs=True):
        assert cache_inputs
        self.seen.append(x)
        return x, {"a": 2 * x}

    def causal_importance(self, inputs):
        return {
            k: SimpleNamespace(lower=v[:, :2], upper=v, pre_sigmoid=v) for k, v in inputs.items()
        }


def test_one_hot_ci_feeds_scaled_one_hots_and_returns_lower():
    model = _FakeComponentModel()
    out = M.one_hot_ci(model, n_features=3, magnitude=0.75)  # type: ignore[arg-type]
    torch.testing.assert_close(model.seen[0], 0.75 * torch.eye(3))
    torch.testing.assert_close(out["a"], 1.5 * torch.eye(3)[:, :2])
    with pytest.raises(ValueError, match="n_features"):
        M.one_hot_ci(model, n_features=0)  # type: ignore[arg-type]


def test_one_hot_ci_on_a_tms_component_model_uses_each_modules_own_input():
    """linear1 sees 0.75 e_j, linear2 sees linear1's output 0.75 W[:, j]: one_hot_ci must give the
    CI of exactly those inputs (fails if every module were fed the model input)."""
    from sparselens.spd.component_model import ComponentModel
    from sparselens.spd.targets.io import load_bundled_target
    from sparselens.spd.targets.tms import tms_decomposition

    target = load_bundled_target("tms_5-2")
    torch.manual_seed(0)
    model = ComponentModel(target, tms_decomposition(target.cfg, 7))
    out = M.one_hot_ci(model, 5)
    assert set(out) == {"linear1", "linear2"}
    W = target.linear1.weight.detach()
    x = 0.75 * torch.eye(5)
    with torch.no_grad():
        ref = model.causal_importance({"linear1": x, "linear2": x @ W.T})
    for name in out:
        assert out[name].shape == (5, 7)
        torch.testing.assert_close(out[name], ref[name].lower)
        assert out[name].min() >= 0 and out[name].max() <= 1


# -- unit alignment and unit-gated CI -------------------------------------------------------------


def test_unit_alignment_hand_case_uses_squared_entries():
    """Shares are ``max_i V_ic^2 / sum_i V_ic^2``. Catches shares of |V| (0.8/1.4 = 0.57 for the
    third column, not 0.64) and the argmax taken over the wrong axis."""
    V = torch.tensor([[1.0, 0.0, 0.6], [0.0, -2.0, 0.8]])
    share, unit = M.unit_alignment(V)
    torch.testing.assert_close(share, torch.tensor([1.0, 1.0, 0.64]))
    assert unit.tolist() == [0, 1, 1]
    share0, _ = M.unit_alignment(torch.zeros(3, 2))
    assert share0.tolist() == [0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_unit_alignment_ignores_unit_order_and_column_scale(d_in, C, seed):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(d_in, C, generator=g)
    perm = torch.randperm(d_in, generator=g)
    scale = torch.rand(C, generator=g) * 10 + 0.1
    s, u = M.unit_alignment(V)
    s2, u2 = M.unit_alignment(V[perm] * scale)
    torch.testing.assert_close(s2, s)
    assert torch.equal(perm[u2], u)
    assert bool(((s > 1 / d_in - 1e-6) & (s <= 1 + 1e-6)).all())


def test_unit_gated_ci_hand_case():
    """Three positions, two ReLU units, three subcomponents (two read one unit each, the third a
    mix). Counts pairs (position, aligned subcomponent) by whether the subcomponent's unit fires.
    Catches 'fires' read from the subcomponent's own act (x V_c) instead of its unit, and the
    unaligned subcomponent counted."""
    V = torch.tensor([[2.0, 0.0, 0.6], [0.0, -1.0, 0.8]])  # c1 reads unit 1 with a minus sign
    acts = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, 0.4]])
    ci = torch.tensor([[0.9, 0.5, 1.0], [0.05, 0.0, 1.0], [0.0, 1.0, 0.0]])
    r = M.unit_gated_ci(ci, acts, V)
    # firing pairs: (0, c0) on, (1, c1) off, (2, c0) off, (2, c1) on -> 2 / 4
    # silent pairs: (0, c1) on, (1, c0) off -> 1 / 2
    # firing activation with CI on: (0.5 + 0.4) / (0.5 + 0.3 + 0.2 + 0.4)
    assert r[:4] == (2, 2, 0.5, 0.5)
    assert r.firing_mass_on == pytest.approx(0.9 / 1.4)
    keep = torch.tensor([True, False, True])
    r2 = M.unit_gated_ci(ci, acts, V, keep=keep)
    assert (r2.aligned, r2.on_when_firing, r2.on_when_silent) == (1, 0.5, 0.0)
    assert r2.firing_mass_on == pytest.approx(0.5 / 0.7)


def test_unit_gated_ci_of_a_rotated_basis_has_no_aligned_subcomponents():
    """A Hadamard basis spreads every subcomponent evenly over the units (share 1/4)."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    V = torch.kron(h2, h2)
    r = M.unit_gated_ci(torch.ones(3, 4), torch.ones(3, 4), V, align=0.3)
    assert r.aligned == 0 and math.isnan(r.on_when_firing) and math.isnan(r.on_when_silent)
    assert math.isnan(r.firing_mass_on)


def test_unit_gated_ci_rejects_bad_input():
    V = torch.eye(2)
    with pytest.raises(ValueError, match="ci"):
        M.unit_gated_ci(torch.ones(3, 3), torch.ones(3, 2), V)
    with pytest.raises(ValueError, match="unit_acts"):
        M.unit_gated_ci(torch.ones(3, 2), torch.ones(4, 2), V)
    with pytest.raises(ValueError, match="align"):
        M.unit_gated_ci(torch.ones(3, 2), torch.ones(3, 2), V, align=0.0)
    with pytest.raises(ValueError, match="keep"):
        M.unit_gated_ci(torch.ones(3, 2), torch.ones(3, 2), V, keep=torch.ones(3, dtype=torch.bool))


def test_ci_per_unit_takes_the_largest_ci_of_the_aligned_readers():
    """Unit 0 is read by c0 and c2 (max taken), unit 1 by c1 only if kept, unit 2 by nobody (0).
    Catches a sum instead of the max, and unaligned readers counted."""
    V = torch.tensor([[1.0, 0.0, 3.0, 0.5], [0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.5]])
    ci = torch.tensor([[0.2, 0.7, 0.6, 1.0], [0.9, 0.1, 0.3, 1.0]])
    out = M.ci_per_unit(ci, V)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.7, 0.0], [0.9, 0.1, 0.0]]))
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(
        M.ci_per_unit(ci, V, keep=keep), torch.tensor([[0.6, 0.0, 0.0], [0.9, 0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="ci"):
        M.ci_per_unit(torch.ones(2, 3), V)


# -- ResidMLP neuron contributions (paper Figs 7 and 10) ------------------------------------------


def _contributions_reference(W_E, w_in, w_out, V, U, w_out_spd):
    """The paper's definitions with explicit loops (float64): the target's contribution of
    neuron n to feature i is ``(W_E[i] . W_in[n, :]) * (W_E[i] . W_out[:, n])``; a W_in
    subcomponent c's is ``(W_E[i] . V[:, c]) U[c, n] * (W_E[i] . W_out_spd[:, n])``, and each
    feature is shown with the subcomponent of the largest contribution to any neuron."""
    W_E, w_in, w_out, V, U, w_out_spd = (t.double() for t in (W_E, w_in, w_out, V, U, w_out_spd))
    n_f, d_mlp, C = W_E.shape[0], w_in.shape[0], V.shape[1]
    target = torch.zeros(n_f, d_mlp, dtype=torch.float64)
    spd = torch.zeros(n_f, d_mlp, dtype=torch.float64)
    best = []
    for i in range(n_f):
        for n in range(d_mlp):
            target[i, n] = (W_E[i] @ w_in[n]) * (W_E[i] @ w_out[:, n])
        scores = []
        for c in range(C):
            row = [(W_E[i] @ V[:, c]) * U[c, n] * (W_E[i] @ w_out_spd[:, n]) for n in range(d_mlp)]
            scores.append((max(float(v) for v in row), row))
        k = max(range(C), key=lambda c: scores[c][0])
        best.append(k)
        spd[i] = torch.stack(scores[k][1])
    return target, spd, best


def test_neuron_contributions_match_a_loop_reference():
    """Target and best-subcomponent contributions, the chosen subcomponents, the slope through
    the origin and R^2 about y = x against loops. Catches using the target's W_out on the SPD
    side (the paper uses the components' W_out), summing all W_in subcomponents instead of
    taking the best one (that is the target's contribution again), and choosing it by |V_c|."""
    g = torch.Generator().manual_seed(0)
    n_f, d_embed, d_mlp, C = 6, 9, 4, 8
    W_E = torch.randn(n_f, d_embed, generator=g)
    w_in, w_out = torch.randn(d_mlp, d_embed, generator=g), torch.randn(d_embed, d_mlp, generator=g)
    V, U = torch.randn(d_embed, C, generator=g), torch.randn(C, d_mlp, generator=g)
    w_out_spd = w_out + 0.3 * torch.randn(d_embed, d_mlp, generator=g)
    r = M.neuron_contributions(W_E, w_in, w_out, V, U, w_out_spd)
    target, spd, best = _contributions_reference(W_E, w_in, w_out, V, U, w_out_spd)
    torch.testing.assert_close(r.target.double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.spd.double(), spd, rtol=1e-5, atol=1e-5)
    assert r.component.tolist() == best
    slope = float((spd * target).sum() / (target**2).sum())
    r2 = float(1 - ((spd - target) ** 2).sum() / (target**2).sum())
    assert r.slope == pytest.approx(slope, rel=1e-5)
    assert r.r2 == pytest.approx(r2, rel=1e-5, abs=1e-6)


def test_per_feature_decomposition_reproduces_the_target_contributions():
    """W_in = A W_E split into one subcomponent per feature (V_i = W_E[i], U_i = A[:, i]) with
    orthonormal embedding rows and W_out_spd = W_out: every contribution is the target's (slope
    1, R^2 1), and feature i is shown with subcomponent i."""
    g = torch.Generator().manual_seed(1)
    n_f, d_embed, d_mlp = 5, 12, 3
    W_E = torch.linalg.qr(torch.randn(d_embed, n_f, generator=g))[0].T.contiguous()
    A = torch.rand(d_mlp, n_f, generator=g) + 0.1
    w_in = A @ W_E
    w_out = W_E.T @ (torch.rand(n_f, d_mlp, generator=g) + 0.1)
    V, U = W_E.T.contiguous(), A.T.contiguous()
    r = M.neuron_contributions(W_E, w_in, w_out, V, U, w_out)
    torch.testing.assert_close(r.spd, r.target, rtol=1e-4, atol=1e-6)
    assert r.component.tolist() == list(range(n_f))
    assert r.slope == pytest.approx(1.0, abs=1e-4) and r.r2 == pytest.approx(1.0, abs=1e-4)


def test_contribution_slope_and_r2_by_hand():
    """A decomposition whose subcomponents carry half of each feature's weights: every
    contribution is half the target's, so the slope through the origin is 0.5 and R^2 about
    y = x is 1 - sum (t/2)^2 / sum t^2 = 0.75. Catches the squared correlation (1.0 for any
    exact proportionality), the centred 1 - SSE / sum (t - mean t)^2 (below 0.75: every t > 0
    here) and the slope of target on spd (2)."""
    g = torch.Generator().manual_seed(2)
    n_f, d_embed, d_mlp = 4, 10, 3
    W_E = torch.linalg.qr(torch.randn(d_embed, n_f, generator=g))[0].T.contiguous()
    A = torch.rand(d_mlp, n_f, generator=g) + 0.1
    w_out = W_E.T @ (torch.rand(n_f, d_mlp, generator=g) + 0.1)
    r = M.neuron_contributions(W_E, A @ W_E, w_out, W_E.T.contiguous(), 0.5 * A.T, w_out)
    assert r.slope == pytest.approx(0.5, abs=1e-5)
    assert r.r2 == pytest.approx(0.75, abs=1e-5)


def test_neuron_contributions_reject_mismatched_shapes():
    W_E = torch.randn(4, 6)
    with pytest.raises(ValueError, match="w_in"):
        M.neuron_contributions(W_E, torch.randn(3, 5), torch.randn(6, 3), torch.randn(6, 2),
                               torch.randn(2, 3), torch.randn(6, 3))  # fmt: skip
    with pytest.raises(ValueError, match="U"):
        M.neuron_contributions(W_E, torch.randn(3, 6), torch.randn(6, 3), torch.randn(6, 2),
                               torch.randn(2, 4), torch.randn(6, 3))  # fmt: skip
