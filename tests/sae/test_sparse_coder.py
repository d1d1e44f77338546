"""SparseCoder: config, parameters, shapes, encoder/decoder semantics, Multi-TopK, decoder norm."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from sparselens.sae import ForwardOutput, SparseCoder, SparseCoderConfig


def _sae(d: int = 8, m: int = 32, k: int = 4, seed: int = 0, **kw: object) -> SparseCoder:
    torch.manual_seed(seed)
    return SparseCoder(d, SparseCoderConfig(num_latents=m, k=k, **kw), dtype=torch.float64)


def _dense_ref(sae: SparseCoder, x: torch.Tensor, k: int, with_skip: bool = True) -> torch.Tensor:
    """Plain dense autograd reconstruction: scatter the top-k ReLU'd pre-acts, then a GEMM."""
    x_in = x if sae.cfg.transcode else x - sae.b_dec
    pre = F.relu(x_in @ sae.W_enc.T + sae.b_enc)
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    out = z @ sae.W_dec + sae.b_dec
    if with_skip and sae.W_skip is not None:
        out = out + x @ sae.W_skip.T
    return out


def _fvu_np(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    yn, hn = y.detach().numpy(), y_hat.detach().numpy()
    return float(((yn - hn) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum())


def test_config_defaults_match_sparsify() -> None:
    cfg = SparseCoderConfig()
    assert (cfg.activation, cfg.expansion_factor, cfg.num_latents, cfg.k) == ("topk", 32, 0, 32)
    assert cfg.normalize_decoder and not (cfg.multi_topk or cfg.skip_connection or cfg.transcode)
    assert cfg.auxk_alpha == 1 / 32 and cfg.dead_tokens == 10_000_000
    assert cfg.fire_threshold == 1e-3 and cfg.auxk_normalization == "residual"
    assert cfg.resolve_k_aux(768) == 512 and cfg.resolve_k_aux(512) == 256
    assert cfg.resolve_k_aux(2) == 1 and SparseCoderConfig(k_aux=7).resolve_k_aux(768) == 7


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"k": 0}, "k"),
        ({"activation": "groupmax"}, "activation"),
        ({"expansion_factor": 0}, "expansion_factor"),
        ({"auxk_alpha": -1.0}, "auxk_alpha"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        SparseCoderConfig(**kw)


def test_k_larger_than_latents_is_one_line_error() -> None:
    with pytest.raises(pydantic.ValidationError, match="k must be <= num_latents"):
        SparseCoderConfig(num_latents=8, k=9)
    with pytest.raises(ValueError, match=r"^k must be <= num_latents \(16\), got 20$"):
        SparseCoder(4, SparseCoderConfig(expansion_factor=4, k=20))


def test_parameters_have_sparsify_names_and_shapes() -> None:
    sae = SparseCoder(6, SparseCoderConfig(expansion_factor=2, k=2, skip_connection=True))
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert shapes == {
        "encoder.weight": (12, 6),
        "encoder.bias": (12,),
        "W_dec": (12, 6),
        "b_dec": (6,),
        "W_skip": (6, 6),
    }
    assert sae.num_latents == 12 and sae.W_enc is sae.encoder.weight
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0) and torch.all(sae.W_skip == 0)
    assert "W_skip" not in SparseCoder(6, SparseCoderConfig(expansion_factor=2, k=2)).state_dict()


def test_sae_decoder_init_is_unit_norm_encoder_transpose() -> None:
    sae = _sae()
    w = sae.W_enc.detach()
    torch.testing.assert_close(sae.W_dec.detach(), w / w.norm(dim=1, keepdim=True))
    raw = _sae(normalize_decoder=False)
    torch.testing.assert_close(raw.W_dec.detach(), raw.W_enc.detach())


def test_shapes_and_forward_matches_dense_reference() -> None:
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    x = torch.randn(20, 8, dtype=torch.float64)
    out = sae(x)
    assert isinstance(out, ForwardOutput)
    assert out.sae_out.shape == (20, 8) and out.latent_acts.shape == (20, 4)
    assert out.latent_indices.shape == (20, 4) and out.latent_indices.dtype == torch.int64
    assert out.fvu.shape == out.auxk_loss.shape == out.multi_topk_fvu.shape == ()
    assert out.auxk_loss == 0 and out.multi_topk_fvu == 0
    ref = _dense_ref(sae, x, 4)
    torch.testing.assert_close(out.sae_out, ref, rtol=1e-10, atol=1e-10)
    assert out.fvu.item() == pytest.approx(_fvu_np(x, ref), rel=1e-10)
    g = torch.autograd.grad(out.fvu, list(sae.parameters()))
    y = x
    ref_fvu = ((y - ref) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    g_ref = torch.autograd.grad(ref_fvu, list(sae.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_3d_input_equals_flattened() -> None:
    sae = _sae(multi_topk=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    o3 = sae(x, dead_mask=dead)
    o2 = sae(x.reshape(15, 8), dead_mask=dead)
    assert o3.sae_out.shape == (3, 5, 8) and o3.latent_acts.shape == (3, 5, 4)
    torch.testing.assert_close(o3.sae_out.reshape(15, 8), o2.sae_out)
    torch.testing.assert_close(o3.latent_acts.reshape(15, 4), o2.latent_acts)
    assert torch.equal(o3.latent_indices.reshape(15, 4), o2.latent_indices)
    for a, b in zip(o3[3:], o2[3:], strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_one_line_errors() -> None:
    sae = _sae()
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        sae(torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        sae(torch.randn(4, 7, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sae(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        sae(torch.zeros(4, 8, dtype=torch.float64), x)
    x[1, 2] = -float("inf")
    with pytest.raises(ValueError, match="finite"):
        sae(x)
    with pytest.raises(ValueError, match="dead_mask"):
        sae(torch.zeros(4, 8, dtype=torch.float64), dead_mask=torch.zeros(5, dtype=torch.bool))


def test_transcoder_no_b_dec_subtraction_and_zero_decoder() -> None:
    sae = _sae(transcode=True, skip_connection=True)
    assert torch.all(sae.W_dec == 0)
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.b_dec.normal_()
        sae.W_skip.normal_()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = torch.randn(10, 8, dtype=torch.float64)
    out = sae(x, y)
    ref = _dense_ref(sae, x, 4)  # transcode: pre-acts from x itself
    torch.testing.assert_close(out.sae_out, ref)
    assert out.fvu.item() == pytest.approx(_fvu_np(y, ref), rel=1e-10)
    # the SAE variant (x - b_dec) gives different pre-acts, so this pins the transcoder path
    pre_sae = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(4).values
    assert not torch.allclose(out.latent_acts.sort(1).values, pre_sae.sort(1).values)


def test_init_b_dec_sets_data_mean() -> None:
    sae = _sae()
    data = torch.randn(4, 6, 8, dtype=torch.float64) + 3
    sae.init_b_dec(data)
    torch.testing.assert_close(sae.b_dec.detach(), data.reshape(-1, 8).mean(0))
    tc = _sae(transcode=True)
    inputs = torch.randn(30, 8, dtype=torch.float64) + 1
    tc.init_b_dec(data, inputs)
    torch.testing.assert_close(tc.b_enc.detach(), -(tc.W_enc @ inputs.mean(0)).detach())


def test_multi_topk_returns_k_outputs_and_dense_4k_fvu() -> None:
    """multi_topk_fvu equals the dense 4k reference with W_skip; outputs stay k-sparse.

    Fails for sparsify, which returns the 4k outputs and leaves W_skip out of the 4k decode.
    """
    sae = _sae(m=40, k=3, multi_topk=True, skip_connection=True)
    with torch.no_grad():
        sae.W_skip.normal_(std=0.1)
        sae.b_dec.normal_()
    x = torch.randn(16, 8, dtype=torch.float64)
    out = sae(x)
    assert out.latent_acts.shape == (16, 3) and out.latent_indices.shape == (16, 3)
    torch.testing.assert_close(out.sae_out, _dense_ref(sae, x, 3))
    ref4 = _dense_ref(sae, x, 12)
    ref_mt = ((x - ref4) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.multi_topk_fvu, ref_mt, rtol=1e-10, atol=1e-10)
    assert out.multi_topk_fvu.item() != pytest.approx(
        _fvu_np(x, _dense_ref(sae, x, 12, with_skip=False)), rel=1e-6
    )
    # the 4k term trains the encoder too, exactly as dense autograd
    g = torch.autograd.grad(out.multi_topk_fvu, [sae.W_enc, sae.b_enc])
    g_ref = torch.autograd.grad(ref_mt, [sae.W_enc, sae.b_enc])
    assert g[0].abs().sum() > 0
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_batchtopk_selects_n_times_k_over_the_batch() -> None:
    sae = _sae(m=32, k=4, activation="batchtopk")
    x = torch.randn(10, 8, dtype=torch.float64)
    out = sae(x)
    x_in = x - sae.b_dec
    pre = F.relu(x_in @ sae.W_enc.T + sae.b_enc)
    vals, flat = pre.reshape(-1).topk(40)
    z = torch.zeros(320, dtype=torch.float64).scatter(0, flat, vals).reshape(10, 32)
    dense = torch.zeros(10, 32, dtype=torch.float64).scatter_add(
        1, out.latent_indices, out.latent_acts
    )
    torch.testing.assert_close(dense, z)
    torch.testing.assert_close(out.sae_out, z @ sae.W_dec + sae.b_dec)


def test_decoder_gradient_projection_and_unit_norm() -> None:
    """After projection each row is orthogonal to its gradient; fails without the projection."""
    sae = _sae()
    x = torch.randn(25, 8, dtype=torch.float64)
    sae(x).fvu.backward()
    g0 = sae.W_dec.grad.clone()
    w = sae.W_dec.detach()
    assert (g0 * w).sum(1).abs().max() > 1e-6
    sae.remove_gradient_parallel_to_decoder_directions()
    g = sae.W_dec.grad
    torch.testing.assert_close((g * w).sum(1), torch.zeros(32, dtype=torch.float64))
    torch.testing.assert_close(g, g0 - (g0 * w).sum(1, keepdim=True) * w)  # unit rows
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1, dtype=torch.float64) * 5 + 0.1)
    sae.set_decoder_norm_to_unit_norm()
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(32, dtype=torch.float64))


def test_projection_requires_grad() -> None:
    with pytest.raises(ValueError, match="backward"):
        _sae().remove_gradient_parallel_to_decoder_directions()


def test_single_token_forward_is_finite() -> None:
    sae = _sae(multi_topk=True)
    out = sae(torch.randn(1, 8, dtype=torch.float64), dead_mask=torch.ones(32, dtype=torch.bool))
    assert all(torch.isfinite(t).all() for t in out)


def test_float32_default_and_dtype_cast() -> None:
    sae = SparseCoder(8, SparseCoderConfig(expansion_factor=2, k=2))
    assert sae.dtype == torch.float32
    out = sae(torch.randn(3, 8, dtype=torch.float64))
    assert out.sae_out.dtype == torch.float32


def test_total_variance_makes_micro_batches_add_up() -> None:
    """Chunks normalised by the full batch's variance sum to the full-batch FVU (sparsify 1.3.2)."""
    sae = _sae()
    x = torch.randn(30, 8, dtype=torch.float64)
    full = sae(x).fvu
    tv = ((x - x.mean(0)) ** 2).sum()
    parts = sum(sae(c, total_variance=tv).fvu for c in x.split([7, 13, 10]))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)


def test_encode_returns_k_sparse_code_and_relu_preacts() -> None:
    sae = _sae()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    enc = sae.encode(x)
    pre = F.relu((x.reshape(6, 8) - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(enc.pre_acts, pre.detach())
    assert enc.top_acts.shape == enc.top_indices.shape == (6, 4)
    torch.testing.assert_close(enc.top_acts.sort(1).values, pre.topk(4).values.sort(1).values)
    ref = _dense_ref(sae, x.reshape(6, 8), 4)
    torch.testing.assert_close(sae.decode(enc.top_acts, enc.top_indices), ref)
