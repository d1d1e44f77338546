"""AuxK (Gao et al. 2024, arXiv 2406.04093, App. A.2) vs a dense plain-autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselens.sae import SparseCoder, SparseCoderConfig

D, M, K = 8, 40, 3


def _sae(k_aux: int = 6, seed: int = 0, **kw: object) -> SparseCoder:
    torch.manual_seed(seed)
    sae = SparseCoder(
        D, SparseCoderConfig(num_latents=M, k=K, k_aux=k_aux, **kw), dtype=torch.float64
    )
    with torch.no_grad():
        sae.b_dec.normal_(std=2.0)  # b_dec != 0 everywhere below
        sae.encoder.bias.normal_(std=0.5)
    return sae


def _dead(n_dead: int) -> torch.Tensor:
    mask = torch.zeros(M, dtype=torch.bool)
    mask[torch.randperm(M, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    return mask


def _reference(
    sae: SparseCoder,
    x: torch.Tensor,
    dead: torch.Tensor,
    *,
    add_b_dec: bool = False,
    by_target: bool = False,
    scale: bool = True,
) -> torch.Tensor:
    """Dense AuxK: top-k_aux ReLU'd dead pre-acts reconstruct e = stopgrad(y - yhat)."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    vals, idx = pre.topk(K, dim=1)
    y_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ sae.W_dec + sae.b_dec
    e = (x - y_hat).detach()
    n_dead = int(dead.sum())
    av, ai = pre.masked_fill(~dead, -1.0).topk(min(sae.k_aux, n_dead), dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, ai, av) @ sae.W_dec
    if add_b_dec:  # sparsify <= 1.3.2 (#132)
        e_hat = e_hat + sae.b_dec
    base = x if by_target else e
    loss = ((e - e_hat) ** 2).sum() / ((base - base.mean(0)) ** 2).sum()
    return loss * min(n_dead / sae.k_aux, 1.0) if scale else loss


def _x(n: int = 24) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_auxk_value_and_all_gradients_match_dense_reference() -> None:
    """b_dec != 0: fails if b_dec is added into the aux reconstruction (sparsify <= 1.3.2)."""
    sae, x, dead = _sae(), _x(), _dead(10)
    loss = sae(x, dead_mask=dead).auxk_loss
    ref = _reference(sae, x, dead)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    wrong = _reference(sae, x, dead, add_b_dec=True)
    assert abs(loss.item() - wrong.item()) > 1e-3 * abs(ref.item())
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    g = torch.autograd.grad(loss, params)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auxk_trains_the_encoder_of_aux_latents_only() -> None:
    """AuxK reaches W_enc/b_enc of dead latents; fails for sparsify's fused backward (zero)."""
    sae, x, dead = _sae(), _x(), _dead(10)
    gw, gb = torch.autograd.grad(sae(x, dead_mask=dead).auxk_loss, [sae.W_enc, sae.b_enc])
    assert gw[dead].abs().sum() > 0 and gb[dead].abs().sum() > 0
    assert torch.all(gw[~dead] == 0) and torch.all(gb[~dead] == 0)


def test_auxk_normalised_by_residual_variance_not_target_variance() -> None:
    """Denominator Var(e) (paper, OpenAI); fails for sparsify's Var(y)."""
    sae, x, dead = _sae(), _x(), _dead(10)
    loss = sae(x, dead_mask=dead).auxk_loss.item()
    by_target = _reference(sae, x, dead, by_target=True).item()
    assert loss == pytest.approx(_reference(sae, x, dead).item(), rel=1e-10)
    assert loss != pytest.approx(by_target, rel=1e-3)
    compat = _sae(auxk_normalization="target")
    assert compat(x, dead_mask=dead).auxk_loss.item() == pytest.approx(by_target, rel=1e-10)


@pytest.mark.parametrize("n_dead", [1, 2, 5, 6, 17])
def test_auxk_scale_is_min_num_dead_over_k_aux(n_dead: int) -> None:
    """scale = min(num_dead / k_aux, 1) with k_aux = 6; fails without the scale."""
    sae, x, dead = _sae(k_aux=6), _x(), _dead(n_dead)
    loss = sae(x, dead_mask=dead).auxk_loss.item()
    unscaled = _reference(sae, x, dead, scale=False).item()
    assert loss == pytest.approx(min(n_dead / 6, 1.0) * unscaled, rel=1e-10)


def test_auxk_zero_without_dead_latents_or_mask_or_alpha() -> None:
    sae, x = _sae(), _x()
    assert sae(x).auxk_loss.item() == 0.0
    assert sae(x, dead_mask=torch.zeros(M, dtype=torch.bool)).auxk_loss.item() == 0.0
    off = _sae(auxk_alpha=0.0)
    assert off(x, dead_mask=_dead(10)).auxk_loss.item() == 0.0


def test_auxk_non_finite_becomes_zero() -> None:
    """An overflowing aux reconstruction gives inf/NaN; the loss is reported as 0."""
    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K, k_aux=8))  # float32
    dead = _dead(10)
    with torch.no_grad():
        sae.encoder.weight.mul_(1e-3)
        sae.encoder.bias.copy_(torch.where(dead, 1.0, 10.0))  # dead latents never in the top-k
        sae.W_dec[dead] = 3e38
    out = sae(torch.randn(5, D), dead_mask=dead)
    assert torch.isfinite(out.fvu) and out.auxk_loss.item() == 0.0


@pytest.mark.parametrize("n_dead", [4, 30])
def test_dense_and_sparse_aux_decode_agree(n_dead: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead-sub-dictionary GEMM path and the embedding-bag path give one loss and gradient."""
    from sparselens.sae import sparse_coder

    sae, x, dead = _sae(), _x(), _dead(n_dead)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    results = []
    for ratio in (10**6, 0):
        monkeypatch.setattr(sparse_coder, "DENSE_AUX_RATIO", ratio)
        loss = sae(x, dead_mask=dead).auxk_loss
        results.append((loss, *torch.autograd.grad(loss, params)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][0], _reference(sae, x, dead), rtol=1e-10, atol=1e-12)


def test_total_loss_gradient_matches_dense_reference_with_few_positive() -> None:
    """fvu + alpha*auxk + multi/8 with b_enc << 0 (< k positive pre-acts): every parameter's
    gradient equals dense autograd. Fails for sparsify's fused backward (straight-through on
    zero picks, no aux/4k encoder gradient)."""
    sae = _sae(multi_topk=True)
    with torch.no_grad():
        sae.encoder.bias.sub_(2.5)
    x, dead = _x(), _dead(12)
    pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    assert ((pre > 0).sum(1) < K).any()
    out = sae(x, dead_mask=dead)
    loss = out.fvu + sae.cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8

    def dense(k: int) -> torch.Tensor:
        vals, idx = pre.topk(k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, vals) @ sae.W_dec + sae.b_dec

    var = ((x - x.mean(0)) ** 2).sum()
    ref = (
        ((x - dense(K)) ** 2).sum() / var
        + sae.cfg.auxk_alpha * _reference(sae, x, dead)
        + ((x - dense(4 * K)) ** 2).sum() / var / 8
    )
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    params = list(sae.parameters())
    for a, b in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_dead", [0, 4, 6, 30])
def test_sync_free_aux_path_matches_reference(n_dead: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device-side AuxK path (no host sync; default off CPU): masked top-k_aux over all
    latents, scale as a tensor. Same loss and gradients as the dense reference, including
    num_dead < k_aux (live latents picked there must count as zero) and no dead latent (0)."""
    from sparselens.sae import sparse_coder

    monkeypatch.setattr(sparse_coder, "SYNC_FREE_AUX", True)
    sae, x, dead = _sae(), _x(), _dead(n_dead)
    loss = sae(x, dead_mask=dead).auxk_loss
    if n_dead == 0:
        assert loss.item() == 0.0
        return
    ref = _reference(sae, x, dead)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for a, b in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_fast_path_matches_float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarked configuration (float32, oneDNN where available, several row chunks,
    dense AuxK, Multi-TopK) against the float64 dense reference: loss and every gradient."""
    from sparselens.sae import kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMS", 5 * M)  # 5 rows per chunk
    sae64 = _sae(multi_topk=True)
    sae32 = SparseCoder(D, sae64.cfg)
    sae32.load_state_dict({k: v.float() for k, v in sae64.state_dict().items()})
    x, dead = _x(), _dead(12)
    out = sae32(x.float(), dead_mask=dead)
    loss = out.fvu + sae32.cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
    ref_out = sae64(x, dead_mask=dead)
    ref = (
        ref_out.fvu
        + sae64.cfg.auxk_alpha * _reference(sae64, x, dead)
        + (ref_out.multi_topk_fvu / 8)
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(loss, list(sae32.parameters())),
        torch.autograd.grad(ref, list(sae64.parameters())),
        strict=True,
    ):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def _with_rows(base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return base.detach().index_put((rows,), values)


@pytest.mark.parametrize("path", ["dense", "sparse", "sync_free"])
def test_gradcheck_auxk_wrt_dead_latents_encoder_and_decoder(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite differences of the AuxK loss w.r.t. the dead latents' encoder rows, encoder biases
    and decoder rows (b_dec != 0). The dead latents are never in any token's top-k, so the
    detached residual e does not move with them and the numerical derivative is the AuxK
    gradient itself. Fails if the encoder gets no AuxK gradient (sparsify's fused backward) or
    if it ignores the ReLU mask."""
    from torch.func import functional_call

    from sparselens.sae import sparse_coder

    if path == "sparse":
        monkeypatch.setattr(sparse_coder, "DENSE_AUX_RATIO", 0)
    if path == "sync_free":
        monkeypatch.setattr(sparse_coder, "SYNC_FREE_AUX", True)
    sae, x = _sae(k_aux=4), _x(16)
    with torch.no_grad():
        pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
        kth = pre.topk(K, dim=1).values[:, -1:]
        used = torch.zeros(M, dtype=torch.bool)
        used[pre.topk(K, dim=1).indices.reshape(-1)] = True
        # dead = never in a top-k, with a margin, and positive somewhere
        margin_ok = ((pre < kth - 1e-3) | (pre == 0)).all(0)
        candidates = (~used & margin_ok & (pre > 1e-3).any(0)).nonzero().squeeze(1)
    assert candidates.numel() >= 10
    rows = candidates[:10]  # > k_aux: the aux top-k selection matters
    dead = torch.zeros(M, dtype=torch.bool)
    dead[rows] = True
    names = dict(sae.named_parameters())

    def f(w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
        params = {
            **names,
            "encoder.weight": _with_rows(names["encoder.weight"], rows, w_enc),
            "encoder.bias": _with_rows(names["encoder.bias"], rows, b_enc),
            "W_dec": _with_rows(names["W_dec"], rows, w_dec),
        }
        return functional_call(sae, params, (x,), {"dead_mask": dead}).auxk_loss

    inputs = tuple(
        names[n].detach()[rows].clone().requires_grad_()
        for n in ("encoder.weight", "encoder.bias", "W_dec")
    )
    assert f(*inputs).item() > 0
    g_enc = torch.autograd.grad(f(*inputs), inputs[:2])
    assert all(gr.abs().sum() > 0 for gr in g_enc)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("transcode", [False, True])
def test_gradcheck_fvu_and_multi_topk_wrt_all_parameters(transcode: bool) -> None:
    """Finite differences of fvu + multi_topk_fvu / 8 w.r.t. every parameter (W_skip for the
    transcoder) with b_dec != 0 and b_enc << 0, so some tokens have fewer than k positive
    pre-activations. Fails for a straight-through encoder backward or a b_dec gradient that
    misses the encoder input path."""
    from torch.func import functional_call

    cfg: dict[str, object] = {"multi_topk": True}
    if transcode:
        cfg.update(transcode=True, skip_connection=True)
    sae, x = _sae(**cfg), _x(10)
    with torch.no_grad():
        sae.encoder.bias.sub_(1.5)
        sae.W_dec.normal_(std=0.5)
        if sae.W_skip is not None:
            sae.W_skip.normal_(std=0.2)
    y = x @ torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x_in = x if transcode else x - sae.b_dec
    pos = (F.linear(x_in, sae.W_enc, sae.b_enc) > 0).sum(1)
    assert (pos < K).any() and (pos > 0).any()
    names = [n for n, _ in sae.named_parameters()]
    args = (x, y) if transcode else (x,)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(sae, dict(zip(names, ps, strict=True)), args)
        return out.fvu + out.multi_topk_fvu / 8

    inputs = tuple(p.detach().clone().requires_grad_() for p in sae.parameters())
    assert torch.autograd.gradcheck(f, inputs)
