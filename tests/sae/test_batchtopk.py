"""BatchTopK (Bussmann et al. 2024) training selection and its JumpReLU inference threshold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselens.sae import SparseCoder, SparseCoderConfig

D, M, K = 8, 32, 3


def _sae(seed: int = 0, **kw: object) -> SparseCoder:
    torch.manual_seed(seed)
    cfg = SparseCoderConfig(num_latents=M, k=K, activation="batchtopk", **kw)
    sae = SparseCoder(D, cfg, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.3)
    return sae


def _x(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _relu_pre(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    return F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)


def _batch_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense reference: keep the N*k largest entries of the batch."""
    vals, flat = pre.reshape(-1).topk(pre.shape[0] * k)
    return torch.zeros(pre.numel(), dtype=pre.dtype).scatter(0, flat, vals).view_as(pre)


def _min_positive_selected(pre: torch.Tensor, k: int) -> float:
    vals = pre.detach().reshape(-1).topk(pre.shape[0] * k).values
    return vals[vals > 0].min().item()


def test_threshold_buffer_only_for_batchtopk() -> None:
    sae = _sae()
    assert sae.threshold.shape == () and sae.threshold.dtype == torch.float32
    assert sae.threshold.item() == 0.0 and "threshold" in sae.state_dict()
    topk = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K))
    assert "threshold" not in topk.state_dict() and not hasattr(topk, "threshold")


def test_threshold_is_ema_of_min_positive_selected_activation() -> None:
    """thr <- (1 - lr) thr + lr * min{selected a > 0}, lr = 0.01, per training forward.

    Fails for an EMA of the minimum over all selected values (b_enc << 0 here, so zeros are
    among the N*k picks and that minimum is 0) or of their mean."""
    sae = _sae()
    with torch.no_grad():
        sae.encoder.bias.sub_(2.0)
    x1, x2 = _x(seed=1), _x(seed=2)
    pre1 = _relu_pre(sae, x1)
    assert ((pre1 > 0).sum() < x1.shape[0] * K).item()  # zeros are selected in this batch
    sae(x1)
    m1 = _min_positive_selected(pre1, K)
    assert sae.threshold.item() == pytest.approx(0.01 * m1, rel=1e-6)
    sae(x2)
    m2 = _min_positive_selected(_relu_pre(sae, x2), K)
    assert sae.threshold.item() == pytest.approx(0.99 * 0.01 * m1 + 0.01 * m2, rel=1e-6)

    fast = _sae(threshold_lr=0.5)
    fast(x1)
    assert fast.threshold.item() == pytest.approx(
        0.5 * _min_positive_selected(_relu_pre(fast, x1), K), rel=1e-6
    )


def test_threshold_frozen_in_eval_and_on_batches_without_positive_acts() -> None:
    sae = _sae()
    sae(_x())
    before = sae.threshold.clone()
    sae.eval()
    sae(_x(seed=3))
    assert torch.equal(sae.threshold, before)
    sae.train()
    with torch.no_grad():
        sae.encoder.bias.fill_(-1e3)  # no positive pre-activation anywhere
    sae(_x(seed=4))
    assert torch.equal(sae.threshold, before)


def _train_threshold(sae: SparseCoder) -> None:
    for s in range(30):
        sae(_x(seed=10 + s))
    assert sae.threshold.item() > 0


def test_eval_is_per_token_jumprelu() -> None:
    """In eval mode each token's code is ReLU(pre) * (pre > threshold), whatever else is in the
    batch. Fails if inference keeps BatchTopK: there a token's code depends on its batch (shown
    below in train mode)."""
    sae = _sae()
    _train_threshold(sae)
    thr = sae.threshold.item()
    x = _x(n=10, seed=99)
    sae.eval()
    with torch.no_grad():
        out = sae(x)
        code = torch.zeros(10, M, dtype=torch.float64).scatter_add(
            1, out.latent_indices, out.latent_acts
        )
        pre = _relu_pre(sae, x)
        torch.testing.assert_close(code, pre * (pre > thr))
        ref_out = (pre * (pre > thr)) @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(out.sae_out, ref_out)
        for i in range(10):
            alone = sae(x[i : i + 1]).sae_out
            torch.testing.assert_close(alone[0], out.sae_out[i], rtol=1e-12, atol=1e-12)
            other = torch.cat([x[i : i + 1], 5 * _x(n=7, seed=200 + i)])
            torch.testing.assert_close(sae(other).sae_out[0], out.sae_out[i])
    sae.train()  # the training selection is batch-dependent: the check above can fail
    with torch.no_grad():
        batch_dep = [
            not torch.allclose(
                sae(torch.cat([x[i : i + 1], 5 * _x(n=7, seed=200 + i)])).sae_out[0],
                sae(x).sae_out[i],
            )
            for i in range(10)
        ]
    assert any(batch_dep)


def test_training_selection_values_and_gradients_match_dense_reference() -> None:
    """Train mode: the batch's N*k largest ReLU'd pre-acts, decoded; every gradient equals dense
    autograd with that mask (zero-valued picks get none)."""
    sae = _sae()
    x = _x()
    out = sae(x)
    pre = _relu_pre(sae, x)
    z = _batch_code(pre.detach(), K)
    dense = torch.zeros_like(pre).scatter_add(1, out.latent_indices, out.latent_acts)
    torch.testing.assert_close(dense, z)
    z_ref = pre * (z > 0)
    y_ref = z_ref @ sae.W_dec + sae.b_dec
    fvu_ref = ((x - y_ref) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, fvu_ref, rtol=1e-10, atol=1e-12)
    params = list(sae.parameters())
    for a, b in zip(
        torch.autograd.grad(out.fvu, params), torch.autograd.grad(fvu_ref, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_encode_follows_the_mode() -> None:
    sae = _sae()
    _train_threshold(sae)
    x = _x(n=6, seed=5)
    before = sae.threshold.clone()
    sae.eval()
    enc = sae.encode(x)
    assert torch.equal(sae.threshold, before)
    pre = _relu_pre(sae, x).detach()
    code = torch.zeros_like(pre).scatter_add(1, enc.top_indices, enc.top_acts.detach())
    torch.testing.assert_close(code, pre * (pre > sae.threshold.item()))
    sae.train()
    enc = sae.encode(x)
    code = torch.zeros_like(pre).scatter_add(1, enc.top_indices, enc.top_acts.detach())
    torch.testing.assert_close(code, _batch_code(pre, K))
    assert not torch.equal(sae.threshold, before)


def test_threshold_lr_is_validated() -> None:
    with pytest.raises(ValueError, match="threshold_lr"):
        SparseCoderConfig(threshold_lr=0.0)
    with pytest.raises(ValueError, match="threshold_lr"):
        SparseCoderConfig(threshold_lr=1.5)


def test_gradcheck_training_fvu_wrt_all_parameters() -> None:
    """Finite differences of the train-mode FVU w.r.t. every parameter (b_enc << 0: the batch's
    N*k picks include zeros, which must get no gradient). Fails for a straight-through backward
    on the zero picks."""
    from torch.func import functional_call

    sae = _sae()
    with torch.no_grad():
        sae.encoder.bias.sub_(2.0)
    x = _x(n=6)
    assert ((_relu_pre(sae, x) > 0).sum() < 6 * K).item()
    names = [n for n, _ in sae.named_parameters()]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(sae, dict(zip(names, ps, strict=True)), (x,)).fvu

    inputs = tuple(p.detach().clone().requires_grad_() for p in sae.parameters())
    assert torch.autograd.gradcheck(f, inputs)
