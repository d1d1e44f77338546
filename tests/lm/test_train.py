"""Mini-GPT training: loss goes down, seeds determine everything, exact resume, checkpoints."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import yaml

from sparselens.lm.checkpoint import load_checkpoint
from sparselens.lm.corpora import verbs_corpus
from sparselens.lm.model import MiniGPT
from sparselens.lm.sampling import Greedy
from sparselens.lm.train import (
    TrainConfig,
    get_batch,
    lr_schedule,
    ngram_baselines,
    prepare_data,
    train_lm,
    train_tokenizer,
)
from sparselens.train.checkpoint import load_checkpoint as load_state


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "verbs_small.txt"
    path.write_text(verbs_corpus(seed=3, n_sentences=600), encoding="utf-8")
    return path


def tiny(corpus_file, **kw) -> TrainConfig:
    settings = dict(
        corpus=str(corpus_file),
        eos_per_line=True,
        bpe_vocab_size=300,
        d_model=16,
        n_heads=2,
        n_layers=1,
        d_ff=32,
        context_len=16,
        batch_size=8,
        steps=24,
        lr=1e-2,
        warmup_steps=4,
        eval_interval=8,
        eval_batches=2,
        log_every=4,
        checkpoint_every=8,
        progress=False,
    )
    settings.update(kw)
    return TrainConfig(**settings)


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(corpus_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    summary = train_lm(tiny(corpus_file), run)
    return run, summary


def test_outputs_and_loss_goes_down(reference):
    run, summary = reference
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (run / name).is_file(), name
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "final" / name).is_file(), name
    png = (run / "plots" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / ".staging").exists()

    metrics = _metrics(run)
    train = [m for m in metrics if m["phase"] == "train"]
    evals = [m for m in metrics if m["phase"] == "eval"]
    assert [m["step"] for m in train] == [4, 8, 12, 16, 20, 24]
    assert [m["step"] for m in evals] == [8, 16, 24]
    v = summary["data"]["vocab_size"]
    assert train[0]["loss"] > math.log(v) - 0.5  # starts near the uniform guess
    assert evals[-1]["val_loss"] < train[0]["loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["kind"] == "lm-train"
    assert manifest["data"]["corpus_hash"] == summary["data"]["corpus_hash"]
    assert len(manifest["data"]["corpus_hash"]) == 64
    assert {"torch", "numpy", "python"} <= set(manifest["versions"])
    assert "hardware" in manifest and "git" in manifest
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert TrainConfig.model_validate(cfg) == tiny(cfg["corpus"])

    report = (run / "report.md").read_text()
    assert f"{summary['parameters']:,} parameters" in report
    assert "Tomorrow she" in report and "Yesterday I" in report and "greedy" in report


def test_same_seed_same_run_other_seed_differs(reference, corpus_file, tmp_path):
    run, _ = reference
    train_lm(tiny(corpus_file), tmp_path / "again")
    for name in ("final/model.safetensors", "metrics.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (run / name).read_bytes(), name
    train_lm(tiny(corpus_file, seed=1), tmp_path / "other")
    other = (tmp_path / "other" / "final" / "model.safetensors").read_bytes()
    assert other != (run / "final" / "model.safetensors").read_bytes()


def test_stop_then_resume_is_bit_identical(reference, corpus_file, tmp_path):
    ref, ref_summary = reference
    out = tmp_path / "run"

    def stop(step: int) -> None:
        if step == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lm(tiny(corpus_file), out, on_checkpoint=stop)
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert not (out / "final").exists() and not (out / "report.md").exists()
    assert max(m["step"] for m in _metrics(out)) == 16

    summary = train_lm(tiny(corpus_file), out, resume=True)
    for name in ("final/model.safetensors", "final/tokenizer.json", "metrics.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert summary["val_loss"] == ref_summary["val_loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [r["previous_status"] for r in manifest["resumes"]] == ["interrupted"]

    # a complete run resumes to its summary; changed settings are refused
    assert train_lm(tiny(corpus_file), out, resume=True)["val_loss"] == summary["val_loss"]
    with pytest.raises(ValueError, match=r"lr differs from the run's config.yaml"):
        train_lm(tiny(corpus_file, lr=0.5), out, resume=True)


def test_final_checkpoint_round_trip(reference):
    run, _ = reference
    model, tok = load_checkpoint(run / "final")
    assert tok is not None and tok.vocab_size == model.config.vocab_size
    state, step, _ = load_state(sorted((run / "checkpoints").glob("train-*.json"))[-1])
    assert step == 24
    again = MiniGPT(model.config)
    weights = state["model"]
    again.load_state_dict({**weights, "head.weight": weights["embed.weight"]})
    again.eval()
    x = torch.tensor(tok.encode("Tomorrow she will"))
    assert torch.equal(model(x), again(x))
    assert model.num_parameters() == json.loads((run / "summary.json").read_text())["parameters"]


def test_line_windows_start_at_sentence_starts(corpus_file):
    cfg = tiny(corpus_file)
    text = corpus_file.read_text()
    tok = train_tokenizer(cfg, text)
    data = prepare_data(cfg, text, tok)
    eos = tok.eos_id
    for stream, starts in ((data.train, data.train_starts), (data.val, data.val_starts)):
        assert all(s == 0 or stream[s - 1] == eos for s in starts.tolist())
        assert int(starts.max()) + cfg.context_len + 1 <= stream.numel()
    assert int((data.train == eos).sum()) + int((data.val == eos).sum()) == 600
    assert int((data.val == eos).sum()) == 60  # val_split 0.1 of the lines
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data.train, data.train_starts, 5, cfg.context_len, g)
    assert x.shape == y.shape == (5, cfg.context_len)
    assert torch.equal(x[:, 1:], y[:, :-1])
    base = ngram_baselines(data, tok.vocab_size)
    assert base["bigram"] < base["unigram"] < math.log(tok.vocab_size)


def test_stream_mode_splits_text(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("the cat sat on the mat. " * 40)
    cfg = TrainConfig(corpus=str(path), tokenizer="char", context_len=8, val_split=0.25)
    assert not cfg.line_mode
    text = path.read_text()
    data = prepare_data(cfg, text, train_tokenizer(cfg, text))
    assert data.train.numel() + data.val.numel() == len(text)
    assert data.val.numel() == len(text) - int(len(text) * 0.75)
    assert data.train_starts.tolist() == list(range(data.train.numel() - 8))
    with pytest.raises(ValueError, match=r"val split has \d+ tokens, too few"):
        big = cfg.model_copy(update={"context_len": 400})
        prepare_data(big, text, train_tokenizer(big, text))


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    lr = lr_schedule(cfg)
    assert lr(1) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-2)
    assert lr(100) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(5.5e-3)  # half-way through the decay
    values = [lr(i) for i in range(1, 101)]
    assert all(a < b for a, b in itertools.pairwise(values[:10]))
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    no_warmup = lr_schedule(TrainConfig(steps=10, warmup_steps=0, lr=1.0))
    assert no_warmup(1) < 1.0 and no_warmup(10) == pytest.approx(0.1)


def test_defaults_follow_minigpt_config():
    from sparselens.lm.model import MiniGPTConfig

    cfg = TrainConfig()
    ref = MiniGPTConfig(vocab_size=512)
    assert cfg.model_config_for(512) == ref
    assert cfg.corpus == "verbs" and cfg.tokenizer == "bpe" and cfg.line_mode


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"warmup_steps": 20, "steps": 10}, r"warmup_steps must be <= steps \(10\), got 20"),
        ({"d_model": 30, "n_heads": 4}, r"d_model must be divisible by n_heads"),
        ({"lowercase": True}, r"lowercase applies only to the char tokenizer"),
        ({"tokenizer": "char", "bpe_vocab_size": 300}, r"bpe_vocab_size applies only"),
        ({"steps": 0}, r"greater than or equal to 1"),
        ({"tokenizer": "word"}, r"'char' or 'bpe'"),
        ({"bpe_vocab_size": 100}, r"greater than or equal to 260"),
        ({"bogus": 1}, r"Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(settings, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**settings)


def test_bad_corpus_raises_before_creating_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train_lm(TrainConfig(corpus=str(tmp_path / "missing.txt")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bundled_checkpoint_gets_the_grammar():
    from sparselens.lm.checkpoint import default_checkpoint
    from sparselens.lm.generate import generate
    from sparselens.lm.sweep import first_step_logits

    model, tok = load_checkpoint(default_checkpoint())
    assert model.num_parameters() < 300_000
    z = torch.tensor(first_step_logits(model, tok.encode("Tomorrow she")))
    q = torch.softmax(z, -1)
    top2 = sorted(tok.id_to_token(int(i)) for i in torch.topk(q, 2).indices)
    assert top2 == [" is", " will"]
    assert float(torch.topk(q, 2).values.sum()) > 0.95
    past = generate(model, tok.encode("Yesterday I"), 6, 0, Greedy(), eos_id=tok.eos_id)
    first_word = tok.decode(past).split()[0].strip(".")
    from sparselens.lm.corpora import VERBS

    assert first_word in {v.past for v in VERBS}
    future = tok.decode(generate(model, tok.encode("Tomorrow she"), 6, 0, Greedy()))
    assert future.startswith((" will ", " is going to "))
