"""Gradient accumulation: micro-batches given the full batch's FVU and AuxK denominators add up
to the full batch's loss and gradients (sparsify 1.3.2's ``total_variance=``, plus the AuxK
residual variance, Gao et al. 2024 App. A.2)."""

from __future__ import annotations

import pytest
import torch

from sparselens.sae import SparseCoder, SparseCoderConfig, total_variance

D, M, K = 8, 40, 3
SPLITS = [9, 15]


def _sae(**kw: object) -> SparseCoder:
    torch.manual_seed(0)
    cfg = SparseCoderConfig(num_latents=M, k=K, k_aux=6, multi_topk=True, **kw)
    sae = SparseCoder(D, cfg, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.5)
        if sae.cfg.transcode:
            sae.W_dec.normal_(std=0.3)
    return sae


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(SPLITS), D, dtype=torch.float64, generator=g) + 1.0
    y = x @ torch.randn(D, D, dtype=torch.float64, generator=g) * 0.3 + 0.5
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=g)[:10]] = True
    return x, y, dead


def _loss(sae: SparseCoder, out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[3] + sae.cfg.auxk_alpha * out[4] + out[5] / 8


def _full_and_micro(
    sae: SparseCoder, *, pass_denominators: bool
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    x, y, dead = _data()
    y = y if sae.cfg.transcode else x
    y_arg = y if sae.cfg.transcode else None
    params = list(sae.parameters())
    out = sae(x, y_arg, dead_mask=dead)
    full = _loss(sae, out)
    g_full = list(torch.autograd.grad(full, params))
    assert out.auxk_loss.item() > 0 and out.multi_topk_fvu.item() > 0

    kw: dict[str, torch.Tensor] = {}
    if pass_denominators:
        with torch.no_grad():  # what a trainer does: the full batch's Var(y), then Var(e)
            kw["total_variance"] = total_variance(y)
            e = torch.cat(
                [
                    yc - sae(xc, None if y_arg is None else yc, **kw).sae_out
                    for xc, yc in zip(x.split(SPLITS), y.split(SPLITS), strict=True)
                ]
            )
            kw["residual_variance"] = total_variance(e)
    micro = torch.zeros((), dtype=torch.float64)
    g_micro = [torch.zeros_like(p) for p in params]
    for xc, yc in zip(x.split(SPLITS), y.split(SPLITS), strict=True):
        loss = _loss(sae, sae(xc, None if y_arg is None else yc, dead_mask=dead, **kw))
        micro = micro + loss.detach()
        for acc, g in zip(g_micro, torch.autograd.grad(loss, params), strict=True):
            acc += g
    return full.detach(), g_full, micro, g_micro


@pytest.mark.parametrize("normalization", ["residual", "target"])
@pytest.mark.parametrize("transcode", [False, True])
def test_micro_batches_with_full_batch_denominators_equal_one_batch(
    normalization: str, transcode: bool
) -> None:
    """Loss and gradients of 2 accumulated micro-batches = one batch (FVU, AuxK, Multi-TopK)."""
    sae = _sae(auxk_normalization=normalization, transcode=transcode)
    full, g_full, micro, g_micro = _full_and_micro(sae, pass_denominators=True)
    torch.testing.assert_close(micro, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_micro, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization", ["residual", "target"])
def test_per_micro_batch_denominators_do_not_add_up(normalization: str) -> None:
    """The wrong variant (each micro-batch normalised by its own variances) gives another loss,
    so the test above can fail."""
    sae = _sae(auxk_normalization=normalization)
    full, _, micro, _ = _full_and_micro(sae, pass_denominators=False)
    assert abs(micro.item() - full.item()) > 1e-3 * full.item()


def test_residual_variance_only_changes_the_auxk_term() -> None:
    """``residual_variance`` is the AuxK denominator (residual mode) and nothing else: AuxK
    scales by Var_batch(e) / residual_variance; FVU and Multi-TopK are unchanged."""
    sae = _sae()
    x, _, dead = _data()
    base = sae(x, dead_mask=dead)
    e = (x - base.sae_out).detach()
    rv = 3.0 * total_variance(e)
    out = sae(x, dead_mask=dead, residual_variance=rv)
    torch.testing.assert_close(out.auxk_loss, base.auxk_loss / 3.0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.fvu, base.fvu)
    torch.testing.assert_close(out.multi_topk_fvu, base.multi_topk_fvu)
    target = _sae(auxk_normalization="target")
    a = target(x, dead_mask=dead).auxk_loss
    b = target(x, dead_mask=dead, residual_variance=rv).auxk_loss
    torch.testing.assert_close(a, b)
