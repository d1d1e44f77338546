"""``sparselens sae train`` and ``sparselens sae cache`` from the command line: nested
``--sae.*`` flags, YAML configs, resume, Hugging Face subjects, caches, one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

import sparselens.cli as cli
from sparselens.sae.cli_commands import register

TINY = [
    "--batch-size", "8", "--context-len", "16", "--tokens", str(8 * 16 * 6),
    "--lr-warmup-steps", "1", "--log-every", "2", "--save-every", "3", "--threads", "1",
    "--eval-tokens", "256", "--sae.num-latents", "64", "--sae.k", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _sae_command(monkeypatch):
    """Until the lead wires ``sae`` into sparselens.cli.COMMANDS."""
    monkeypatch.setitem(cli.COMMANDS, "sae", register)


@pytest.fixture(autouse=True)
def _restore_logging():
    logger = logging.getLogger("sparselens")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_with_nested_flags(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["sae", "train", "--out", out, *TINY, "--sae.auxk-alpha", "0", "--sae.multi-topk"]
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sae"]["auxk_alpha"] == 0 and cfg["sae"]["multi_topk"] is True
    assert cfg["sae"]["num_latents"] == 64 and cfg["sae"]["k"] == 4
    assert cfg["hookpoints"] == ["blocks.0.resid_post"] and cfg["subject"] == "minigpt"
    lines = stdout.splitlines()
    assert lines[0] == f"sparselens sae train: {out.resolve()}"
    assert lines[2].startswith("  blocks.0.resid_post: FVU ")
    assert (out / "final" / "blocks.0.resid_post" / "sae.safetensors").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"][:3] == ["sparselens", "sae", "train"]
    # a completed run resumes to its summary without training again
    rc, stdout2, err = _cli(["sae", "train", "--out", out, "--resume", "-q"], capsys)
    assert rc == 0 and stdout2 == "", err


def test_yaml_config_with_sae_mapping_and_flag_override(tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {"hookpoints": ["blocks.*.resid_post"], "sae": {"k": 2, "num_latents": 32},
             "seed": 5}
        )
    )  # fmt: skip
    out = tmp_path / "run"
    rc, _, err = _cli(
        ["sae", "train", "--config", cfg_file, "--out", out, *TINY[:-5], "--sae.k", "3", "-q"],
        capsys,
    )
    assert rc == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sae"]["k"] == 3 and cfg["sae"]["num_latents"] == 32 and cfg["seed"] == 5
    assert cfg["hookpoints"] == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert sorted(p.name for p in (out / "final").iterdir()) == cfg["hookpoints"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hookpoints", "nope.*"], "hookpoints: 'nope.*' matches no module; available: embed"),
        (["--sae.k", "500"], "sae: k must be <= num_latents (64), got 500"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1 and <= 1048576, got 0"),
        (["--sae.auxk-alpha", "-1"], "sae.auxk_alpha must be greater than or equal to 0"),
        (["--subject", "/no/such/dir"], "subject '/no/such/dir' not found"),
        (["--corpus", "/no/such.txt"], "corpus '/no/such.txt' not found"),
        (["--micro-batches", "3"], "batch_size (8) must be divisible by micro_batches (3)"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, extra, message) -> None:
    out = tmp_path / "run"
    rc, stdout, err = _cli(["sae", "train", "--out", out, *TINY, *extra], capsys)
    assert rc == 2 and stdout == ""
    assert err.startswith("sparselens: error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()


def test_resume_needs_out_and_keeps_settings(tmp_path: Path, capsys) -> None:
    rc, _, err = _cli(["sae", "train", "--resume"], capsys)
    assert rc == 2 and "--resume needs --out DIR" in err
    out = tmp_path / "run"
    assert _cli(["sae", "train", "--out", out, *TINY, "-q"], capsys)[0] == 0
    rc, _, err = _cli(["sae", "train", "--out", out, "--resume", "--sae.k", "2"], capsys)
    assert rc == 2 and "sae differs from the run's config.yaml" in err


def test_hf_subject_from_the_command_line(tmp_path: Path, capsys) -> None:
    """`--subject DIR` with a tiny random GPT-2 (save_pretrained, no downloads) and
    `--hookpoints 'transformer.h.*.mlp'`."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    argv = ["sae", "train", "--subject", tmp_path / "gpt2", "--hookpoints", "transformer.h.*.mlp",
            "--out", out, *TINY, "--tokens", str(8 * 16 * 3), "--val-fraction", "0.2"]  # fmt: skip
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    assert "transformer.h.0.mlp: FVU" in stdout and "transformer.h.1.mlp: FVU" in stdout
    prov = json.loads((out / "final" / "transformer.h.1.mlp" / "cfg.json").read_text())
    assert prov["provenance"]["subject_kind"] == "hf" and prov["d_in"] == 32


def test_cache_then_train_from_it(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    rc, stdout, err = _cli(
        ["sae", "cache", "--out", cache, "--context-len", "16", "--tokens", "1024",
         "--shard-tokens", "300", "--threads", "1", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert stdout.startswith(f"sparselens sae cache: {cache.resolve()}")
    index = json.loads((cache / "index.json").read_text())
    assert index["hookpoints"] == {"blocks.0.resid_post": {"d_in": 64, "d_out": 64}}
    assert len(index["shards"]) >= 3
    out = tmp_path / "run"
    rc, stdout, err = _cli(["sae", "train", "--cache", cache, "--out", out, *TINY], capsys)
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["cache"] == str(cache.resolve())
    rc, _, err = _cli(["sae", "cache", "--out", cache, "--context-len", "16"], capsys)
    assert rc == 2 and "already exists and is not empty" in err
