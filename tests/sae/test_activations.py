"""``sparselens.sae.activations.ActivationSource``: rows of the right module, special tokens
dropped in order, transcoder inputs, one early-stopping pass, Hugging Face modules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sparselens.sae.activations import ActivationSource, Widths
from sparselens.sae.subject import Subject, load_subject

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minigpt() -> Subject:
    return load_subject()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    path: Path = tmp_path_factory.mktemp("gpt2") / "m"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return load_subject(path)


def _tokens(subject: Subject) -> torch.Tensor:
    enc = subject.tokenizer.encode
    eos = subject.tokenizer.eos_id
    ids = [*enc("Yesterday I went home."), eos, *enc("Tomorrow she will go."), eos]
    ids += enc("He works every day.")
    return torch.tensor(ids[:18]).view(2, 9)


def _hooked(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a plain forward hook, the module's (first input, output)."""
    got = {}

    def hook(_m, args, out):
        got["in"], got["out"] = args[0].detach(), out.detach()

    h = model.get_submodule(name).register_forward_hook(hook)
    return got, h


def test_sae_rows_are_module_outputs_without_specials(minigpt: Subject) -> None:
    """x is y, the module output flattened row-major with the <eos> positions removed.

    Wrong variants caught: keeping excluded positions; dropping the wrong positions (a mask of
    the other polarity); flattening (T, B) instead of (B, T)."""
    tokens = _tokens(minigpt)
    eos = minigpt.tokenizer.eos_id
    assert int((tokens == eos).sum()) == 2
    got, handle = _hooked(minigpt.model, "blocks.1.resid_mid")
    with torch.no_grad():
        minigpt.model(tokens)
    handle.remove()
    keep = (tokens != eos).reshape(-1)
    ref = got["out"].reshape(-1, 64)[keep]
    src = ActivationSource(minigpt, "blocks.1.resid_mid")
    (x, y) = src(tokens)["blocks.1.resid_mid"]
    assert x is y and y.shape == (16, 64)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    kept_all = ActivationSource(minigpt, "blocks.1.resid_mid", exclude_special_tokens=False)
    torch.testing.assert_close(
        kept_all(tokens)["blocks.1.resid_mid"][1], got["out"].reshape(-1, 64), rtol=0, atol=0
    )


def test_transcoder_rows_are_input_and_output(minigpt: Subject) -> None:
    """Transcoder: x = the MLP's input (= the ln2 output), y = the MLP's output."""
    tokens = _tokens(minigpt)
    got_ln, h1 = _hooked(minigpt.model, "blocks.0.ln2")
    got_mlp, h2 = _hooked(minigpt.model, "blocks.0.mlp")
    with torch.no_grad():
        minigpt.model(tokens)
    h1.remove()
    h2.remove()
    keep = (tokens != minigpt.tokenizer.eos_id).reshape(-1)
    src = ActivationSource(minigpt, ["blocks.0.mlp"], transcode=True)
    x, y = src(tokens)["blocks.0.mlp"]
    torch.testing.assert_close(x, got_ln["out"].reshape(-1, 64)[keep], rtol=0, atol=0)
    torch.testing.assert_close(y, got_mlp["out"].reshape(-1, 64)[keep], rtol=0, atol=0)
    assert src.widths() == {"blocks.0.mlp": Widths(64, 64)}
    fc = ActivationSource(minigpt, "blocks.0.mlp.fc_in", transcode=True)
    assert fc.widths() == {"blocks.0.mlp.fc_in": Widths(64, 256)}


def test_one_pass_stops_after_the_last_hookpoint(minigpt: Subject) -> None:
    """All hookpoints come from one forward that never reaches later modules.

    Wrong variants caught: one forward per hookpoint; running the whole model (ln_f, head)."""
    calls = {"embed": 0, "ln_f": 0}
    handles = [
        minigpt.model.get_submodule(n).register_forward_hook(
            lambda *_a, _n=n: calls.__setitem__(_n, calls[_n] + 1)
        )
        for n in calls
    ]
    try:
        src = ActivationSource(minigpt, ["blocks.0.resid_post", "blocks.0.attn"])
        rows = src(_tokens(minigpt))
    finally:
        for h in handles:
            h.remove()
    assert calls == {"embed": 1, "ln_f": 0}
    assert list(rows) == ["blocks.0.attn", "blocks.0.resid_post"]  # model order


def test_patterns(minigpt: Subject) -> None:
    src = ActivationSource(minigpt, "blocks.*.resid_post")
    assert src.hookpoints == ["blocks.0.resid_post", "blocks.1.resid_post"]
    with pytest.raises(ValueError, match=r"hookpoints: 'blocks\.9\.\*' matches no module"):
        ActivationSource(minigpt, "blocks.9.*")


def test_hf_mlp_hookpoints(gpt2: Subject) -> None:
    """GPT-2 blocks' MLP outputs via ``transformer.h.*.mlp`` (no specials in the fallback)."""
    src = ActivationSource(gpt2, "transformer.h.*.mlp")
    assert src.hookpoints == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    tokens = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    got, handle = _hooked(gpt2.model, "transformer.h.1.mlp")
    with torch.no_grad():
        gpt2.logits(tokens)
    handle.remove()
    rows = src(tokens)
    assert rows["transformer.h.0.mlp"][1].shape == (21, 32)
    torch.testing.assert_close(
        rows["transformer.h.1.mlp"][1], got["out"].reshape(-1, 32), rtol=0, atol=0
    )


def test_bad_tokens(minigpt: Subject) -> None:
    src = ActivationSource(minigpt, "blocks.0.resid_post")
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        src(torch.zeros(5, dtype=torch.long))
