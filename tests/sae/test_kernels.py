"""Kernels vs their plain-autograd references: values and gradients, float32 and float64."""

from __future__ import annotations

import pytest
import torch

from sparselens.sae.kernels import (
    encoder_select,
    encoder_select_reference,
    preactivations,
    topk_decode,
    topk_decode_reference,
    topk_encode,
    topk_encode_reference,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _dense(acts: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    return acts.new_zeros(acts.shape[0], m).scatter_add(1, idx, acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_decode_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n, k, m, d = 37, 5, 50, 12
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    acts = torch.rand(n, k, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    grad = torch.randn(n, d, generator=g, dtype=dtype)
    out = topk_decode(idx, acts, w)
    ga, gw = torch.autograd.grad(out, (acts, w), grad)
    out_r = topk_decode_reference(idx, acts, w)
    ga_r, gw_r = torch.autograd.grad(out_r, (acts, w), grad)
    _close(out, out_r, dtype)
    _close(ga, ga_r, dtype)
    _close(gw, gw_r, dtype)
    # independent dense reference: scatter to (N, M), then a GEMM
    _close(out, _dense(acts.detach(), idx, m) @ w.detach(), dtype)


def test_topk_decode_repeated_indices() -> None:
    """Duplicate latents in one row (top-k inside the 4k set) sum their gradients."""
    idx = torch.tensor([[1, 1, 0], [2, 1, 1]])
    acts = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, ww: topk_decode(idx, a, ww), (acts, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias_shift", [0.0, -3.0])
def test_topk_encode_matches_autograd(dtype: torch.dtype, bias_shift: float) -> None:
    """With b_enc << 0 fewer than k pre-acts are positive: selected zeros get no gradient.

    Fails for sparsify's fused backward, which ignores the ReLU mask (straight-through).
    """
    g = torch.Generator().manual_seed(1)
    n, d, m, k = 29, 10, 40, 6
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(m, generator=g, dtype=dtype) + bias_shift).requires_grad_()
    acts, idx = topk_encode(x, w, b, k)
    acts_r, idx_r = topk_encode_reference(x, w, b, k)
    if bias_shift < 0:
        assert ((acts_r > 0).sum(1) < k).any()  # the < k positive case is exercised
    dense, dense_r = _dense(acts, idx, m), _dense(acts_r, idx_r, m)
    _close(dense, dense_r, dtype)
    grad = torch.randn(n, m, generator=g, dtype=dtype)
    gs = torch.autograd.grad((dense * grad).sum(), (x, w, b))
    gs_r = torch.autograd.grad((dense_r * grad).sum(), (x, w, b))
    for a, r in zip(gs, gs_r, strict=True):
        _close(a, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_select_union_of_sets(dtype: torch.dtype) -> None:
    """Top-k ∪ aux ∪ 4k concatenated (with repeats) match dense autograd through ReLU+gather."""
    g = torch.Generator().manual_seed(2)
    n, d, m = 17, 8, 30
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(m, generator=g, dtype=dtype) - 0.5).requires_grad_()
    pre = preactivations(x, w, b)
    idx = torch.cat(
        [pre.topk(3, 1).indices, pre[:, 20:].topk(4, 1).indices + 20, pre.topk(12, 1).indices], 1
    )
    out = encoder_select(x, w, b, idx, pre)
    out_r = encoder_select_reference(x, w, b, idx)
    _close(out, out_r, dtype)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    gs = torch.autograd.grad(out, (x, w, b), grad)
    gs_r = torch.autograd.grad(out_r, (x, w, b), grad)
    for a, r in zip(gs, gs_r, strict=True):
        _close(a, r, dtype)


def test_index_add_fallback_matches_csr(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-CSR path (used for bf16/fp16) gives the CSR path's gradients (float64 forced)."""
    from sparselens.sae import kernels

    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 20, (13, 4), generator=g)
    acts = torch.rand(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    gw_csr = torch.autograd.grad(topk_decode(idx, acts, w).sum(), w)[0]
    monkeypatch.setattr(kernels, "_CSR_DTYPES", ())
    monkeypatch.setattr(kernels, "_GATHER_CHUNK_ELEMS", 30)  # several chunks
    gw = torch.autograd.grad(topk_decode(idx, acts, w).sum(), w)[0]
    torch.testing.assert_close(gw, gw_csr, rtol=1e-10, atol=1e-10)


def test_bfloat16_forward_backward_runs() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(24, 8, generator=g).bfloat16().requires_grad_()
    b = torch.zeros(24, dtype=torch.bfloat16, requires_grad=True)
    acts, idx = topk_encode(x, w, b, 3)
    topk_decode(idx, acts, w).float().pow(2).sum().backward()
    acts_r, idx_r = topk_encode_reference(x.float(), w.float(), b.float(), 3)
    torch.testing.assert_close(
        _dense(acts.float(), idx, 24), _dense(acts_r, idx_r, 24), rtol=2e-2, atol=2e-2
    )
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (x, w, b))
