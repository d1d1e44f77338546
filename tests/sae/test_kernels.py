"""Kernels vs their plain-autograd references: values and gradients, float32 and float64,
with and without oneDNN and with the (N, M) pre-activations split into several row chunks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.sae import kernels
from sparselens.sae.kernels import (
    batch_topk_rows,
    decode,
    encoder_grad,
    encoder_select,
    encoder_select_reference,
    jumprelu_rows,
    linear,
    matmul,
    topk_decode,
    topk_decode_reference,
    topk_encode,
    topk_encode_reference,
    topk_select,
)

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _dense(acts: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    return acts.new_zeros(acts.shape[0], m).scatter_add(1, idx, acts)


@pytest.fixture(params=["onednn", "fallback"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both dense-product paths; the oneDNN one only where it works."""
    on = kernels.use_onednn(request.param == "onednn")
    if request.param == "onednn" and not on:
        kernels.use_onednn(None)
        pytest.skip("oneDNN inner product unavailable")
    yield request.param
    kernels.use_onednn(None)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force several row chunks (CHUNK_ELEMS / M rows each) in every selection."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMS", 97)


def test_linear_and_matmul_match_torch(backend: str) -> None:
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(13, 7, generator=g), torch.randn(11, 7, generator=g), torch.randn(11)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w, b, relu=True), F.relu(F.linear(x, w, b)))
    a, c = torch.randn(9, 13, generator=g), torch.randn(13, 5, generator=g)
    torch.testing.assert_close(matmul(a, c), a @ c, rtol=1e-5, atol=1e-5)
    a_cm, c_cm = a.t().contiguous().t(), c.t().contiguous().t()  # column-major strides
    torch.testing.assert_close(matmul(a_cm, c_cm), a @ c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul(a[::2], c[:, 1:4]), a[::2] @ c[:, 1:4], rtol=1e-5, atol=1e-5)
    xd = x.double()
    assert linear(xd, w.double()).dtype == torch.float64  # fallback dtype


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
def test_fused_main_and_dense_aux_decode(backend: str, dtype: torch.dtype) -> None:
    """``decode`` with a dense part: both outputs and one W_dec gradient equal autograd through
    ``acts -> W[idx]`` and ``z @ W[cols]``. Fails if the aux rows' gradient is dropped or lands
    on the wrong rows of ``grad_W_dec`` (e.g. at 0..c-1 instead of ``cols``)."""
    g = torch.Generator().manual_seed(11)
    n, k, m, d = 23, 4, 40, 9
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    cols = torch.tensor([3, 7, 8, 20, 33, 39])
    acts = torch.rand(n, k, generator=g, dtype=dtype).requires_grad_()
    z = torch.rand(n, cols.numel(), generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    go, ga = (torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2))
    out, aux = decode(idx, acts, w, cols, z)
    assert aux is not None
    grads = torch.autograd.grad((out * go).sum() + (aux * ga).sum(), (acts, z, w))
    out_r, aux_r = topk_decode_reference(idx, acts, w), z @ w[cols]
    refs = torch.autograd.grad((out_r * go).sum() + (aux_r * ga).sum(), (acts, z, w))
    _close(out, out_r, dtype)
    _close(aux, aux_r, dtype)
    for a, r in zip(grads, refs, strict=True):
        _close(a, r, dtype)
    assert grads[2][cols].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias_shift", [0.0, -3.0])
def test_topk_encode_matches_autograd(
    backend: str, small_chunks: None, dtype: torch.dtype, bias_shift: float
) -> None:
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
    pre = F.linear(x, w, b).detach()
    idx = torch.cat(
        [pre.topk(3, 1).indices, pre[:, 20:].topk(4, 1).indices + 20, pre.topk(12, 1).indices], 1
    )
    out = encoder_select(x, w, b, idx)
    out_r = encoder_select_reference(x, w, b, idx)
    _close(out, out_r, dtype)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    gs = torch.autograd.grad(out, (x, w, b), grad)
    gs_r = torch.autograd.grad(out_r, (x, w, b), grad)
    for a, r in zip(gs, gs_r, strict=True):
        _close(a, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_grad", [False, True])
def test_encoder_grad_sparse_dense_and_pre_bias(
    backend: str, dtype: torch.dtype, x_grad: bool
) -> None:
    """x_in = x - b_pre with a sparse set and a dense column code: every gradient (x, b_pre,
    W_enc, b_enc) equals autograd through relu(linear(x - b_pre)). b_pre's gradient comes from
    ``-W_enc^T grad_b_enc`` without forming grad_x: fails if it is dropped or has the wrong sign
    (the b_dec gradient through the encoder)."""
    g = torch.Generator().manual_seed(5)
    n, d, m = 21, 6, 25
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(x_grad)
    b_pre = torch.randn(d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(m, generator=g, dtype=dtype) - 0.3).requires_grad_()
    cols = torch.tensor([1, 4, 5, 11, 17, 24])
    x_in = (x - b_pre).detach()
    sel = topk_select(x_in, w, b, 3, aux_cols=cols, k_aux=2)
    assert sel.aux_z is not None
    vals, z = encoder_grad(x, b_pre, w, b, x_in, sel.indices, sel.values, cols, sel.aux_z)
    assert z is not None
    pre = F.relu(F.linear(x - b_pre, w, b))
    vals_r = pre.gather(1, sel.indices)
    z_r = pre[:, cols] * (sel.aux_z > 0)
    _close(vals, vals_r, dtype)
    _close(z, z_r, dtype)
    gv, gz = torch.randn(vals.shape, dtype=dtype), torch.randn(z.shape, dtype=dtype)
    params = [b_pre, w, b] + ([x] if x_grad else [])
    got = torch.autograd.grad((vals * gv).sum() + (z * gz).sum(), params)
    ref = torch.autograd.grad((vals_r * gv).sum() + (z_r * gz).sum(), params)
    for a, r in zip(got, ref, strict=True):
        _close(a, r, dtype)
    assert got[0].abs().sum() > 0


def test_select_chunks_and_backends_agree(small_chunks: None) -> None:
    """Chunked oneDNN selection = one-chunk F.linear selection (values; sets per row)."""
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(19, 8, generator=g), torch.randn(33, 8, generator=g), torch.randn(33)
    cols = torch.tensor([0, 2, 3, 9, 10, 30])
    a = topk_select(x, w, b, 4, k_multi=9, aux_cols=cols, k_aux=3)
    kernels.use_onednn(False)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "CHUNK_ELEMS", 1 << 30)
            r = topk_select(x, w, b, 4, k_multi=9, aux_cols=cols, k_aux=3)
    finally:
        kernels.use_onednn(None)
    torch.testing.assert_close(a.multi_values, r.multi_values)
    assert torch.equal(a.multi_indices, r.multi_indices)
    torch.testing.assert_close(a.aux_z, r.aux_z)


@given(
    n=st.integers(1, 12),
    m=st.integers(4, 40),
    k=st.integers(1, 4),
    n_dead=st.integers(1, 40),
    k_aux=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_topk_select_matches_dense_reference(
    n: int, m: int, k: int, n_dead: int, k_aux: int, seed: int
) -> None:
    """Selection vs a dense reference on ReLU(pre): top-k values, the sorted top-4k prefix, the
    dense AuxK code (top-k_aux of the dead columns, zero elsewhere) and the sparse AuxK code.
    Fails if AuxK candidates are raw (negative) pre-acts, as SAELens, or include live latents."""
    g = torch.Generator().manual_seed(seed)
    n_dead = min(n_dead, m)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.randn(m, 5, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) - 0.5
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=g)[:n_dead]] = True
    cols = dead.nonzero().squeeze(1)
    pre = F.relu(F.linear(x, w, b))
    k4 = min(4 * k, m)
    sel = topk_select(x, w, b, k, k_multi=k4, aux_cols=cols, aux_mask=dead, k_aux=k_aux)
    assert sel.multi_values is not None and sel.aux_z is not None and sel.aux_values is not None
    torch.testing.assert_close(sel.multi_values, pre.topk(k4, 1).values)
    torch.testing.assert_close(sel.values, pre.topk(k, 1).values)
    assert torch.equal(pre.gather(1, sel.indices), sel.values)
    ka = min(k_aux, n_dead)
    ref_z = torch.zeros(n, n_dead, dtype=torch.float64)
    top = pre[:, cols].topk(ka, 1)
    ref_z.scatter_(1, top.indices, top.values)
    torch.testing.assert_close(sel.aux_z.sort(1).values, ref_z.sort(1).values)
    assert torch.equal(sel.aux_z, pre[:, cols] * (sel.aux_z > 0))
    # sparse code: the same multiset of positive values, all on dead latents
    assert sel.aux_indices is not None
    pos = sel.aux_values > 0
    assert bool(dead[sel.aux_indices[pos]].all())
    sparse_dense = _dense(sel.aux_values, sel.aux_indices, m)[:, cols]
    torch.testing.assert_close(sparse_dense.sort(1).values, ref_z.sort(1).values)


@pytest.mark.parametrize("mode", [{}, {"batch": True}, {"threshold": torch.tensor(0.3)}])
def test_topk_select_with_given_preactivations(small_chunks: None, mode: dict) -> None:
    """``pre=`` (what ``SparseCoder.encode`` passes, so the dense matrix is formed once) selects
    exactly what computing it inside does, in chunks, and leaves ``pre`` unchanged. Fails if the
    sparse AuxK masking writes into the caller's matrix (the in-place fill of the own chunk)."""
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(19, 8, generator=g), torch.randn(33, 8, generator=g), torch.randn(33)
    dead = torch.zeros(33, dtype=torch.bool)
    dead[[1, 4, 5, 20]] = True
    pre = linear(x, w, b, relu=True)
    kept = pre.clone()
    kw = {"k_multi": 9, "aux_mask": dead, "k_aux": 3, **mode}
    a = topk_select(x, w, b, 4, **kw)
    r = topk_select(x, w, b, 4, pre=pre, **kw)
    assert torch.equal(pre, kept)
    for name in ("indices", "multi_indices", "aux_indices"):
        assert torch.equal(getattr(a, name), getattr(r, name)), name
    for name in ("values", "multi_values", "aux_values"):  # chunked GEMMs round differently
        torch.testing.assert_close(getattr(a, name), getattr(r, name), msg=name)


def test_batch_topk_rows_and_jumprelu_rows() -> None:
    """BatchTopK keeps the N*k largest entries of the batch (some rows get more than k) and
    reports the smallest positive pick; JumpReLU keeps entries above the threshold. Fails for a
    per-row top-k (every row exactly k)."""
    g = torch.Generator().manual_seed(7)
    p = F.relu(torch.randn(6, 20, generator=g, dtype=torch.float64) * torch.arange(1, 7).view(6, 1))
    vals, idx, min_pos = batch_topk_rows(p, 3)
    got = _dense(vals, idx, 20)
    flat = p.reshape(-1).topk(18)
    ref = torch.zeros(120, dtype=torch.float64).scatter(0, flat.indices, flat.values).view(6, 20)
    torch.testing.assert_close(got, ref)
    assert (ref > 0).sum(1).tolist() != [3] * 6
    assert min_pos.item() == flat.values[flat.values > 0].min().item()
    thr = torch.tensor(0.7, dtype=torch.float32)
    jv, ji = jumprelu_rows(p, thr)
    torch.testing.assert_close(_dense(jv, ji, 20), p * (p > 0.7))
    none = torch.zeros(3, 5, dtype=torch.float64)
    v0, _, mp0 = batch_topk_rows(none, 2)
    assert v0.shape[0] == 3 and torch.all(v0 == 0) and mp0.item() == float("inf")


def test_half_type_fallbacks_match_embedding_bag_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paths used for bf16/fp16 (chunked index_add for grad_W, gathered dot products for
    grad_acts) give the embedding-bag paths' gradients (float64 forced through them)."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 20, (13, 4), generator=g)
    acts = torch.rand(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(13, 6, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(topk_decode(idx, acts, w), (acts, w), grad)
    monkeypatch.setattr(kernels, "_EB_DTYPES", ())
    monkeypatch.setattr(kernels, "_GATHER_CHUNK_ELEMS", 30)  # several chunks
    got = torch.autograd.grad(topk_decode(idx, acts, w), (acts, w), grad)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


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


def test_onednn_switch_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SPARSELENS_ONEDNN=0`` turns the oneDNN path off; ``use_onednn(False)`` too."""
    monkeypatch.setenv("SPARSELENS_ONEDNN", "0")
    try:
        assert kernels.use_onednn(None) is False
        monkeypatch.delenv("SPARSELENS_ONEDNN")
        assert kernels.use_onednn(False) is False
        assert kernels.use_onednn(None) == kernels._probe_onednn()
    finally:
        kernels.use_onednn(None)


# ---- finite-difference gradient checks (float64) --------------------------------------------
# torch.autograd.gradcheck perturbs every input entry by 1e-6: the selections below have gaps
# far above that, so the selected sets are locally constant and the kernels' analytic
# gradients must equal the numerical derivative of the function they compute.


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bias_shift", [0.0, -2.0])
def test_gradcheck_topk_encode(bias_shift: float) -> None:
    """d(dense top-k code)/d(x, W_enc, b_enc) by finite differences, including rows with fewer
    than k positive pre-activations (bias_shift < 0), where zero-valued picks must get no
    gradient. Fails for a straight-through backward (sparsify's fused encoder)."""
    g = _gen(21)
    n, d, m, k = 7, 4, 12, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(m, generator=g, dtype=torch.float64) + bias_shift).requires_grad_()
    if bias_shift < 0:
        pos = (F.linear(x, w, b) > 0).sum(1)
        assert (pos < k).any() and (pos > 0).any()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        acts, idx = topk_encode(x, w, b, k)
        return _dense(acts, idx, m)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_encoder_grad_sparse_dense_and_pre_bias() -> None:
    """encoder_grad with x_in = x - b_pre, a sparse set (top-k) and a dense AuxK column code:
    finite differences w.r.t. x, b_pre, W_enc and b_enc (b_enc << 0: < k positive). Fails if the
    dense code's gradient, the ReLU mask or b_pre's ``-W_enc^T grad_b`` is wrong."""
    g = _gen(22)
    n, d, m, k = 6, 4, 14, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(m, generator=g, dtype=torch.float64) - 1.0).requires_grad_()
    cols = torch.tensor([0, 3, 4, 9, 13])
    pre = F.linear(x - b_pre, w, b)
    assert ((pre > 0).sum(1) < k).any()

    def f(x: torch.Tensor, b_pre: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple:
        x_in = (x - b_pre).detach()
        sel = topk_select(x_in, w, b, k, aux_cols=cols, k_aux=2)
        vals, z = encoder_grad(x, b_pre, w, b, x_in, sel.indices, sel.values, cols, sel.aux_z)
        return _dense(vals, sel.indices, m), z

    assert torch.autograd.gradcheck(f, (x, b_pre, w, b))


def test_gradcheck_fused_decode() -> None:
    """decode's main (embedding bag, repeated indices) and dense AuxK outputs w.r.t. acts, z and
    W_dec by finite differences."""
    g = _gen(23)
    n, k, m, d = 5, 3, 9, 4
    idx = torch.randint(0, m, (n, k), generator=g)
    idx[0, 1] = idx[0, 0]  # a repeat
    cols = torch.tensor([1, 2, 7])
    acts = torch.rand(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.rand(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, zz, ww: decode(idx, a, ww, cols, zz), (acts, z, w))


def test_code_layout_sorts_entries_by_latent() -> None:
    """Every latent's bag holds exactly its (token, position) entries, in token order."""
    g = _gen(24)
    idx = torch.randint(0, 11, (9, 4), generator=g)
    lay = kernels.code_layout(idx, 11)
    assert lay.offsets[0] == 0 and lay.offsets[-1] == idx.numel()
    flat = idx.reshape(-1)
    for latent in range(11):
        entries = lay.order[lay.offsets[latent] : lay.offsets[latent + 1]]
        assert torch.all(flat[entries] == latent)
        assert entries.tolist() == (flat == latent).nonzero().squeeze(1).tolist()
        assert torch.equal(lay.tokens[lay.offsets[latent] : lay.offsets[latent + 1]], entries // 4)


def test_autograd_fallback_of_per_sample_weight_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path used off CPU (autograd of F.embedding_bag) equals the direct CPU kernel."""
    g = _gen(25)
    idx = torch.randint(0, 15, (8, 3), generator=g)
    acts = torch.rand(8, 3, generator=g, dtype=torch.float64)
    w = torch.randn(15, 5, generator=g, dtype=torch.float64)
    go = torch.randn(8, 5, generator=g, dtype=torch.float64)
    direct = kernels._per_sample_weight_grad(go, w, idx, acts)
    torch.testing.assert_close(direct, kernels._gathered_dot(go, w, idx), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(kernels, "_direct_psw_grad", lambda *a: None)
    fallback = kernels._per_sample_weight_grad(go, w, idx, acts)
    torch.testing.assert_close(fallback, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_sparse_coder_sorts_latents_once_per_step(
    monkeypatch: pytest.MonkeyPatch, multi_topk: bool
) -> None:
    """Forward + backward of a SparseCoder builds the top-k layout once, shared by the encoder
    and decoder backward (with Multi-TopK also the 4k one, shared by the encoder, whose set it
    is, and the 4k decode), and none under no_grad."""
    from sparselens.sae import SparseCoder, SparseCoderConfig

    calls: list[int] = []
    real = kernels.code_layout

    def counting(indices: torch.Tensor, m: int) -> kernels.CodeLayout:
        calls.append(indices.shape[1])
        return real(indices, m)

    monkeypatch.setattr(kernels, "code_layout", counting)
    torch.manual_seed(0)
    sae = SparseCoder(6, SparseCoderConfig(num_latents=24, k=2, multi_topk=multi_topk))
    x = torch.randn(10, 6)
    with torch.no_grad():
        sae(x)
    assert calls == []
    out = sae(x)
    (out.fvu + out.multi_topk_fvu).backward()
    assert sorted(calls) == ([2, 8] if multi_topk else [2])
