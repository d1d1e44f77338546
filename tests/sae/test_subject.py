"""``sparselens.sae.subject``: the bundled Mini-GPT, Mini-GPT directories, Hugging Face causal
LMs from a local directory (a tiny random GPT-2, no downloads) and bad specs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sparselens.lm import CharTokenizer, MiniGPT, MiniGPTConfig, save_checkpoint
from sparselens.sae.subject import ByteTokenizer, HFTokenizer, load_subject

transformers = pytest.importorskip("transformers")


def tiny_gpt2(path: Path, vocab_size: int = 300, with_tokenizer: bool = False) -> Path:
    """A random 2-layer GPT-2 (d 32) saved with ``save_pretrained`` (and a word tokenizer)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    if with_tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = ["<|endoftext|>", "<pad>", "the", "cat", "sat", "on", "mat", "[UNK]"]
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|endoftext|>",
            pad_token="<pad>",
            unk_token="[UNK]",
        )
        fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minigpt():
    return load_subject()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "m")


def _frozen(model: torch.nn.Module) -> bool:
    return (not model.training) and not any(p.requires_grad for p in model.parameters())


def test_bundled_minigpt(minigpt) -> None:
    """The default subject is the bundled model, frozen, with its tokenizer's specials."""
    s = minigpt
    assert s.name == "minigpt" and s.kind == "minigpt"
    assert isinstance(s.model, MiniGPT)
    assert _frozen(s.model)
    assert s.context_len == s.model.config.context_len == 32
    assert s.special_token_ids == (0, 1, 2)  # <pad>, <eos>, <bos>; <unk> is kept
    assert s.tokenizer.decode(s.tokenizer.encode("Tomorrow she will go.")) == (
        "Tomorrow she will go."
    )
    tokens = torch.tensor([s.tokenizer.encode("Yesterday I went home.")])
    torch.testing.assert_close(s.logits(tokens), s.model(tokens), rtol=0, atol=0)


def test_minigpt_module_names_hook_points_first(minigpt) -> None:
    """Hook points come first, in model order (block 0 before block 1), then every other
    module, each once. Wrong variant caught: HOOK_POINTS template order, which lists
    ``blocks.1.mlp`` before ``blocks.0.resid_post``."""
    names = minigpt.module_names()
    hooks = minigpt.model.hook_points()
    assert sorted(names[: len(hooks)]) == sorted(hooks)
    every = [n for n, _ in minigpt.model.named_modules() if n]
    assert sorted(names) == sorted(every) and len(names) == len(set(names))
    first = names[: len(hooks)]
    assert first[:3] == ["embed", "blocks.0.resid_pre", "blocks.0.ln1"]
    assert first[-2:] == ["ln_f", "head"]
    assert first.index("blocks.0.resid_post") < first.index("blocks.1.resid_pre")
    assert first.index("blocks.0.mlp") < first.index("blocks.0.resid_post")


def test_minigpt_directory(tmp_path: Path) -> None:
    """A Mini-GPT checkpoint directory loads as a minigpt subject named by its resolved path."""
    tok = CharTokenizer.train("abc ")
    torch.manual_seed(0)
    model = MiniGPT(
        MiniGPTConfig(
            vocab_size=tok.vocab_size,
            d_model=8,
            n_heads=2,
            n_layers=1,
            d_ff=16,
            context_len=16,
            dropout=0.5,
        )
    )
    save_checkpoint(tmp_path / "ck", model, tok)
    s = load_subject(tmp_path / "ck")
    assert s.kind == "minigpt" and s.name == str((tmp_path / "ck").resolve())
    assert _frozen(s.model) and s.context_len == 16
    x = torch.tensor([tok.encode("abc cab")])
    # dropout 0.5 is inert only because the subject is in eval mode
    torch.testing.assert_close(s.logits(x), s.logits(x), rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(s.logits(x), model(x), rtol=0, atol=0)


def test_minigpt_directory_without_tokenizer(tmp_path: Path) -> None:
    model = MiniGPT(MiniGPTConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=8))
    save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_subject(tmp_path / "ck")


def test_hf_subject_byte_fallback(gpt2_dir: Path) -> None:
    """A GPT-2 directory without tokenizer files: byte-level tokenizer; GPT-2's config specials
    (50256, outside this vocabulary of 300) are not listed."""
    s = load_subject(str(gpt2_dir))
    assert s.kind == "hf" and s.name == str(gpt2_dir.resolve())
    assert _frozen(s.model)
    assert isinstance(s.tokenizer, ByteTokenizer)
    assert s.tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert s.tokenizer.decode(s.tokenizer.encode("héllo\n")) == "héllo\n"
    assert s.context_len == 64 and s.special_token_ids == ()
    names = s.module_names()
    assert names == [n for n, _ in s.model.named_modules() if n]
    assert "transformer.h.0.mlp" in names and "transformer.h.1.mlp.act" in names
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = s.model(input_ids=x).logits
    torch.testing.assert_close(s.logits(x), ref, rtol=0, atol=0)
    assert s.logits(x).shape == (2, 10, 300)


def test_hf_subject_with_tokenizer(tmp_path: Path) -> None:
    """Tokenizer files in the directory are used; its special ids are the excluded ones."""
    path = tiny_gpt2(tmp_path / "m", with_tokenizer=True)
    s = load_subject(path)
    assert isinstance(s.tokenizer, HFTokenizer)
    assert s.tokenizer.encode("the cat sat") == [2, 3, 4]  # no BOS/EOS added on encode
    assert s.tokenizer.decode([2, 3]) == "the cat"
    assert set(s.special_token_ids) == {0, 1, 7}  # eos, pad, unk of the tokenizer


def test_hf_small_vocab_without_tokenizer(tmp_path: Path) -> None:
    path = tiny_gpt2(tmp_path / "m", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size 100 < 256"):
        load_subject(path)


def test_logits_rejects_long_and_1d_input(minigpt) -> None:
    with pytest.raises(ValueError, match="context_len 32"):
        minigpt.logits(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        minigpt.logits(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "not found"),
        ("file", "not a directory"),
        ("empty_dir", "no config.json"),
        ("bad_json", "not valid JSON"),
        ("hf_garbage", "cannot load a Hugging Face causal LM"),
        ("minigpt_corrupt", "SHA-256"),
    ],
)
def test_bad_specs_one_line(tmp_path: Path, setup: str, match: str) -> None:
    p = tmp_path / "s"
    if setup == "file":
        p.write_text("x")
    elif setup == "empty_dir":
        p.mkdir()
    elif setup == "bad_json":
        p.mkdir()
        (p / "config.json").write_text("{nope")
    elif setup == "hf_garbage":
        p.mkdir()
        (p / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    elif setup == "minigpt_corrupt":
        model = MiniGPT(MiniGPTConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=8))
        save_checkpoint(p, model, CharTokenizer.train("abcdef"))
        blob = bytearray((p / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (p / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=match) as e:
        load_subject(str(p))
    assert "\n" not in str(e.value)


def test_spec_type() -> None:
    with pytest.raises(TypeError, match="subject must be"):
        load_subject(3)  # type: ignore[arg-type]
