"""Mini-GPT: config validation, parameter count, causality, RoPE, the KV cache, hook points,
tied head, initialisation and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import sparselens.lm.model as model_mod
from sparselens.lm.model import (
    HOOK_POINTS,
    KVCache,
    MiniGPT,
    MiniGPTConfig,
    apply_rotary,
    rotary_tables,
)
from sparselens.train.config import format_validation_error

TEACHING = {"vocab_size": 64, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256}


def small(**kw) -> MiniGPTConfig:
    return MiniGPTConfig(**{**TEACHING, "context_len": 32, **kw})


def make(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(small(**kw)).to(dtype).eval()


def tokens(*shape: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- config --------------------------------------------------------------------------------------
def test_teaching_config_and_defaults():
    cfg = small()
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.context_len) == (
        64,
        4,
        2,
        256,
        32,
    )
    assert cfg.head_dim == 16
    d = MiniGPTConfig(vocab_size=65)
    assert (d.n_layers, d.n_heads, d.d_model, d.d_ff, d.context_len) == (4, 4, 128, 512, 64)
    assert (d.rope_base, d.dropout, d.layer_norm_eps) == (10000.0, 0.0, 1e-5)
    with pytest.raises(ValidationError):
        cfg.d_model = 32  # frozen


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"d_model": 66, "n_heads": 4}, "d_model must be divisible by n_heads"),
        ({"d_model": 12, "n_heads": 4}, "head size 3"),
        ({"d_model": 0}, "d_model must be an integer >= 2"),
        ({"n_heads": 0}, "n_heads must be an integer >= 1"),
        ({"n_layers": -1}, "n_layers must be an integer >= 1"),
        ({"d_ff": 0}, "d_ff must be an integer >= 1"),
        ({"context_len": 0}, "context_len must be an integer >= 1"),
        ({"vocab_size": 0}, "vocab_size must be an integer >= 1"),
        ({"dropout": 1.0}, "dropout must be >= 0 and < 1"),
        ({"rope_base": 1.0}, "rope_base must be > 1"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
        ({"d_model": 64.5}, "d_model must be an integer"),
        ({"n_head": 4}, "unknown setting 'n_head'"),
    ],
)
def test_config_errors_name_field_and_range(kw, needle):
    with pytest.raises(ValidationError) as info:
        MiniGPTConfig(**{**TEACHING, **kw})
    assert needle in format_validation_error(info.value, MiniGPTConfig)
    field = next(iter(kw))
    if field != "n_head":
        assert field in str(info.value)


def test_vocab_size_is_required():
    with pytest.raises(ValidationError, match="vocab_size"):
        MiniGPTConfig()


# -- size, shapes, input checks ------------------------------------------------------------------
def test_teaching_parameter_count_is_103680():
    assert MiniGPT(small()).num_parameters() == 103_680


def test_parameter_count_formula_default_config():
    c = MiniGPTConfig(vocab_size=65)
    d, f = c.d_model, c.d_ff
    per_layer = 2 * 2 * d + 4 * d * d + d * f + f + f * d + d
    assert MiniGPT(c).num_parameters() == c.vocab_size * d + c.n_layers * per_layer + 2 * d


def test_output_shapes_batched_and_unbatched():
    m = make()
    x = tokens(3, 10)
    assert m(x).shape == (3, 10, 64)
    assert m(x[1]).shape == (10, 64)
    torch.testing.assert_close(m(x[1]), m(x)[1], rtol=0, atol=1e-6)
    assert m(x.to(torch.int32)).shape == (3, 10, 64)


def test_bad_tokens_raise():
    m = make()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 63\].*got 64"):
        m(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r"\[0, 63\].*got -1"):
        m(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer dtype"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \(T,\) or \(B, T\)"):
        m(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 33 exceeds context_len 32"):
        m(tokens(1, 33))


# -- causality, tied head, init ------------------------------------------------------------------
def test_changing_a_later_token_never_changes_earlier_logits():
    m = make()
    x = tokens(2, 32)
    base = m(x)
    for t in (0, 7, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 64
        out = m(y)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_head_is_tied_to_embedding():
    m = make()
    assert m.head.weight is m.embed.weight
    assert m.head.bias is None
    loss = m(tokens(1, 8)).sum()
    loss.backward()
    assert m.embed.weight.grad is not None
    assert sum(p is m.embed.weight for p in m.parameters()) == 1


def test_gpt2_initialisation():
    torch.manual_seed(0)
    c = MiniGPTConfig(vocab_size=256, n_layers=8)
    m = MiniGPT(c)
    resid = 0.02 / math.sqrt(2 * c.n_layers)
    for b in m.blocks:
        assert b.attn.out_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert b.mlp.fc_out.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert b.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert b.mlp.fc_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(b.mlp.fc_in.bias, torch.zeros(c.d_ff))
        assert torch.equal(b.ln1.weight, torch.ones(c.d_model))
    assert m.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_only_in_training():
    m = make(dropout=0.3)
    x = tokens(2, 16)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


# -- rotary position embeddings ------------------------------------------------------------------
def _rot(x: torch.Tensor, pos: int | torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    pos = torch.as_tensor(pos).reshape(-1)
    cos, sin = rotary_tables(pos, x.shape[-1], base, dtype=x.dtype)
    return apply_rotary(x, cos, sin)


def test_rope_scores_depend_only_on_position_difference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 32, generator=g, dtype=torch.float64)
    for m, n in [(0, 0), (5, 2), (2, 5), (17, 30)]:
        ref = (_rot(q, m) * _rot(k, n)).sum()
        for shift in (1, 9, 1000):
            got = (_rot(q, m + shift) * _rot(k, n + shift)).sum()
            assert got.item() == pytest.approx(ref.item(), abs=1e-9)
    # ... and do depend on the difference
    s1 = (_rot(q, 3) * _rot(k, 0)).sum().item()
    s2 = (_rot(q, 4) * _rot(k, 0)).sum().item()
    assert abs(s1 - s2) > 1e-3


def test_rope_is_a_rotation_and_identity_at_zero():
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(_rot(x, torch.zeros(5, dtype=torch.long)), x)
    y = _rot(x, torch.arange(5))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # pair (j, j + 8) turns by position * base^(-2j/16)
    j, p = 3, 4
    ang = p * 10000.0 ** (-2 * j / 16)
    x1, x2 = x[p, j], x[p, j + 8]
    assert y[p, j].item() == pytest.approx((x1 * math.cos(ang) - x2 * math.sin(ang)).item())
    assert y[p, j + 8].item() == pytest.approx((x2 * math.cos(ang) + x1 * math.sin(ang)).item())
    with pytest.raises(ValueError, match="even"):
        rotary_tables(torch.arange(3), 5)


def _context_order_matters(m: MiniGPT) -> bool:
    """Permute the prefix, keep the last token. Without positions one causal attention layer
    is blind to the order of what the last token attends to (deeper causal stacks are not:
    earlier tokens see different prefixes), so the check uses one layer."""
    x = tokens(1, 12)
    perm = torch.cat(
        [torch.randperm(11, generator=torch.Generator().manual_seed(3)), torch.tensor([11])]
    )
    a, b = m(x)[0, -1], m(x[:, perm])[0, -1]
    return not torch.allclose(a, b, atol=1e-5)


def test_context_order_matters_and_the_check_catches_a_model_without_rope(monkeypatch):
    m = make(n_layers=1)
    assert _context_order_matters(m)
    monkeypatch.setattr(model_mod, "apply_rotary", lambda x, cos, sin: x)  # no positions at all
    assert not _context_order_matters(m)


# -- KV cache ------------------------------------------------------------------------------------
def _decode_in_chunks(m: MiniGPT, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    cache = m.new_cache(batch_size=x.shape[0])
    outs, t = [], 0
    for s in sizes:
        outs.append(m(x[:, t : t + s], cache=cache))
        t += s
        assert cache.length == t
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
@pytest.mark.parametrize(
    "sizes",
    [[8] + [1] * 24, [1] * 32, [5, 3, 7, 1, 16], [32]],
    ids=["prefill+tokens", "tokens", "chunks", "one-chunk"],
)
def test_kv_cache_matches_full_recomputation(dtype, atol, sizes):
    m = make(dtype=dtype)
    x = tokens(2, 32)
    with torch.no_grad():
        full = m(x)
        inc = _decode_in_chunks(m, x, sizes)
    assert inc.dtype == dtype
    torch.testing.assert_close(inc, full, rtol=0, atol=atol)


def test_kv_cache_check_catches_positions_not_offset_by_cache_length(monkeypatch):
    m = make()
    x = tokens(1, 20)
    orig = m._rope
    monkeypatch.setattr(m, "_rope", lambda start, n: orig(0, n))  # wrong: ignores cache.length
    with torch.no_grad():
        full = m(x)
        inc = _decode_in_chunks(m, x, [4] + [1] * 16)
    assert torch.allclose(inc[:, :4], full[:, :4], atol=1e-5)  # prefill is right ...
    assert not torch.allclose(inc, full, atol=1e-3)  # ... the continuation is not


def test_kv_cache_check_catches_a_missing_chunk_mask(monkeypatch):
    """A chunk appended after old tokens needs a causal mask; full attention breaks causality."""
    m = make()
    x = tokens(1, 12)
    real = F.scaled_dot_product_attention

    def unmasked(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        return real(q, k, v, dropout_p=dropout_p, is_causal=is_causal)

    with torch.no_grad():
        full = m(x)
        monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", unmasked)
        inc = _decode_in_chunks(m, x, [4, 8])
    assert not torch.allclose(inc, full, atol=1e-3)


def test_kv_cache_unbatched_reset_and_crop():
    m = make()
    x = tokens(16)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        assert isinstance(cache, KVCache) and cache.length == 0 and cache.capacity == 32
        m(tokens(10, seed=9), cache=cache)
        cache.reset()
        first = m(x[:10], cache=cache)
        cache.crop(6)
        rest = m(x[6:], cache=cache)
    assert cache.length == 16
    torch.testing.assert_close(first, full[:10], rtol=0, atol=1e-5)
    torch.testing.assert_close(rest, full[6:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"crop length must be in \[0, 16\]"):
        cache.crop(17)


def test_kv_cache_overflow_and_mismatch_raise():
    m = make()
    cache = m.new_cache(batch_size=2)
    with torch.no_grad():
        m(tokens(2, 30), cache=cache)
        with pytest.raises(ValueError, match="30 cached \\+ 3 new tokens exceeds context_len 32"):
            m(tokens(2, 3), cache=cache)
        assert cache.length == 30  # a refused call leaves the cache as it was
        m(tokens(2, 2), cache=cache)
        with pytest.raises(ValueError, match="exceeds context_len 32"):
            m(tokens(2, 1), cache=cache)
        with pytest.raises(ValueError, match="does not fit this model/batch"):
            m(tokens(3, 1), cache=m.new_cache(batch_size=2))
        with pytest.raises(ValueError, match="does not fit"):
            m(tokens(1, 1), cache=make(n_layers=3).new_cache())
        with pytest.raises(ValueError, match="float64"):
            m(tokens(1, 1), cache=m.new_cache(dtype=torch.float64))


# -- hook points ---------------------------------------------------------------------------------
def test_hook_points_exist_and_have_the_documented_shapes():
    m = make()
    c = m.config
    paths = m.hook_points()
    assert len(paths) == 3 + (len(HOOK_POINTS) - 3) * c.n_layers
    for p in ("blocks.0.mlp.fc_in", "blocks.0.mlp.act", "blocks.1.resid_post", "ln_f"):
        assert p in paths
    dims = {"d_model": c.d_model, "d_ff": c.d_ff, "vocab_size": c.vocab_size}
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.get_submodule(p).register_forward_hook(
            lambda mod, inp, out, p=p: seen.__setitem__(p, out)
        )
        for p in paths
    ]
    x = tokens(3, 7)
    logits = m(x)
    for h in handles:
        h.remove()
    assert set(seen) == set(paths)
    for p in paths:
        template = p
        for i in range(c.n_layers):
            template = template.replace(f"blocks.{i}.", "blocks.{i}.")
        last = HOOK_POINTS[template].split(")")[0].split(", ")[-1]
        assert seen[p].shape == (3, 7, dims[last]), p
    assert isinstance(m.get_submodule("blocks.0.mlp.act"), torch.nn.GELU)
    assert isinstance(m.get_submodule("blocks.1.resid_post"), torch.nn.Identity)
    # the last residual stream through ln_f and the tied head is the logits
    resid = seen[f"blocks.{c.n_layers - 1}.resid_post"]
    torch.testing.assert_close(m.ln_f(resid) @ m.embed.weight.T, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        F.gelu(seen["blocks.0.mlp.fc_in"]), seen["blocks.0.mlp.act"], rtol=0, atol=0
    )


def test_a_hook_can_replace_the_residual_stream():
    m = make()
    x = tokens(1, 9)
    base = m(x)
    h = m.blocks[1].resid_post.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    zeroed = m(x)
    h.remove()
    torch.testing.assert_close(zeroed, m.head(m.ln_f(torch.zeros(1, 9, 64))), rtol=0, atol=1e-6)
    assert torch.equal(m(x), base)


# -- training ------------------------------------------------------------------------------------
def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = MiniGPT(small(vocab_size=16, context_len=16)).train()
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 16, (64,), generator=g).repeat(4)  # a random, memorisable text
    starts = torch.arange(0, len(corpus) - 17, 8)
    x = torch.stack([corpus[s : s + 16] for s in starts])
    y = torch.stack([corpus[s + 1 : s + 17] for s in starts])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    with torch.no_grad():
        before = loss_fn().item()
    assert before == pytest.approx(math.log(16), abs=0.15)  # the initialisation is near uniform
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < 0.8 * before, (before, after)
