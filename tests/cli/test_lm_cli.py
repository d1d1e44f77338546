"""``sparselens lm train`` and ``sparselens lm sweep`` from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sparselens.cli import main
from sparselens.lm.checkpoint import checkpoint_hash, default_checkpoint, load_checkpoint
from sparselens.lm.corpora import verbs_corpus
from sparselens.lm.sweep import FILES, TAUS

TINY = [
    "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32",
    "--context-len", "16", "--batch-size", "8", "--steps", "12", "--warmup-steps", "2",
    "--eval-interval", "6", "--eval-batches", "2", "--log-every", "3",
    "--checkpoint-every", "6", "--bpe-vocab-size", "300", "--no-progress",
]  # fmt: skip
SWEEP_FILES = FILES


def _cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "verbs.txt"
    path.write_text(verbs_corpus(seed=1, n_sentences=400), encoding="utf-8")
    return path


# -- sweep --------------------------------------------------------------------------------------
def test_sweep_with_the_bundled_checkpoint(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, stdout, err = _cli(["lm", "sweep", "--out", out], capsys)
    assert rc == 0, err
    for name in SWEEP_FILES:
        assert (out / name).is_file(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["checkpoint_hash"] == checkpoint_hash(default_checkpoint())
    assert m["prompt"] == "Tomorrow she" and m["seeds"] == list(range(100))
    assert m["command"][:3] == ["sparselens", "lm", "sweep"]
    lines = stdout.splitlines()
    assert lines[0] == f"sparselens lm sweep: {out.resolve()}"
    header = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["tau", "H", "synthetic"])
    rows = [ln.split() for ln in lines[header + 1 :]]
    assert [float(r[0]) for r in rows] == list(TAUS)
    assert [float(r[1]) for r in rows][4] == pytest.approx(1.7864, abs=1e-4)
    observed = {float(r[0]): r[3] for r in rows}
    assert observed[0.1] == "-" and observed[1.0].isdigit()


def test_sweep_of_a_trained_run_and_options(small_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    rc, stdout, err = _cli(["lm", "train", "--corpus", small_corpus, *TINY, "--out", run], capsys)
    assert rc == 0, err
    rc, stdout, err = _cli(
        ["lm", "sweep", "--checkpoint", run / "final", "--prompt", "Yesterday I", "--seed", "5",
         "--out", tmp_path / "sw", "-q"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert stdout == ""
    m = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    assert m["seeds"][0] == 5 and m["prompt"] == "Yesterday I"
    assert m["checkpoint_hash"] == checkpoint_hash(run / "final")


# -- train --------------------------------------------------------------------------------------
def test_train_on_the_verbs_corpus(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = _cli(["lm", "train", "--corpus", "verbs", *TINY, "--out", out], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[0] == f"sparselens lm train: {out.resolve()}"
    assert "val" in stdout and "report:" in stdout
    model, tok = load_checkpoint(out / "final")
    assert model.config.d_model == 16 and tok.vocab_size == model.config.vocab_size
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["corpus"] == "verbs" and cfg["steps"] == 12 and cfg["d_model"] == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"][:3] == ["sparselens", "lm", "train"]
    assert manifest["data"]["corpus"] == "verbs" and manifest["data"]["lines"] == 30_000
    for name in ("summary.json", "report.md", "plots/loss.png", "metrics.jsonl"):
        assert (out / name).is_file(), name


def test_yaml_config_relative_corpus_and_flag_override(small_corpus, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text(small_corpus.read_text())
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "corpus: data/c.txt\neos_per_line: true\nsteps: 999\nd_model: 16\nn_heads: 2\n"
        "n_layers: 1\nd_ff: 32\ncontext_len: 16\nbatch_size: 4\nbpe_vocab_size: 300\n"
        "eval_batches: 1\nwarmup_steps: 1\nprogress: false\n"
    )
    out = tmp_path / "run"
    rc, _, err = _cli(["lm", "train", "--config", cfg_file, "--steps", "4", "--out", out], capsys)
    assert rc == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["steps"] == 4  # the flag beats the file
    assert cfg["corpus"] == str((tmp_path / "data" / "c.txt").resolve())


def test_sigkill_then_resume_is_bit_identical(small_corpus, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    rc, _, err = _cli(["lm", "train", "--corpus", small_corpus, *TINY, "--out", ref], capsys)
    assert rc == 0, err
    script = textwrap.dedent(
        f"""
        import os, signal
        from sparselens.cli import build_parser
        from sparselens.lm.cli_commands import _settings
        from sparselens.lm.train import train_lm
        args = build_parser().parse_args({["lm", "train", "--corpus", str(small_corpus), *TINY]!r})
        train_lm(_settings(args, None), {str(out)!r},
                 on_checkpoint=lambda step: os.kill(os.getpid(), signal.SIGKILL))
        """
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    rc, _, err = _cli(["lm", "train", "--resume", "--out", out], capsys)
    assert rc == 0, err
    for name in ("final/model.safetensors", "metrics.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumes"]) == 1


# -- bad input: one line, exit status 2, nothing written ----------------------------------------
BAD_TRAIN = [
    (["--steps", "0"], r"steps must be an integer >= 1, got 0"),
    (["--steps", "ten"], r"steps must be an integer >= 1, got ten"),
    (["--lr", "-1"], r"lr must be > 0 and <= 10, got -1"),
    (["--n-heads", "3"], r"d_model must be divisible by n_heads"),
    (["--tokenizer", "word"], r"tokenizer must be one of 'char' or 'bpe', got word"),
    (["--bpe-vocab-size", "100"], r"bpe_vocab_size must be an integer >= 260"),
    (["--val-split", "1"], r"val_split must be > 0 and < 1, got 1"),
    (["--warmup-steps", "50", "--steps", "10"], r"warmup_steps must be <= steps \(10\), got 50"),
    (["--lowercase"], r"lowercase applies only to the char tokenizer"),
    (["--corpus", "{tmp}/missing.txt"], r"corpus '.*missing\.txt' not found"),
    (["--bogus", "1"], r"unrecognized arguments: --bogus 1"),
    (["--resume"], r"--resume needs --out DIR"),
    (["--config", "{tmp}/nope.yaml"], r"config file .*nope\.yaml: no such file"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_TRAIN, ids=[p for _, p in BAD_TRAIN])
def test_bad_train_args_are_one_line(args, pattern, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--resume" in argv else ["--out", tmp_path / "run"]
    rc, stdout, err = _cli(["lm", "train", *argv, *out], capsys)
    assert rc == 2
    assert stdout == ""
    assert err.startswith("sparselens: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_resume_problems_are_one_line(tmp_path, capsys):
    rc, _, err = _cli(["lm", "train", "--resume", "--out", tmp_path / "nothing"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no config.yaml there" in err


BAD_SWEEP = [
    (["--checkpoint", "{tmp}/nope"], r"checkpoint .*nope: no such directory"),
    (["--seed", "-1"], r"seed must be an integer >= 0, got -1"),
    (["--seed", "x"], r"seed must be an integer >= 0, got x"),
    (["--prompt", ""], r"prompt must be a non-empty string"),
    (["--tau", "1"], r"unrecognized arguments: --tau 1"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_SWEEP, ids=[p for _, p in BAD_SWEEP])
def test_bad_sweep_args_are_one_line(args, pattern, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc, stdout, err = _cli(["lm", "sweep", *argv, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and stdout == ""
    assert err.startswith("sparselens: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_lm_without_a_command(capsys):
    rc, _, err = _cli(["lm"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "LM_COMMAND" in err
