"""Mini-GPT: a small decoder-only transformer with rotary positions and a key/value cache.

One readable file in the spirit of nanoGPT's ``model.py``: a config object, the blocks, the model.

* Transformer decoder with causal multi-head self-attention (Vaswani et al. 2017, "Attention Is
  All You Need"), computed by :func:`torch.nn.functional.scaled_dot_product_attention`.
* Pre-LayerNorm residual blocks, a final LayerNorm and a head tied to the token embedding
  (Radford et al. 2019, GPT-2): ``x += attn(ln1(x)); x += mlp(ln2(x)); logits = ln_f(x) E^T``.
* Rotary position embeddings on queries and keys, no position table (Su et al. 2021, RoFormer,
  eq. 34, in the "rotate half" pairing of GPT-NeoX): ``q_m . k_n`` depends on ``m - n`` only.
* GELU MLP ``Linear(d, d_ff) -> GELU -> Linear(d_ff, d)`` (Hendrycks & Gimpel 2016).
* GPT-2 / nanoGPT initialisation: every weight ~ N(0, 0.02), biases 0, and the two residual
  projections (``attn.out_proj``, ``mlp.fc_out``) ~ N(0, 0.02 / sqrt(2 n_layers)).
* :class:`KVCache`: preallocated key/value buffers of ``context_len`` positions per layer, so a
  decoding step costs one token's work; new tokens get RoPE positions from ``cache.length`` on.

The course's teaching model ``MiniGPTConfig(vocab_size=64, d_model=64, n_heads=4, n_layers=2,
d_ff=256, context_len=32)`` has exactly 103,680 parameters (bias-free Q/K/V/O, LayerNorm weight
and bias, biased MLP, tied head).

HOOK_POINTS
-----------
Named submodules that tools hook into (``model.get_submodule(path)``, forward hooks; a forward
hook that returns a tensor replaces the output, e.g. to splice an SAE in). ``{i}`` is the block
index ``0 .. n_layers - 1``. Shapes are the module outputs; ``B`` is the batch (1 for a ``(T,)``
input), ``T`` the number of tokens in this call (only the new tokens when a cache is used).

| path                       | output             | what it is |
|----------------------------|--------------------|---|
| `embed`                    | (B, T, d_model)    | token embeddings (the tied head's weight) |
| `blocks.{i}.resid_pre`     | (B, T, d_model)    | residual stream entering block i (identity) |
| `blocks.{i}.ln1`           | (B, T, d_model)    | LayerNorm before attention |
| `blocks.{i}.attn.q_proj`   | (B, T, d_model)    | queries, heads concatenated, before RoPE |
| `blocks.{i}.attn.k_proj`   | (B, T, d_model)    | keys, heads concatenated, before RoPE |
| `blocks.{i}.attn.v_proj`   | (B, T, d_model)    | values, heads concatenated |
| `blocks.{i}.attn.out_proj` | (B, T, d_model)    | attention output projection |
| `blocks.{i}.attn`          | (B, T, d_model)    | attention sublayer output (after dropout) |
| `blocks.{i}.resid_mid`     | (B, T, d_model)    | residual after the attention add (identity) |
| `blocks.{i}.ln2`           | (B, T, d_model)    | LayerNorm before the MLP |
| `blocks.{i}.mlp.fc_in`     | (B, T, d_ff)       | MLP pre-activations |
| `blocks.{i}.mlp.act`       | (B, T, d_ff)       | MLP neurons: GELU(fc_in) |
| `blocks.{i}.mlp.fc_out`    | (B, T, d_model)    | MLP output projection |
| `blocks.{i}.mlp`           | (B, T, d_model)    | MLP sublayer output (after dropout) |
| `blocks.{i}.resid_post`    | (B, T, d_model)    | residual after the MLP add (identity) |
| `ln_f`                     | (B, T, d_model)    | final LayerNorm |
| `head`                     | (B, T, vocab_size) | logits (weight is `embed.weight`) |

``blocks.{n_layers-1}.resid_post`` through ``ln_f`` and ``head`` gives the logits exactly.
The same table is :data:`HOOK_POINTS`; :meth:`MiniGPT.hook_points` expands it for one model.

Default configuration
---------------------
Everything but ``vocab_size`` has a default: nanoGPT's CPU recipe for character-level
Shakespeare (``train_shakespeare_char.py`` on CPU): 4 layers, 4 heads, d_model 128,
d_ff 4 d_model = 512, context 64, no dropout (such short runs underfit, they do not overfit);
800k parameters at 65 symbols. Checked on a 640k-character English text (vim's manual, 117 symbols,
AdamW lr 1e-3 -> 1e-4 cosine, batch 12 x 64, one thread, equal CPU time per model, validation
loss in nats/char):

| model                       | params | 2 CPU-min | 6 CPU-min |
|-----------------------------|-------:|----------:|----------:|
| 4L d128, context 64         |   806k |     1.680 | **1.491** |
| 4L d128, context 128 (b 6)  |   806k |     1.706 |           |
| 3L d128, context 128 (b 6)  |   609k |     1.625 |     1.502 |
| 2L d128, context 128 (b 6)  |   411k |           |     1.516 |
| teaching 2L d64, context 64 |   107k | **1.616** |     1.547 |
| 6L d192, context 128 (b 6)  |  2.69M |     1.945 |           |

Below about two CPU-minutes the teaching size learns fastest; from a few minutes on the default
wins, and at equal compute a 64-token context beat 128 (more windows per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

HOOK_POINTS: dict[str, str] = {
    "embed": "(B, T, d_model) token embeddings",
    "blocks.{i}.resid_pre": "(B, T, d_model) residual stream entering block i",
    "blocks.{i}.ln1": "(B, T, d_model) LayerNorm before attention",
    "blocks.{i}.attn.q_proj": "(B, T, d_model) queries (heads concatenated), before RoPE",
    "blocks.{i}.attn.k_proj": "(B, T, d_model) keys (heads concatenated), before RoPE",
    "blocks.{i}.attn.v_proj": "(B, T, d_model) values (heads concatenated)",
    "blocks.{i}.attn.out_proj": "(B, T, d_model) attention output projection",
    "blocks.{i}.attn": "(B, T, d_model) attention sublayer output",
    "blocks.{i}.resid_mid": "(B, T, d_model) residual stream after the attention add",
    "blocks.{i}.ln2": "(B, T, d_model) LayerNorm before the MLP",
    "blocks.{i}.mlp.fc_in": "(B, T, d_ff) MLP pre-activations",
    "blocks.{i}.mlp.act": "(B, T, d_ff) MLP neurons, GELU(fc_in)",
    "blocks.{i}.mlp.fc_out": "(B, T, d_model) MLP output projection",
    "blocks.{i}.mlp": "(B, T, d_model) MLP sublayer output",
    "blocks.{i}.resid_post": "(B, T, d_model) residual stream after block i",
    "ln_f": "(B, T, d_model) final LayerNorm",
    "head": "(B, T, vocab_size) logits; weight tied to embed.weight",
}
"""Hook point path templates (``{i}`` = block index) -> output shape and meaning."""


class MiniGPTConfig(BaseModel):
    """Architecture of a :class:`MiniGPT`; frozen, validated on construction.

    Defaults (all but ``vocab_size``) are nanoGPT's CPU recipe (see the module docstring); the
    teaching model is ``MiniGPTConfig(vocab_size=64, d_model=64, n_heads=4, n_layers=2,
    d_ff=256, context_len=32)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    vocab_size: int = Field(ge=1, le=2**24, description="number of token ids (required)")
    d_model: int = Field(128, ge=2, le=2**16, description="residual stream width")
    n_heads: int = Field(4, ge=1, le=1024, description="attention heads; divides d_model")
    n_layers: int = Field(4, ge=1, le=1024, description="transformer blocks")
    d_ff: int = Field(512, ge=1, le=2**18, description="MLP hidden width")
    context_len: int = Field(64, ge=1, le=2**20, description="maximum sequence length")
    rope_base: float = Field(10000.0, gt=1.0, description="RoPE base: theta_i = base^(-2i/d_head)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability (training only)")
    layer_norm_eps: float = Field(1e-5, gt=0.0, le=0.1, description="LayerNorm epsilon")

    @model_validator(mode="after")
    def _heads(self) -> MiniGPTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, "
                f"n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                "d_model / n_heads (the head size) must be even for rotary embeddings, got "
                f"d_model={self.d_model}, n_heads={self.n_heads} (head size "
                f"{self.d_model // self.n_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Size of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads


# -- rotary position embeddings ------------------------------------------------------------------
def rotary_tables(
    positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """RoPE tables ``(cos, sin)``, each ``(len(positions), head_dim)`` (Su et al. 2021).

    Pair ``(j, j + head_dim/2)`` turns by ``position * theta_j`` with
    ``theta_j = base^(-2j/head_dim)``. Both tables repeat the ``head_dim/2`` angles twice and
    ``sin`` carries the rotation's sign (first half negated), the layout :func:`apply_rotary`
    uses. Angles are computed in float64.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    dtype = dtype or torch.get_default_dtype()
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (``(..., T, head_dim)``) by position with tables from :func:`rotary_tables`:
    ``(x_j, x_{j+h}) -> (x_j cos - x_{j+h} sin, x_{j+h} cos + x_j sin)``, ``h = head_dim/2``
    (RoFormer eq. 34 in the rotate-half pairing), computed as ``x cos + roll(x, h) sin``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# -- key/value cache -----------------------------------------------------------------------------
class KVCache:
    """Per-layer key/value buffers for incremental decoding, preallocated to ``capacity``.

    Keys are stored after RoPE. :class:`MiniGPT` writes the keys/values of each call's tokens at
    positions ``length .. length + T - 1`` and then advances ``length``; those tokens take RoPE
    positions from ``length`` on. Meant for inference (``torch.no_grad`` / ``inference_mode``).
    Make one with :meth:`MiniGPT.new_cache`.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._length = 0

    @property
    def length(self) -> int:
        """Number of tokens stored (the RoPE position of the next token)."""
        return self._length

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        """Maximum number of tokens (the model's ``context_len``)."""
        return self.keys[0].shape[2]

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def reset(self) -> None:
        """Forget every stored token (the buffers are reused)."""
        self._length = 0

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens (``0 <= length <= self.length``)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in [0, {self._length}], got {length}")
        self._length = int(length)

    def __repr__(self) -> str:
        k = self.keys[0]
        return (
            f"KVCache(length={self._length}, capacity={self.capacity}, batch_size="
            f"{self.batch_size}, n_layers={self.n_layers}, dtype={k.dtype}, device={k.device})"
        )


# -- modules -------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and bias-free projections."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.dropout
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """``x``: (B, T, d); ``cos``/``sin``: (T, Dh) for positions ``start .. start+T-1``;
        ``kv``: one layer's cache buffers (B, H, capacity, Dh), filled up to ``start``."""
        b, t, d = x.shape
        q = apply_rotary(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        p = self.attn_dropout if self.training else 0.0
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k_buf, v_buf = kv
            end = start + t
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
            if t == 1:  # the newest token sees every stored one
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # query i (position start+i) sees keys 0 .. start+i
                mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.dropout(self.out_proj(y))


class MLP(nn.Module):
    """``fc_out(GELU(fc_in(x)))`` with biases; ``act`` is the hook point of the neurons."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2): ``x + attn(ln1 x)``, then ``+ mlp(ln2 x)``."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.resid_pre = nn.Identity()
        self.ln1 = nn.LayerNorm(config.d_model, eps=eps)
        self.attn = CausalSelfAttention(config)
        self.resid_mid = nn.Identity()
        self.ln2 = nn.LayerNorm(config.d_model, eps=eps)
        self.mlp = MLP(config)
        self.resid_post = nn.Identity()

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        x = self.resid_pre(x)
        x = self.resid_mid(x + self.attn(self.ln1(x), cos, sin, kv, start))
        return self.resid_post(x + self.mlp(self.ln2(x)))


class MiniGPT(nn.Module):
    """Decoder-only transformer language model; see the module docstring and HOOK_POINTS.

    ``model(tokens)`` maps integer tokens ``(B, T)`` to logits ``(B, T, vocab_size)`` (and
    ``(T,)`` to ``(T, vocab_size)``). With ``cache=`` the tokens continue the cached sequence.
    """

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        if not isinstance(config, MiniGPTConfig):
            raise TypeError(f"config must be a MiniGPTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied (GPT-2)
        cos, sin = rotary_tables(
            torch.arange(config.context_len), config.head_dim, config.rope_base
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 / nanoGPT initialisation (residual projections scaled by 1/sqrt(2 n_layers))."""
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, 0.0, resid_std)
            nn.init.normal_(block.mlp.fc_out.weight, 0.0, resid_std)

    # -- helpers ---------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def hook_points(self) -> list[str]:
        """Every hook point path of this model (HOOK_POINTS expanded over the blocks)."""
        paths: list[str] = []
        for template in HOOK_POINTS:
            if "{i}" in template:
                paths += [template.format(i=i) for i in range(self.config.n_layers)]
            else:
                paths.append(template)
        return paths

    def new_cache(
        self,
        batch_size: int = 1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences (dtype/device of the model)."""
        c = self.config
        w = self.embed.weight
        return KVCache(
            c.n_layers,
            batch_size,
            c.n_heads,
            c.context_len,
            c.head_dim,
            dtype=dtype or w.dtype,
            device=device if device is not None else w.device,
        )

    def _rope(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` for positions ``start .. start + length - 1``."""
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be an integer torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.is_complex():
            raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.dim() not in (1, 2):
            raise ValueError(f"tokens must have shape (T,) or (B, T), got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one token, got {tuple(tokens.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        v = self.config.vocab_size
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token ids must be in [0, {v - 1}] (vocab_size {v}), got {bad}")

    def _check_cache(self, cache: KVCache, b: int, t: int) -> None:
        c = self.config
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        k = cache.keys[0]
        expect = (b, c.n_heads, c.context_len, c.head_dim)
        if cache.n_layers != c.n_layers or tuple(k.shape) != expect:
            raise ValueError(
                f"cache does not fit this model/batch: {cache.n_layers} layers of "
                f"{tuple(k.shape)}, expected {c.n_layers} of {expect} (use model.new_cache)"
            )
        if k.dtype != self.embed.weight.dtype or k.device != self.embed.weight.device:
            raise ValueError(
                f"cache is {k.dtype} on {k.device} but the model is {self.embed.weight.dtype} "
                f"on {self.embed.weight.device}"
            )
        if cache.length + t > c.context_len:
            raise ValueError(
                f"KV cache full: {cache.length} cached + {t} new tokens exceeds context_len "
                f"{c.context_len}"
            )

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits for ``tokens`` ``(B, T)`` -> ``(B, T, V)`` or ``(T,)`` -> ``(T, V)``.

        Without a cache the tokens take positions ``0 .. T-1`` and ``T <= context_len``. With a
        cache they continue it: positions ``cache.length ..``, their keys/values are appended and
        ``cache.length`` grows by ``T``.
        """
        self._check_tokens(tokens)
        squeeze = tokens.dim() == 1
        if squeeze:
            tokens = tokens.unsqueeze(0)
        b, t = tokens.shape
        start = 0
        if cache is None:
            if t > self.config.context_len:
                raise ValueError(
                    f"sequence length {t} exceeds context_len {self.config.context_len}"
                )
        else:
            self._check_cache(cache, b, t)
            start = cache.length
        cos, sin = self._rope(start, t)
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, kv, start)
        logits = self.head(self.ln_f(x))
        if cache is not None:
            cache._length = start + t
        return logits.squeeze(0) if squeeze else logits

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters():,}"


__all__ = [
    "HOOK_POINTS",
    "KVCache",
    "MiniGPT",
    "MiniGPTConfig",
    "apply_rotary",
    "rotary_tables",
]
