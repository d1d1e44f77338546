"""Evaluate a sparse coder on a subject's activations: reconstruction, sparsity, downstream loss.

:func:`evaluate` streams non-overlapping windows of a token stream through the subject. Per batch,
ONE forward computes the clean logits and captures the hookpoint's activations
(:func:`sparselens.lm.hooks.capture`); two more forwards splice in the coder's reconstruction and
a zero ablation (:func:`sparselens.lm.hooks.replace_output`). Definitions (reference sheet
``topk-sae.md`` §7; Gao et al. 2024, arXiv 2406.04093):

* ``fvu = sum ||y - yhat||^2 / sum ||y - ybar||^2``, ``ybar`` the mean over ALL evaluated tokens: a
  dataset-level ratio of sums streamed in float64 (:class:`~sparselens.sae.FVUAccumulator`), never
  an average of per-batch ratios (SAELens #443) nor a variance around zero (SAELens #659/#665);
  ``explained_variance = 1 - fvu``.
* ``l0``: mean number of non-zero latent activations per token. A latent *fires* when its
  activation exceeds the coder's ``fire_threshold``; ``dead_fraction``: latents that never fired
  on the evaluated tokens; ``dense_fraction``: latents firing on more than 10 % of them;
  ``density_histogram``: log10 firing frequency of the latents that fired.
* ``ce_clean``, ``ce_sae``, ``ce_zero_ablation``: mean next-token cross-entropy (nats) of the
  clean model, with ``yhat`` spliced in at the hookpoint and with the hookpoint zeroed;
  ``ce_loss_recovered = (ce_zero_ablation - ce_sae) / (ce_zero_ablation - ce_clean)`` (SAEBench
  "loss recovered", SAELens ``ce_loss_score``); ``delta_ce = ce_sae - ce_clean``.
* ``kl_sae = mean_t sum_v p_clean log(p_clean / p_sae)``: KL(clean || spliced), summed over the
  vocabulary and averaged over positions (``kl_zero_ablation`` likewise).
* ``shrinkage = mean_n ||yhat_n|| / ||y_n||``; ``relative_reconstruction_bias = E||yhat||^2 /
  E<y, yhat>`` (Rajamanoharan et al. 2024, Gated SAEs, eq. 10); ``cosine = mean_n cos(y_n,
  yhat_n)``; tokens with ``y_n = 0`` are left out of these three.

A transcoder (``transcode``) reads the module's INPUT and predicts its OUTPUT; its prediction
replaces the module's output in the spliced pass. Special tokens (BOS/EOS/PAD) are excluded when
``exclude_special_tokens``: their activations enter no metric, the splice and the ablation leave
them untouched (the coder never saw such tokens), and the cross-entropy and KL average over the
predictions made AT kept positions (logits of position t, target token t + 1) only. Every mean is
a ratio of dataset-wide sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from sparselens.core.checks import check_int
from sparselens.core.softmax import log_softmax
from sparselens.lm.hooks import capture, replace_output, resolve_patterns
from sparselens.sae.data import exclusion_mask
from sparselens.sae.fvu import FVUAccumulator
from sparselens.sae.sparse_coder import SparseCoder
from sparselens.sae.subject import Subject

#: A latent is dense when it fires on more than this share of tokens.
DENSE_THRESHOLD = 0.1

#: Width of a density-histogram bin, in decades of firing frequency.
DENSITY_BIN_DECADES = 0.25


# -- shared with inspect ------------------------------------------------------------------------
def resolve_hookpoint(subject: Subject, hookpoint: str) -> str:
    """The one module name ``hookpoint`` (a name or an fnmatch pattern) denotes in ``subject``.

    Raises a one-line ValueError listing the available names when it matches none, and one
    listing the matches when it matches several.
    """
    if not isinstance(hookpoint, str) or not hookpoint:
        raise ValueError(f"hookpoint must be a non-empty module name, got {hookpoint!r}")
    names = resolve_patterns(subject.module_names(), hookpoint, field="hookpoint")
    if len(names) != 1:
        raise ValueError(
            f"hookpoint {hookpoint!r} matches {len(names)} modules ({', '.join(names[:8])}"
            f"{', ...' if len(names) > 8 else ''}); name exactly one"
        )
    return names[0]


def token_windows(tokens: Tensor, context_len: int) -> Tensor:
    """Non-overlapping ``(n, context_len)`` windows of a 1-D token stream (the tail that does not
    fill a window is dropped); a 2-D ``(n, context_len)`` tensor is returned as is."""
    t = check_int("context_len", context_len, ge=1)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.dim() == 2:
        if tokens.shape[1] != t or tokens.shape[0] == 0:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} must be (n >= 1, context_len={t}) windows"
            )
        return tokens.long()
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream or 2-D windows, got {tuple(tokens.shape)}")
    n = tokens.numel() // t
    if n == 0:
        raise ValueError(
            f"tokens holds {tokens.numel()} tokens, fewer than one window of context_len {t}"
        )
    return tokens[: n * t].reshape(n, t).long()


def coder_mode(coder: SparseCoder, transcode: bool | None) -> bool:
    """Whether ``coder`` runs as a transcoder: its ``cfg.transcode``; a given ``transcode`` must
    agree with it."""
    if not isinstance(coder, SparseCoder):
        raise TypeError(f"coder must be a SparseCoder, got {type(coder).__name__}")
    tc = bool(coder.cfg.transcode)
    if transcode is not None and bool(transcode) != tc:
        raise ValueError(
            f"transcode={bool(transcode)} but the sparse coder was built with transcode={tc}"
        )
    return tc


@dataclass
class HookBatch:
    """One batch of windows at a hookpoint: ``tokens`` (B, T) and ``keep`` (B, T) on the
    subject's device, the module ``output`` (B, T, d) (and ``input`` for transcoders), the
    kept rows ``x`` (coder input) and ``y`` (target), and the clean ``logits`` when asked."""

    tokens: Tensor
    keep: Tensor
    output: Tensor
    x: Tensor
    y: Tensor
    logits: Tensor | None


def _check_activation(hookpoint: str, where: str, t: Tensor, lead: tuple[int, int]) -> None:
    if t.dim() != 3 or tuple(t.shape[:2]) != lead:
        raise ValueError(
            f"hookpoint {hookpoint}: its {where} has shape {tuple(t.shape)}, expected "
            f"(batch, seq, features) with (batch, seq) = {lead}"
        )
    if not t.is_floating_point():
        raise ValueError(f"hookpoint {hookpoint}: its {where} has non-float dtype {t.dtype}")


def _check_finite(hookpoint: str, where: str, t: Tensor, first_window: int) -> None:
    """One-line error naming the hookpoint and the first window with a NaN/inf activation."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(
            f"hookpoint {hookpoint}: its {where} holds NaN or inf activations in window "
            f"{first_window + bad} (the subject's forward pass is not finite there)"
        )


def read_hookpoint(
    subject: Subject,
    coder: SparseCoder,
    hookpoint: str,
    batch: Tensor,
    *,
    transcode: bool,
    specials: tuple[int, ...],
    with_logits: bool,
    first_window: int = 0,
) -> HookBatch:
    """Run ``subject`` once on ``batch`` (B, T), capturing ``hookpoint`` (stopping there unless
    ``with_logits``); check the activation widths against ``coder.d_in`` and that they are finite
    (errors name window ``first_window + i`` for row ``i`` of ``batch``)."""
    tok = batch.to(subject.device)
    keep = exclusion_mask(tok, specials)
    wheres = ("input", "output") if transcode else ("output",)
    box: list[Tensor] = []
    acts = capture(
        subject.model,
        lambda: box.append(subject.logits(tok)),
        [hookpoint],
        where=wheres,
        stop_early=not with_logits,
    )
    lead = (int(tok.shape[0]), int(tok.shape[1]))
    out = acts[(hookpoint, "output")]
    _check_activation(hookpoint, "output", out, lead)
    inp = acts[(hookpoint, "input")] if transcode else out
    if transcode:
        _check_activation(hookpoint, "input", inp, lead)
    for where, t in (("input", inp), ("output", out)) if transcode else (("output", out),):
        if t.shape[-1] != coder.d_in:
            kind = "transcoder" if transcode else "sparse autoencoder"
            raise ValueError(
                f"hookpoint {hookpoint}: its {where} has width {t.shape[-1]}, but the {kind}'s "
                f"d_in is {coder.d_in}"
            )
        _check_finite(hookpoint, where, t, first_window)
    keep_rows = keep.reshape(-1)
    y = out.reshape(-1, out.shape[-1])[keep_rows]
    x = inp.reshape(-1, inp.shape[-1])[keep_rows] if transcode else y
    return HookBatch(tok, keep, out, x, y, box[0] if with_logits else None)


def batches(windows: Tensor, batch_size: int) -> Iterator[Tensor]:
    """``windows`` in consecutive chunks of ``batch_size`` rows."""
    b = check_int("batch_size", batch_size, ge=1)
    yield from windows.split(b)


# -- results ------------------------------------------------------------------------------------
class DensityHistogram(BaseModel):
    """Histogram of log10 firing frequency over the latents that fired at least once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float]
    counts: list[int]
    never_fired: int


class EvalResult(BaseModel):
    """What :func:`evaluate` measures (module docstring); ``model_dump(mode="json")`` is JSON.

    ``tokens``: kept positions (activation metrics); ``predictions``: next-token predictions at
    kept positions (CE and KL); ``ce_loss_recovered`` is None when the zero ablation does not
    change the cross-entropy, ``relative_reconstruction_bias`` when ``E<y, yhat> = 0``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hookpoint: str
    transcode: bool
    d_in: int
    num_latents: int
    k: int
    sequences: int
    context_len: int
    positions: int
    tokens: int
    predictions: int
    exclude_special_tokens: bool
    fvu: float
    explained_variance: float
    l0: float
    fire_threshold: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    density_histogram: DensityHistogram
    ce_clean: float
    ce_sae: float
    ce_zero_ablation: float
    ce_loss_recovered: float | None
    delta_ce: float
    kl_sae: float
    kl_zero_ablation: float
    shrinkage: float
    relative_reconstruction_bias: float | None
    cosine: float


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float | None:
    """``(ce_zero - ce_sae) / (ce_zero - ce_clean)``; None when ``ce_zero == ce_clean``."""
    den = ce_zero - ce_clean
    return None if den == 0 else (ce_zero - ce_sae) / den


def density_histogram(fire_counts: Tensor, n_tokens: int) -> DensityHistogram:
    """Bins of :data:`DENSITY_BIN_DECADES` decades from ``floor(log10(1 / n_tokens))`` to 0 over
    ``log10(fire_counts / n_tokens)`` of the latents with a non-zero count."""
    counts = fire_counts.detach().cpu().double()
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1)))
    n_bins = max(1, round(-lo / DENSITY_BIN_DECADES))
    edges = np.linspace(lo, 0.0, n_bins + 1)
    live = counts[counts > 0] / max(n_tokens, 1)
    hist, _ = np.histogram(np.log10(live.numpy()), bins=edges)
    return DensityHistogram(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in hist],
        never_fired=int((counts == 0).sum()),
    )


class _Sums:
    """Dataset-wide float64 sums (device tensors; read once in :meth:`result`)."""

    def __init__(self, num_latents: int, device: torch.device) -> None:
        z = torch.zeros((), dtype=torch.float64, device=device)
        self.fvu = FVUAccumulator()
        self.l0 = z.clone()
        self.fire = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.norm_rows = torch.zeros((), dtype=torch.int64, device=device)
        self.shrink = z.clone()
        self.cos = z.clone()
        self.yhat_sq = z.clone()
        self.y_dot_yhat = z.clone()
        self.preds = torch.zeros((), dtype=torch.int64, device=device)
        self.ce = {name: z.clone() for name in ("clean", "sae", "zero")}
        self.kl = {name: z.clone() for name in ("sae", "zero")}

    def add_reconstruction(
        self, y: Tensor, y_hat: Tensor, acts: Tensor, indices: Tensor, fire_threshold: float
    ) -> None:
        self.fvu.update(y, y_hat)
        n = y.shape[0]
        self.tokens += n
        self.l0 += (acts != 0).sum().double()
        fired = (acts > fire_threshold).reshape(-1).to(torch.int64)
        dev = self.fire.device
        self.fire.index_add_(0, indices.reshape(-1).to(dev), fired.to(dev))
        y64, h64 = y.double(), y_hat.double()
        yn, hn = y64.norm(dim=1), h64.norm(dim=1)
        ok = yn > 0
        self.norm_rows += ok.sum()
        self.shrink += torch.where(ok, hn / yn.clamp_min(1e-300), 0.0).sum()
        dot = (y64 * h64).sum(1)
        cos = dot / (yn * hn).clamp_min(1e-300)
        self.cos += torch.where(ok, cos, 0.0).sum()
        self.yhat_sq += hn.pow(2).sum()
        self.y_dot_yhat += dot.sum()

    def result(self, **info: object) -> EvalResult:
        n = int(self.tokens)
        if n == 0:
            raise ValueError("every evaluated position is a special token; nothing to evaluate")
        preds = int(self.preds)
        if preds == 0:
            raise ValueError("no kept position has a next token in its window; nothing to score")
        fvu = float(self.fvu.compute())
        freq = self.fire.double() / n
        ce = {k: float(v) / preds for k, v in self.ce.items()}
        rows = max(int(self.norm_rows), 1)
        dot = float(self.y_dot_yhat)
        return EvalResult(
            **info,  # type: ignore[arg-type]
            tokens=n,
            predictions=preds,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            l0=float(self.l0) / n,
            dead_fraction=float((self.fire == 0).double().mean()),
            dense_fraction=float((freq > DENSE_THRESHOLD).double().mean()),
            dense_threshold=DENSE_THRESHOLD,
            density_histogram=density_histogram(self.fire, n),
            ce_clean=ce["clean"],
            ce_sae=ce["sae"],
            ce_zero_ablation=ce["zero"],
            ce_loss_recovered=ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            delta_ce=ce["sae"] - ce["clean"],
            kl_sae=float(self.kl["sae"]) / preds,
            kl_zero_ablation=float(self.kl["zero"]) / preds,
            shrinkage=float(self.shrink) / rows,
            relative_reconstruction_bias=float(self.yhat_sq) / dot if dot != 0 else None,
            cosine=float(self.cos) / rows,
        )


# -- the evaluation -----------------------------------------------------------------------------
def _substitute(value: Tensor, hookpoint: str) -> Callable[[Tensor], Tensor]:
    def fn(out: Tensor) -> Tensor:
        if out.shape != value.shape:
            raise RuntimeError(
                f"hookpoint {hookpoint}: output shape {tuple(out.shape)} changed to "
                f"{tuple(value.shape)} between passes"
            )
        return value

    return fn


def _check_logits(logits: Tensor, first_window: int) -> None:
    """One-line error naming the first window whose clean logits hold NaN or +inf."""
    bad = torch.isnan(logits) | (logits == math.inf)
    if bool(bad.any()):
        w = int(bad.flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(
            f"the subject's clean logits hold NaN or +inf in window {first_window + w}"
        )


def _next_token_terms(
    logits: Tensor, lp_clean: Tensor, targets: Tensor, pred: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed NLL of ``targets`` and summed KL(clean || this) over the ``pred`` positions."""
    lp = log_softmax(logits[:, :-1])
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = lp_clean.exp()
    kl = torch.where(p > 0, p * (lp_clean - lp), torch.zeros_like(p)).sum(-1)
    w = pred.double()
    return (nll.double() * w).sum(), (kl.double() * w).sum()


@torch.no_grad()
def evaluate(
    subject: Subject,
    coder: SparseCoder,
    hookpoint: str,
    tokens: Tensor,
    *,
    context_len: int,
    batch_size: int,
    transcode: bool | None = None,
    exclude_special_tokens: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``coder`` at ``hookpoint`` of ``subject`` on ``tokens`` (module docstring).

    ``tokens``: a 1-D stream cut into non-overlapping ``context_len`` windows (or 2-D windows),
    run ``batch_size`` windows at a time. ``transcode``: default the coder's ``cfg.transcode``.
    Raises a one-line ValueError for an unknown hookpoint, a width that is not the coder's
    ``d_in``, NaN/inf activations (naming the hookpoint and the window), ``context_len`` < 2 or
    above the subject's, or nothing left to evaluate.
    """
    from sparselens.train.progress import progress_bar

    name = resolve_hookpoint(subject, hookpoint)
    tc = coder_mode(coder, transcode)
    t = check_int("context_len", context_len, ge=2, le=subject.context_len)
    windows = token_windows(tokens, t)
    check_int("batch_size", batch_size, ge=1)
    specials = tuple(subject.special_token_ids) if exclude_special_tokens else ()
    sums = _Sums(coder.num_latents, coder.device)
    was_training = coder.training
    coder.eval()
    bar = progress_bar(windows.shape[0], f"sae eval {name}", enabled=progress)
    try:
        first = 0
        for batch in batches(windows, batch_size):
            hb = read_hookpoint(
                subject,
                coder,
                name,
                batch,
                transcode=tc,
                specials=specials,
                with_logits=True,
                first_window=first,
            )
            first += batch.shape[0]
            out, keep = hb.output, hb.keep
            assert hb.logits is not None
            rows = out.reshape(-1, out.shape[-1])
            if hb.y.shape[0] > 0:
                x = hb.x.to(coder.device, coder.dtype)
                y = hb.y.to(coder.device, coder.dtype)
                fo = coder(x, y if tc else None)
                sums.add_reconstruction(
                    y, fo.sae_out, fo.latent_acts, fo.latent_indices, coder.cfg.fire_threshold
                )
                spliced_rows = rows.clone()
                spliced_rows[keep.reshape(-1)] = fo.sae_out.to(rows.device, rows.dtype)
                spliced = spliced_rows.reshape(out.shape)
            else:
                spliced = out
            ablated = torch.where(keep.unsqueeze(-1), torch.zeros_like(out), out)

            _check_logits(hb.logits, first - batch.shape[0])
            targets, pred = hb.tokens[:, 1:], keep[:, :-1]
            lp_clean = log_softmax(hb.logits[:, :-1])
            nll = -lp_clean.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums.ce["clean"] += (nll.double() * pred.double()).sum()
            sums.preds += pred.sum()
            for key, value in (("sae", spliced), ("zero", ablated)):
                with replace_output(subject.model, name, _substitute(value, name)):
                    logits = subject.logits(hb.tokens)
                ce_sum, kl_sum = _next_token_terms(logits, lp_clean, targets, pred)
                sums.ce[key] += ce_sum
                sums.kl[key] += kl_sum
            bar.update(batch.shape[0])
    finally:
        bar.close()
        coder.train(was_training)
    return sums.result(
        hookpoint=name,
        transcode=tc,
        d_in=coder.d_in,
        num_latents=coder.num_latents,
        k=coder.cfg.k,
        sequences=int(windows.shape[0]),
        context_len=t,
        positions=int(windows.numel()),
        exclude_special_tokens=bool(exclude_special_tokens),
        fire_threshold=float(coder.cfg.fire_threshold),
    )


__all__ = [
    "DENSE_THRESHOLD",
    "DensityHistogram",
    "EvalResult",
    "HookBatch",
    "batches",
    "ce_loss_recovered",
    "coder_mode",
    "density_histogram",
    "evaluate",
    "read_hookpoint",
    "resolve_hookpoint",
    "token_windows",
]
