"""Autoregressive decoding with a sampling strategy: ``generate(model, prompt, max_tokens, ...)``.

``generate`` runs the decode loop of the course (Phase 21): forward the context, take the last
position's logits, let the strategy pick a token, append it, repeat. It drives

* a sparselens :class:`~sparselens.lm.model.MiniGPT` (or any module mapping ``(1, T)`` token ids
  to ``(1, T, V)`` logits; ``new_cache`` and ``config.context_len`` are used when present), and
* any Hugging Face causal LM (``transformers.PreTrainedModel``) through
  ``model(input_ids, past_key_values=..., use_cache=True).logits``.

Conventions
-----------
=====================  ===========================================================================
returns                only the generated suffix, a ``list[int]`` of at most ``max_tokens`` ids
EOS                    decoding stops when an EOS id is drawn; the EOS is **not** returned.
                       ``eos_id`` (an int or several) overrides the default; ``eos_id=()`` never
                       stops early. Default: Hugging Face models use
                       ``model.generation_config.eos_token_id`` (int or list), falling back to the
                       tokenizer's; other models use ``tokenizer.eos_id`` (or ``eos_token_id``)
                       when a tokenizer is given, else no EOS
randomness             one ``torch.Generator(device).manual_seed(seed)`` per call, no global state:
                       the same model, prompt, seed and strategy give the same output. A greedy
                       strategy ignores it. The stream depends on the device (CPU vs CUDA)
strategy               any callable ``strategy(logits (1, V), torch.Generator) -> LongTensor (1,)``,
                       e.g. a :class:`~sparselens.lm.sampling.Sampler`; it sees the raw logits of
                       the last position (no repetition penalty or other HF processors)
context_len (MiniGPT)  when prompt + generated tokens exceed ``config.context_len``, the context is
                       cropped to its last ``context_len`` tokens (nanoGPT's sliding window) and
                       that window is recomputed from a fresh cache; so with ``use_cache=True``
                       the output equals ``use_cache=False``. HF models get the full context, as
                       HF ``generate`` does: keeping within their position limit is the caller's
                       job
mode                   ``torch.no_grad()`` and ``model.eval()`` during decoding; the previous
                       training mode is restored afterwards
validation             ``max_tokens`` int >= 0; ``seed`` int >= 0; ``prompt`` a non-empty list of
                       ids in ``[0, vocab_size)``, or a ``str`` when a ``tokenizer`` is given
=====================  ===========================================================================
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparselens.core.checks import check_int

__all__ = ["generate"]

Strategy = Callable[[Tensor, torch.Generator], Tensor]


def _is_hf(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (no import: an HF model implies it is loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _vocab_size(model: nn.Module, hf: bool) -> int | None:
    if hf:
        emb = model.get_input_embeddings()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` from a sparselens, ``tokenizers`` or Hugging Face tokenizer."""
    ids = tokenizer.encode(text)
    ids = getattr(ids, "ids", ids)  # tokenizers.Encoding
    return [int(i) for i in ids]


def _as_ids(name: str, value: Any) -> list[int]:
    """``value`` (an int or an iterable of ints, or None) as a list of ids."""
    if value is None:
        return []
    if isinstance(value, Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return [check_int(name, value, ge=0)]
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [check_int(name, v, ge=0) for v in value]
    raise TypeError(f"{name} must be an int or a list of ints, got {type(value).__name__}")


def _eos_ids(model: nn.Module, tokenizer: Any, eos_id: Any, hf: bool) -> frozenset[int]:
    if eos_id is not None:
        return frozenset(_as_ids("eos_id", eos_id))
    candidates: list[Any] = []
    if hf:
        gen_config = getattr(model, "generation_config", None)
        candidates.append(getattr(gen_config, "eos_token_id", None))
    if tokenizer is not None:
        tok_eos = getattr(tokenizer, "eos_id", None)
        candidates.append(
            tok_eos if tok_eos is not None else getattr(tokenizer, "eos_token_id", None)
        )
    for c in candidates:  # the first one that is set
        ids = _as_ids("eos_id", c) if c is not None else []
        if ids:
            return frozenset(ids)
    return frozenset()


def _prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int | None) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError("prompt is a str: pass tokenizer= to encode it, or pass token ids")
        ids = _encode(tokenizer, prompt)
    else:
        if isinstance(prompt, Tensor | np.ndarray):
            if prompt.ndim != 1:
                raise ValueError(f"prompt must be 1-D token ids, got shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence):
            raise TypeError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
        ids = [check_int("prompt token id", t, ge=0) for t in prompt]
    if not ids:
        raise ValueError("prompt must hold at least one token id")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(
            f"prompt token ids must be in [0, {vocab_size - 1}] (vocab_size {vocab_size}), "
            f"got {max(ids)}"
        )
    return ids


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate(
    model: nn.Module,
    prompt: Sequence[int] | str,
    max_tokens: int,
    seed: int,
    strategy: Strategy,
    *,
    eos_id: int | Iterable[int] | None = None,
    tokenizer: Any = None,
    use_cache: bool = True,
) -> list[int]:
    """Decode up to ``max_tokens`` tokens after ``prompt``; return only the generated ids.

    Args:
        model: a :class:`~sparselens.lm.model.MiniGPT` (or a module ``(1, T) -> (1, T, V)``) or a
            Hugging Face causal LM.
        prompt: token ids, or text when ``tokenizer`` is given (``tokenizer.encode``).
        max_tokens: the most tokens to generate (``>= 0``).
        seed: seeds the one ``torch.Generator`` of this call (ignored by greedy strategies).
        strategy: e.g. ``Greedy()``, ``Sampler(tau=0.7, top_p=0.9)``.
        eos_id: id(s) that stop decoding (not returned); ``None`` = the model's / tokenizer's
            default, ``()`` = never stop early.
        tokenizer: encodes a str prompt; supplies the default EOS.
        use_cache: decode incrementally with a key/value cache (same output as without).

    See the module docstring for the conventions (EOS, cropping, randomness).
    """
    if not callable(strategy):
        raise TypeError(f"strategy must be callable, got {type(strategy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    max_tokens = check_int("max_tokens", max_tokens, ge=0)
    seed = check_int("seed", seed, ge=0)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    hf = _is_hf(model)
    tokens = _prompt_ids(prompt, tokenizer, _vocab_size(model, hf))
    eos = _eos_ids(model, tokenizer, eos_id, hf)
    if max_tokens == 0:
        return []
    device = _device(model)
    rng = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            steps = _hf_steps if hf else _token_model_steps
            return _decode(steps(model, tokens, device, use_cache), max_tokens, rng, strategy, eos)
    finally:
        model.train(was_training)


def _decode(
    steps: Any, max_tokens: int, rng: torch.Generator, strategy: Strategy, eos: frozenset[int]
) -> list[int]:
    """Drive a stepper generator: it yields last-position logits ``(1, V)`` and is sent ids."""
    out: list[int] = []
    logits = next(steps)
    for i in range(max_tokens):
        tok = strategy(logits, rng)
        tok = int(tok.reshape(-1)[0]) if isinstance(tok, Tensor) else int(tok)
        if tok in eos:
            break
        out.append(tok)
        if i + 1 < max_tokens:  # no forward pass for a token that will not be used
            logits = steps.send(tok)
    steps.close()
    return out


def _token_model_steps(model: nn.Module, tokens: list[int], device: torch.device, use_cache: bool):
    """Stepper for MiniGPT-like models: ``model(ids (1, T), cache=...) -> (1, T, V)``."""
    ctx = getattr(getattr(model, "config", None), "context_len", None)
    cached = use_cache and hasattr(model, "new_cache")

    def window() -> Tensor:
        w = tokens[-ctx:] if ctx is not None else tokens
        return torch.tensor([w], dtype=torch.long, device=device)

    cache = model.new_cache(batch_size=1) if cached else None
    logits = model(window(), cache=cache) if cached else model(window())
    while True:
        tok = yield logits[:, -1, :]
        tokens.append(tok)
        if not cached:
            logits = model(window())
        elif ctx is not None and cache.length >= ctx:  # full: crop and recompute the window
            cache = model.new_cache(batch_size=1)
            logits = model(window(), cache=cache)
        else:
            logits = model(torch.tensor([[tok]], dtype=torch.long, device=device), cache=cache)


def _hf_steps(model: nn.Module, tokens: list[int], device: torch.device, use_cache: bool):
    """Stepper for Hugging Face causal LMs (``.logits``, ``.past_key_values``)."""
    out = model(input_ids=torch.tensor([tokens], device=device), use_cache=use_cache)
    while True:
        tok = yield out.logits[:, -1, :]
        tokens.append(tok)
        if use_cache:
            ids = torch.tensor([[tok]], device=device)
            out = model(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)
        else:
            out = model(input_ids=torch.tensor([tokens], device=device), use_cache=False)


def next_token_logits(model: nn.Module, prompt_ids: Sequence[int]) -> Tensor:
    """The last position's logits (float64, ``(V,)``) of one eval-mode forward pass over the
    prompt (cropped to the model's ``context_len`` when it has one)."""
    ids = list(prompt_ids)
    ctx = getattr(getattr(model, "config", None), "context_len", None)
    if isinstance(ctx, int):
        ids = ids[-ctx:]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.tensor(ids, dtype=torch.long))
    finally:
        model.train(was_training)
    return out[-1].double()
