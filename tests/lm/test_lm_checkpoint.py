"""Mini-GPT checkpoints: exact round trip, no pickle, checksums, one-line errors naming the file."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from sparselens.lm.checkpoint import (
    checkpoint_hash,
    load_checkpoint,
    read_checkpoint_extra,
    save_checkpoint,
)
from sparselens.lm.model import MiniGPT, MiniGPTConfig


def make(seed: int = 0, **kw) -> MiniGPT:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}
    return MiniGPT(MiniGPTConfig(**{**cfg, "context_len": 16, **kw})).eval()


X = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(5))


class FakeTokenizer:
    """Stands in for sparselens.lm.tokenizers: anything with ``save(path)``."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab}), encoding="utf-8")


@pytest.fixture
def fake_tokenizers(monkeypatch):
    """Make ``sparselens.lm.tokenizers.load_tokenizer`` read FakeTokenizer files."""
    mod = types.ModuleType("sparselens.lm.tokenizers")
    mod.load_tokenizer = lambda path: FakeTokenizer(
        json.loads(Path(path).read_text(encoding="utf-8"))["vocab"]
    )
    monkeypatch.setitem(sys.modules, "sparselens.lm.tokenizers", mod)
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_identical_logits(tmp_path, dtype):
    m = make(rope_base=500.0, layer_norm_eps=1e-6).to(dtype)
    with torch.no_grad():  # make the weights differ from a fresh init of the same seed
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_checkpoint(tmp_path / "ck", m, extra={"step": 7, "corpus": "abc"})
    assert out == tmp_path / "ck"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, tok = load_checkpoint(out)
    assert tok is None
    assert loaded.config == m.config
    assert not loaded.training
    assert loaded.embed.weight.dtype == dtype
    assert loaded.head.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(X), m(X))
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert read_checkpoint_extra(out) == {"step": 7, "corpus": "abc"}


def test_round_trip_with_tokenizer(tmp_path, fake_tokenizers):
    m = make()
    save_checkpoint(tmp_path, m, tokenizer=FakeTokenizer(["a", "b"]))
    assert (tmp_path / "tokenizer.json").exists()
    _, tok = load_checkpoint(tmp_path)
    assert isinstance(tok, FakeTokenizer) and tok.vocab == ["a", "b"]
    # re-saving without a tokenizer drops the stale file
    save_checkpoint(tmp_path, m)
    assert not (tmp_path / "tokenizer.json").exists()
    assert load_checkpoint(tmp_path)[1] is None


def test_round_trip_with_the_real_tokenizer(tmp_path):
    from sparselens.lm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("to be or not to be")
    m = make()
    save_checkpoint(tmp_path, m, tokenizer=tok)
    loaded, tok2 = load_checkpoint(tmp_path)
    assert type(tok2) is CharTokenizer and tok2.vocab_size == tok.vocab_size
    assert tok2.encode("not to be") == tok.encode("not to be")
    ids = torch.tensor(tok2.encode("or not"))
    with torch.no_grad():
        assert torch.equal(loaded(ids), m(ids))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids but the model's vocab_size is 4"):
        save_checkpoint(tmp_path / "small", make(vocab_size=4), tokenizer=tok)


def test_loading_never_unpickles_and_keeps_the_global_rng(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make())

    def forbidden(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    load_checkpoint(tmp_path)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_temporary_files_are_left(tmp_path):
    save_checkpoint(tmp_path, make())
    save_checkpoint(tmp_path, make(1))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_hash_identifies_the_content(tmp_path):
    m = make()
    a = checkpoint_hash(save_checkpoint(tmp_path / "a", m, extra={"k": 1}))
    b = checkpoint_hash(save_checkpoint(tmp_path / "b", m, extra={"k": 1}))
    assert a == b and len(a) == 64
    assert checkpoint_hash(save_checkpoint(tmp_path / "c", m, extra={"k": 2})) != a
    assert checkpoint_hash(save_checkpoint(tmp_path / "d", make(1), extra={"k": 1})) != a


# -- errors --------------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory") as e:
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such file") as e:
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", make())
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: no such file") as e:
        load_checkpoint(tmp_path / "ck")
    _one_line(e)


def test_truncated_or_altered_tensor_file(tmp_path):
    save_checkpoint(tmp_path, make())
    f = tmp_path / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: does not match the SHA-256") as e:
        load_checkpoint(tmp_path)
    _one_line(e)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        checkpoint_hash(tmp_path)


def _rewrite_config(d: Path, edit) -> None:
    doc = json.loads((d / "config.json").read_text())
    edit(doc)
    (d / "config.json").write_text(json.dumps(doc))


def test_garbage_with_a_matching_checksum_is_still_rejected(tmp_path):
    import hashlib

    save_checkpoint(tmp_path, make())
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"
    (tmp_path / "model.safetensors").write_bytes(garbage)
    _rewrite_config(
        tmp_path,
        lambda d: d["files"].__setitem__("model.safetensors", hashlib.sha256(garbage).hexdigest()),
    )
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file") as e:
        load_checkpoint(tmp_path)
    _one_line(e)


def test_tensors_that_do_not_fit_the_config(tmp_path):
    save_checkpoint(tmp_path / "big", make(d_ff=128))
    save_checkpoint(tmp_path / "ck", make())
    big = (tmp_path / "big" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(big)
    sha = json.loads((tmp_path / "big" / "config.json").read_text())["files"]
    _rewrite_config(tmp_path / "ck", lambda d: d.__setitem__("files", sha))
    with pytest.raises(ValueError, match=r"model\.safetensors: does not fit the config") as e:
        load_checkpoint(tmp_path / "ck")
    _one_line(e)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.__setitem__("format", "other/1"), "config.json: not a Mini-GPT checkpoint"),
        (lambda d: d["config"].__setitem__("d_model", 30), "d_model must be divisible by n_heads"),
        (lambda d: d["config"].__setitem__("n_layers", 0), "n_layers must be an integer >= 1"),
        (lambda d: d["config"].__setitem__("bogus", 1), "unknown setting 'bogus'"),
        (lambda d: d.__setitem__("files", {}), "config.json: no checksum for model.safetensors"),
        (lambda d: d["files"].__setitem__("../x", "0" * 64), "malformed file list"),
    ],
)
def test_bad_config_json(tmp_path, edit, needle):
    save_checkpoint(tmp_path, make())
    _rewrite_config(tmp_path, edit)
    with pytest.raises(ValueError, match=r"config\.json") as e:
        load_checkpoint(tmp_path)
    assert needle in _one_line(e)


def test_config_json_that_is_not_json(tmp_path):
    save_checkpoint(tmp_path, make())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON") as e:
        load_checkpoint(tmp_path)
    _one_line(e)


def test_altered_tokenizer_file(tmp_path, fake_tokenizers):
    save_checkpoint(tmp_path, make(), tokenizer=FakeTokenizer(["a"]))
    (tmp_path / "tokenizer.json").write_text('{"vocab": ["b"]}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: does not match the SHA-256") as e:
        load_checkpoint(tmp_path)
    _one_line(e)


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
        save_checkpoint(tmp_path, make(), extra={"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="model must be a MiniGPT"):
        save_checkpoint(tmp_path, torch.nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())
