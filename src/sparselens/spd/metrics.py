"""Evaluation metrics of a decomposition (Bushnaq et al. 2025, arXiv 2506.20790, §4 and App. A).

Components follow the :class:`~sparselens.spd.components.LinearComponents` layout: ``V`` is
``(d_in, C)``, ``U`` is ``(C, d_out)`` and subcomponent ``c`` is the rank-1 matrix
``W_c = (V[:, c] U[c, :])^T`` of shape ``(d_out, d_in)``; its column ``j`` is ``U[c, :] V[j, c]``.

* :func:`ci_l0`: mean over positions of the number of components with CI above a threshold.
* :func:`mmcs_ml2r`: mean max cosine similarity and mean L2 ratio of subcomponent columns against
  the target's columns (paper §4.1: ``MMCS = mean_j max_c cos(U_c V_{c,j}, W_{:,j})``,
  ``ML2R = mean_j ||U_{c*} V_{c*,j}|| / ||W_{:,j}||`` at the argmax ``c*``).
* :func:`identity_ci_error` / :func:`dense_ci_error`: distance of a one-hot CI matrix from the
  expected identity (one component per feature, up to a permutation found by Hungarian matching)
  or dense (``k`` components on for every input) pattern, counted in entries off by more than
  ``tol``; perfect = 0.
* :func:`one_hot_ci`: the lower-leaky CI of every decomposed module on inputs ``magnitude * e_j``.
* :func:`unit_alignment` / :func:`unit_gated_ci`: whether subcomponents read single input units
  (e.g. one ReLU neuron each for a ResidMLP ``mlp_out``) and whether their CI is on exactly when
  that unit fires -- the measured form of "which basis did ``W_out`` split into".
* :func:`count_active`: subcomponents with CI above ``tol`` on some one-hot input;
  :func:`clean_inputs`: inputs with a fully-on subcomponent of their own and nothing else on.
* :func:`neuron_contributions`: ResidMLP neuron contributions of the target against each
  feature's best ``W_in`` subcomponent (paper Figs 7 and 10).

All run on eval only; they are vectorised and return host numbers where the name says so.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sparselens.core.checks import check_choice, check_finite, check_int, check_number

if TYPE_CHECKING:
    from sparselens.spd.component_model import ComponentModel

HUNGARIAN_MAX_DIM = 500
"""``identity_ci_error(method="auto")`` matches greedily once ``min(ci.shape)`` reaches this."""


def _matrix(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def ci_l0(ci_lower: Tensor, threshold: float = 0.1) -> Tensor:
    """Mean over positions of ``#{c : ci_lower[..., c] > threshold}`` (a 0-d float tensor).

    ``ci_lower`` has shape ``(..., C)``; every leading axis indexes a position.
    """
    if not isinstance(ci_lower, Tensor):
        raise TypeError(f"ci_lower must be a torch.Tensor, got {type(ci_lower).__name__}")
    if ci_lower.dim() < 1 or ci_lower.shape[-1] < 1 or ci_lower.numel() == 0:
        raise ValueError(
            f"ci_lower must have shape (..., C) with C >= 1 and at least one position, "
            f"got {tuple(ci_lower.shape)}"
        )
    thr = check_number("threshold", threshold)
    return (ci_lower > thr).sum(dim=-1, dtype=torch.float32).mean()


def subcomponent_norms(V: Tensor, U: Tensor) -> Tensor:
    """Frobenius norm of each rank-1 subcomponent ``V[:, c] U[c, :]``: ``||V_c|| ||U_c||``, (C,)."""
    _check_vu(V, U)
    return V.detach().norm(dim=0) * U.detach().norm(dim=1)


def count_non_negligible(norms: Tensor, frac: float = 0.1) -> int:
    """Number of entries of ``norms`` (C,) strictly above ``frac`` times the largest one."""
    return int(non_negligible(norms, frac).sum())


def non_negligible(norms: Tensor, frac: float = 0.1) -> Tensor:
    """(C,) bool: the entries of ``norms`` strictly above ``frac`` times the largest one."""
    if not isinstance(norms, Tensor) or norms.dim() != 1 or norms.numel() == 0:
        raise ValueError("norms must be a non-empty 1-d tensor")
    check_finite("norms", norms)
    f = check_number("frac", frac, ge=0.0, le=1.0)
    n = norms.detach()
    return n > f * n.max()


def _check_vu(V: Tensor, U: Tensor) -> tuple[int, int, int]:
    _matrix("V", V)
    _matrix("U", U)
    d_in, C = V.shape
    if U.shape[0] != C:
        raise ValueError(
            f"U must have shape (C, d_out) with C = V.shape[1] = {C}, got {tuple(U.shape)}"
        )
    return d_in, C, U.shape[1]


def column_cosines(V: Tensor, U: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine and norm ratio of every subcomponent column against every target column.

    Returns ``(cos, ratio)``, both ``(C, d_in)``: ``cos[c, j] = cos(U_c V_{c,j}, W_{:,j})`` and
    ``ratio[c, j] = ||U_c V_{c,j}|| / ||W_{:,j}||``; a zero subcomponent column has cosine 0.
    Column ``j`` of the rank-1 ``W_c`` is ``V[j, c] U[c, :]``, so its cosine with ``W_{:,j}`` is
    ``sign(V[j, c]) cos(U_c, W_{:,j})`` — computed without materialising ``(C, d_in, d_out)``.
    """
    d_in, _, d_out = _check_vu(V, U)
    _matrix("W", W)
    if tuple(W.shape) != (d_out, d_in):
        raise ValueError(
            f"W must have shape (d_out, d_in) = ({d_out}, {d_in}) to match V and U, "
            f"got {tuple(W.shape)}"
        )
    V, U, W = V.detach().double(), U.detach().double(), W.detach().double()
    w_norm = W.norm(dim=0)  # (d_in,)
    if bool((w_norm == 0).any()):
        j = int((w_norm == 0).nonzero()[0, 0])
        raise ValueError(f"W has an all-zero column {j}; MMCS/ML2R are undefined for it")
    u_norm = U.norm(dim=1)  # (C,)
    dots = V.T * (U @ W)  # (C, d_in): V[j, c] <U_c, W_:j>
    col_norm = V.T.abs() * u_norm[:, None]  # (C, d_in): ||V[j, c] U_c||
    cos = torch.where(col_norm > 0, dots / (col_norm * w_norm).clamp_min(1e-300), 0.0)
    ratio = col_norm / w_norm
    return cos, ratio


def mmcs_ml2r(V: Tensor, U: Tensor, W: Tensor) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio (paper §4.1) against ``W``'s columns.

    ``W`` is the target matrix in ``nn.Linear`` layout ``(d_out, d_in)`` (for TMS ``W_in =
    linear1.weight``). For each input column ``j``: ``c* = argmax_c cos(U_c V_{c,j}, W_{:,j})``;
    MMCS is the mean of the max cosine, ML2R the mean of ``||U_{c*} V_{c*,j}|| / ||W_{:,j}||``.
    """
    cos, ratio = column_cosines(V, U, W)
    best, arg = cos.max(dim=0)
    ml2r = ratio.gather(0, arg[None, :])[0]
    return float(best.mean()), float(ml2r.mean())


def _check_ci_matrix(ci: Tensor) -> Tensor:
    _matrix("ci", ci)
    check_finite("ci", ci)
    return ci.detach()


def permute_to_identity(
    ci: Tensor, method: Literal["auto", "hungarian", "greedy"] = "auto"
) -> tuple[Tensor, Tensor]:
    """Permute the columns of ``ci`` (n_inputs, C) so that large values sit on the diagonal.

    ``hungarian`` maximises the diagonal sum of the ``min(n, C)`` square block
    (``scipy.optimize.linear_sum_assignment``); ``greedy`` gives row ``i`` its largest unused
    column in row order; ``auto`` is Hungarian below :data:`HUNGARIAN_MAX_DIM`. Unassigned columns
    follow in their original order. Returns ``(permuted ci, permutation (C,))``.
    """
    ci = _check_ci_matrix(ci)
    check_choice("method", method, ("auto", "hungarian", "greedy"))
    n, C = ci.shape
    size = min(n, C)
    if method == "hungarian" or (method == "auto" and size < HUNGARIAN_MAX_DIM):
        _, cols = linear_sum_assignment(-ci[:size].double().cpu().numpy())
        chosen = torch.as_tensor(cols, dtype=torch.long)
    else:
        work = ci[:size].double().clone()
        chosen = torch.empty(size, dtype=torch.long)
        for i in range(size):
            c = int(work[i].argmax())
            chosen[i] = c
            work[:, c] = -torch.inf
    used = torch.zeros(C, dtype=torch.bool)
    used[chosen] = True
    perm = torch.cat([chosen, torch.arange(C)[~used]]).to(ci.device)
    return ci[:, perm], perm


def identity_ci_error(
    ci: Tensor, tol: float = 0.1, method: Literal["auto", "hungarian", "greedy"] = "auto"
) -> int:
    """Entries of the one-hot CI matrix ``ci`` (n_inputs, C >= n_inputs) off the identity pattern.

    After :func:`permute_to_identity`: ``#{off-diagonal entries > tol} + #{diagonal entries <
    1 - tol}``. Perfect (one component per input, fully on, nothing else on) = 0.
    """
    ci = _check_ci_matrix(ci)
    t = check_number("tol", tol, ge=0.0, lt=0.5)
    n, C = ci.shape
    if C < n:
        raise ValueError(f"ci must have at least as many components as inputs, got shape {(n, C)}")
    p, _ = permute_to_identity(ci, method)
    diag = torch.zeros_like(p, dtype=torch.bool)
    diag[torch.arange(n), torch.arange(n)] = True
    off = int((p[~diag] > t).sum())
    on = int((p[diag] < 1.0 - t).sum())
    return off + on


def count_active(ci: Tensor, tol: float = 0.1) -> int:
    """Subcomponents causally important (CI > ``tol``) on at least one input of the one-hot CI
    matrix ``ci`` (n_inputs, C): those carrying the layer's computation, whatever their norm
    (with a delta component an unused subcomponent keeps its initial norm)."""
    ci = _check_ci_matrix(ci)
    t = check_number("tol", tol, ge=0.0, lt=1.0)
    return int((ci > t).any(dim=0).sum())


def clean_inputs(ci: Tensor, tol: float = 0.1) -> int:
    """Inputs of the one-hot CI matrix ``ci`` (n_inputs, C) with a subcomponent of their own:
    exactly one entry ``>= 1 - tol`` in the row, every other entry ``<= tol``, and that
    subcomponent ``<= tol`` on every other input. Where :func:`identity_ci_error` counts wrong
    entries, this counts the inputs the identity pattern already holds for (all of them at error
    0); a subcomponent shared by several inputs makes none of them clean."""
    ci = _check_ci_matrix(ci)
    t = check_number("tol", tol, ge=0.0, lt=0.5)
    strong = ci >= 1.0 - t
    on = ci > t
    own = strong.sum(dim=1) == 1
    only = on.sum(dim=1) == 1  # the strong entry is the row's only one above tol
    col = strong.to(torch.int64).argmax(dim=1)
    alone = on.sum(dim=0)[col] == 1  # ... and its column is on for no other input
    return int((own & only & alone).sum())


def dense_ci_error(ci: Tensor, k: int, tol: float = 0.1, min_entries: int = 1) -> int:
    """Entries of the one-hot CI matrix ``ci`` (n_inputs, C >= k) off the dense-``k`` pattern.

    Columns sorted by total CI mass (densest first). Error = the number of strong entries
    (``>= 1 - tol``) missing below ``min_entries`` in each of the first ``k`` columns, plus every
    entry ``> tol`` in the remaining columns. Perfect (``k`` components carry all inputs) = 0.
    """
    ci = _check_ci_matrix(ci)
    kk = check_int("k", k, ge=1)
    m = check_int("min_entries", min_entries, ge=1)
    t = check_number("tol", tol, ge=0.0, lt=0.5)
    if ci.shape[1] < kk:
        raise ValueError(f"k must be <= the number of components {ci.shape[1]}, got {kk}")
    order = torch.argsort(ci.sum(dim=0), descending=True, stable=True)
    s = ci[:, order]
    strong = (s[:, :kk] >= 1.0 - t).sum(dim=0)
    missing = int((m - strong).clamp_min(0).sum())
    extra = int((s[:, kk:] > t).sum())
    return missing + extra


@torch.no_grad()
def one_hot_ci(
    model: ComponentModel,
    n_features: int,
    magnitude: float = 0.75,
    *,
    inputs: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Lower-leaky CI of each decomposed module on inputs ``magnitude * e_j``, j < n_features.

    Returns ``{module name: (n_features, C)}``. The inputs are the target's own module inputs
    (``model.target_output(x, cache_inputs=True)``), as in training; ``inputs`` passes them when
    :func:`one_hot_inputs` already formed them.
    """
    if inputs is None:
        inputs = one_hot_inputs(model, n_features, magnitude)
    ci = model.causal_importance(inputs)
    return {name: out.lower.detach() for name, out in ci.items()}


@torch.no_grad()
def one_hot_inputs(
    model: ComponentModel, n_features: int, magnitude: float = 0.75
) -> dict[str, Tensor]:
    """Each decomposed module's own input on the target inputs ``magnitude * e_j``:
    ``{module name: (n_features, d_in)}``."""
    n = check_int("n_features", n_features, ge=1)
    mag = check_number("magnitude", magnitude)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = mag * torch.eye(n, device=device)
    _, inputs = model.target_output(x, cache_inputs=True)
    return {name: t.detach() for name, t in inputs.items()}


def unit_alignment(V: Tensor) -> tuple[Tensor, Tensor]:
    """Per subcomponent ``c``: the share ``max_i V_ic^2 / sum_i V_ic^2`` of its read-in vector on
    its largest input unit, and that unit; both ``(C,)``. Share 1 = the subcomponent reads exactly
    one unit, 1/d_in = spread evenly; a zero column has share 0."""
    _matrix("V", V)
    sq = V.detach().float().square()
    top, unit = sq.max(dim=0)
    total = sq.sum(dim=0)
    return torch.where(total > 0, top / total.clamp_min(1e-30), 0.0), unit


def _aligned(V: Tensor, keep: Tensor | None, align: float) -> tuple[Tensor, Tensor]:
    """(C,) bool: subcomponents in ``keep`` with unit share >= ``align``; (C,) their units."""
    C = V.shape[1]
    a = check_number("align", align, gt=0.0, le=1.0)
    if keep is None:
        keep = torch.ones(C, dtype=torch.bool, device=V.device)
    elif not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != (C,):
        raise ValueError(f"keep must be a bool tensor of shape (C={C},)")
    share, unit = unit_alignment(V)
    return (share >= a) & keep, unit


def ci_per_unit(ci: Tensor, V: Tensor, *, keep: Tensor | None = None, align: float = 0.9) -> Tensor:
    """(N, d_in): per input unit, the largest CI among the subcomponents that read it (share >=
    ``align``, in ``keep``); 0 for a unit no such subcomponent reads."""
    d_in, C = _matrix("V", V).shape
    if _matrix("ci", ci).shape[1] != C:
        raise ValueError(f"ci must have shape (N, C={C}), got {tuple(ci.shape)}")
    chosen, unit = _aligned(V, keep, align)
    out = ci.new_zeros(ci.shape[0], d_in)
    idx = unit[chosen].unsqueeze(0).expand(ci.shape[0], -1)
    return out.scatter_reduce(1, idx, ci.detach()[:, chosen], reduce="amax")


class NeuronContributions(NamedTuple):
    """Result of :func:`neuron_contributions`."""

    target: Tensor
    """(n_features, d_mlp): the target's contribution of each neuron to each feature."""
    spd: Tensor
    """(n_features, d_mlp): the same for each feature's best W_in subcomponent."""
    component: Tensor
    """(n_features,) long: that subcomponent."""
    slope: float
    """Least-squares slope through the origin of ``spd`` on ``target`` (1: no skew)."""
    r2: float
    """``1 - sum (spd - target)^2 / sum target^2``: R^2 about the line y = x."""


def neuron_contributions(
    W_E: Tensor, w_in: Tensor, w_out: Tensor, V: Tensor, U: Tensor, w_out_spd: Tensor
) -> NeuronContributions:
    """ResidMLP neuron contributions of the target and of SPD's W_in subcomponents (paper §4.2,
    the equations above Fig. 6; Figs 7 and 10 plot one against the other).

    Target: ``(W_E[i] . W_in[n, :]) (W_E[i] . W_out[:, n])`` for feature ``i`` and neuron ``n``
    (``W_U = W_E^T``). Subcomponent ``c`` of W_in (``V[:, c] U[c, :]``, the implied weight being
    ``(V U)^T``): ``(W_E[i] . V[:, c]) U[c, n] (W_E[i] . W_out_spd[:, n])``, with ``W_out_spd``
    the components' implied ``W_out``; each feature takes the subcomponent with the largest
    contribution to any neuron, as the reference's plots do. Shapes: ``W_E`` (F, d_embed),
    ``w_in`` (d_mlp, d_embed), ``w_out`` and ``w_out_spd`` (d_embed, d_mlp), ``V`` (d_embed, C),
    ``U`` (C, d_mlp).
    """
    n_f, d_embed = _matrix("W_E", W_E).shape
    d_mlp = _matrix("w_in", w_in).shape[0]
    if w_in.shape[1] != d_embed:
        raise ValueError(
            f"w_in must have shape (d_mlp, d_embed={d_embed}), got {tuple(w_in.shape)}"
        )
    for name, t in (("w_out", w_out), ("w_out_spd", w_out_spd)):
        if _matrix(name, t).shape != (d_embed, d_mlp):
            raise ValueError(f"{name} must have shape ({d_embed}, {d_mlp}), got {tuple(t.shape)}")
    C = _matrix("V", V).shape[1]
    if V.shape[0] != d_embed:
        raise ValueError(f"V must have shape (d_embed={d_embed}, C), got {tuple(V.shape)}")
    if _matrix("U", U).shape != (C, d_mlp):
        raise ValueError(f"U must have shape (C={C}, d_mlp={d_mlp}), got {tuple(U.shape)}")
    E = W_E.detach()
    target = (E @ w_in.detach().T) * (E @ w_out.detach())
    reads = E @ V.detach()  # (F, C)
    writes = E @ w_out_spd.detach()  # (F, d_mlp)
    each = reads[:, :, None] * U.detach()[None] * writes[:, None, :]  # (F, C, d_mlp)
    best = each.amax(dim=2).argmax(dim=1)
    spd = each[torch.arange(n_f), best]
    t, y = target.double(), spd.double()
    tt = float((t * t).sum())
    slope = float((y * t).sum()) / tt if tt > 0 else math.nan
    r2 = 1.0 - float(((y - t) ** 2).sum()) / tt if tt > 0 else math.nan
    return NeuronContributions(target, spd, best, slope, r2)


class UnitGatedCI(NamedTuple):
    """Result of :func:`unit_gated_ci` (probabilities NaN where no pair is counted)."""

    aligned: int
    """Subcomponents (among ``keep``) whose read-in share on one unit is at least ``align``."""
    distinct_units: int
    """Distinct units read by the aligned subcomponents."""
    on_when_firing: float
    """P(CI > tol | the subcomponent's unit is > 0), over positions x aligned subcomponents."""
    on_when_silent: float
    """P(CI > tol | the subcomponent's unit is <= 0)."""
    firing_mass_on: float
    """Share of the firing units' activation (summed over those pairs) where CI > tol."""


def unit_gated_ci(
    ci: Tensor,
    unit_acts: Tensor,
    V: Tensor,
    *,
    keep: Tensor | None = None,
    align: float = 0.9,
    tol: float = 0.1,
) -> UnitGatedCI:
    """Is the CI of unit-aligned subcomponents on exactly when their unit fires?

    ``ci`` (N, C) lower-leaky CI, ``unit_acts`` (N, d_in) the layer's inputs on the same positions
    (for ``mlp_out``: the ReLU neurons), ``V`` (d_in, C); ``keep`` (C,) bool restricts the count
    (e.g. to non-negligible subcomponents). A subcomponent that reads only a silent unit has
    act ``x V_c = 0`` and so no effect, whatever its mask (with a share of ``align`` < 1, nearly
    so): a minimal decomposition turns its CI off.
    """
    d_in, C = _matrix("V", V).shape
    if _matrix("ci", ci).shape[1] != C:
        raise ValueError(f"ci must have shape (N, C={C}), got {tuple(ci.shape)}")
    if _matrix("unit_acts", unit_acts).shape != (ci.shape[0], d_in):
        raise ValueError(
            f"unit_acts must have shape (N={ci.shape[0]}, d_in={d_in}), got "
            f"{tuple(unit_acts.shape)}"
        )
    t = check_number("tol", tol, ge=0.0, le=1.0)
    chosen, unit = _aligned(V, keep, align)
    acts = unit_acts.detach()[:, unit[chosen]]
    fires = acts > 0
    on = ci.detach()[:, chosen] > t
    mass = float(acts[fires].sum())

    def rate(sel: Tensor) -> float:
        n = int(sel.sum())
        return float((on & sel).sum()) / n if n else math.nan

    return UnitGatedCI(
        aligned=int(chosen.sum()),
        distinct_units=int(unit[chosen].unique().numel()),
        on_when_firing=rate(fires),
        on_when_silent=rate(~fires),
        firing_mass_on=float(acts[fires & on].sum()) / mass if mass > 0 else math.nan,
    )


__all__ = [
    "HUNGARIAN_MAX_DIM",
    "NeuronContributions",
    "UnitGatedCI",
    "ci_l0",
    "ci_per_unit",
    "clean_inputs",
    "column_cosines",
    "count_active",
    "count_non_negligible",
    "dense_ci_error",
    "identity_ci_error",
    "mmcs_ml2r",
    "neuron_contributions",
    "non_negligible",
    "one_hot_ci",
    "one_hot_inputs",
    "permute_to_identity",
    "subcomponent_norms",
    "unit_alignment",
    "unit_gated_ci",
]
