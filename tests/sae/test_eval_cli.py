"""``sparselens sae eval`` / ``sae inspect`` from the command line: run directories, single
coder directories with and without provenance, transcoders, one-line errors (exit 2) with no
partial output, and agreement with the library functions they wrap."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import sparselens.cli as cli
from sparselens.sae import SparseCoder, SparseCoderConfig, save_sparse_coder
from sparselens.sae.data import load_tokens
from sparselens.sae.eval_cli import register_eval_commands, resolve_target
from sparselens.sae.evaluate import evaluate
from sparselens.sae.subject import load_subject

FIXTURES = Path(__file__).parent / "fixtures"
H0, H1 = "blocks.0.resid_post", "blocks.1.resid_post"
FAST = ["--tokens", "1024", "--batch-size", "16", "--threads", "1", "--no-progress"]


def _register(subparsers) -> None:
    """A stand-in ``sae`` group holding only our commands (independent of `sae train`)."""
    sae = subparsers.add_parser("sae", allow_abbrev=False)
    register_eval_commands(sae.add_subparsers(dest="sae_command", required=True))


@pytest.fixture(autouse=True)
def _sae_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "sae", _register)


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


@pytest.fixture(scope="module")
def subject():
    return load_subject()


def _coder(subject, hook: str, *, transcode: bool = False, seed: int = 0) -> SparseCoder:
    """A coder with b_dec at the mean of the hookpoint's activations on a few windows."""
    from sparselens.lm.hooks import capture

    torch.manual_seed(seed)
    c = SparseCoder(64, SparseCoderConfig(num_latents=96, k=6, transcode=transcode))
    toks = load_tokens(subject, split="train")[: 8 * 32].view(8, 32)
    acts = capture(subject.model, lambda: subject.logits(toks), [hook], where="output")
    c.init_b_dec(acts[(hook, "output")])
    if transcode:
        with torch.no_grad():
            c.W_dec.normal_(0.0, 0.05)
    return c


def _provenance(hook: str, transcode: bool = False) -> dict:
    return {
        "subject": "minigpt",
        "hookpoint": hook,
        "transcode": transcode,
        "corpus": "verbs",
        "context_len": 32,
        "exclude_special_tokens": True,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, subject) -> Path:
    """A `sae train`-shaped run: config.yaml and final/<hookpoint>/ for two hookpoints."""
    root = tmp_path_factory.mktemp("run") / "r"
    cfg = {
        "subject": "minigpt",
        "corpus": "verbs",
        "hookpoints": [H0, H1],
        "transcode": False,
        "context_len": 32,
        "exclude_special_tokens": True,
        "val_fraction": 0.05,
    }
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    for i, h in enumerate((H0, H1)):
        save_sparse_coder(_coder(subject, h, seed=i), root / "final" / h, provenance=_provenance(h))
    return root


def _files(p: Path) -> list[str]:
    return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) if p.exists() else []


# -- eval ---------------------------------------------------------------------------------------
def test_eval_run_dir_matches_library(run_dir: Path, tmp_path: Path, subject, capsys) -> None:
    """Every coder of the run is evaluated on the val split of the run's corpus with its context
    length, exactly as :func:`evaluate` does; eval.json, the density plot and report.md appear."""
    out = tmp_path / "ev"
    rc, stdout, err = _cli(["sae", "eval", run_dir, "--out", out, *FAST], capsys)
    assert rc == 0, err
    assert _files(out) == ["eval.json", "plots/density.png", "report.md"]
    doc = json.loads((out / "eval.json").read_text())
    assert list(doc["hookpoints"]) == [H0, H1] and doc["split"] == "val"
    assert doc["subject"] == "minigpt" and doc["corpus"] == "verbs"
    from sparselens.sae import load_sparse_coder

    toks = load_tokens(subject, "verbs", split="val", val_fraction=0.05)[:1024]
    want = evaluate(
        subject, load_sparse_coder(run_dir / "final" / H1), H1, toks, context_len=32, batch_size=7
    )
    got = doc["hookpoints"][H1]
    for key in ("fvu", "l0", "dead_fraction", "ce_sae", "kl_sae", "ce_loss_recovered"):
        assert got[key] == pytest.approx(getattr(want, key), rel=1e-9), key
    assert got["positions"] == 1024 and got["context_len"] == 32
    assert (out / "plots/density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"| `{H0}` |" in report and "CE recovered" in report
    assert stdout.splitlines()[0] == f"sparselens sae eval: {out.resolve()}"
    assert stdout.splitlines()[1].startswith(f"  {H0}: FVU ")


def test_eval_one_hookpoint_default_out_and_flags(run_dir: Path, tmp_path: Path, capsys) -> None:
    """``--hookpoint`` narrows to one coder; the default output is <run>/eval; flags override the
    recorded settings (context length, token exclusion)."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    argv = ["sae", "eval", run, "--hookpoint", H0, "--context-len", "16", "-q", *FAST]
    rc, stdout, err = _cli([*argv, "--no-exclude-special-tokens"], capsys)
    assert rc == 0 and stdout == "", err
    r = json.loads((run / "eval" / "eval.json").read_text())["hookpoints"]
    assert list(r) == [H0]
    assert r[H0]["context_len"] == 16 and r[H0]["exclude_special_tokens"] is False
    assert r[H0]["tokens"] == r[H0]["positions"] == 1024


def test_eval_single_coder_dir_and_transcoder(tmp_path: Path, subject, capsys) -> None:
    """A coder directory with provenance needs no flags; a transcoder (hookpoint blocks.0.mlp)
    is evaluated as one (its cfg.json says so)."""
    d = save_sparse_coder(
        _coder(subject, "blocks.0.mlp", transcode=True),
        tmp_path / "tc",
        provenance=_provenance("blocks.0.mlp", transcode=True),
    )
    rc, _, err = _cli(["sae", "eval", d, "-q", *FAST], capsys)
    assert rc == 0, err
    r = json.loads((d / "eval" / "eval.json").read_text())["hookpoints"]["blocks.0.mlp"]
    assert r["transcode"] is True and 0 < r["fvu"]


def test_sparsify_checkpoint_without_provenance(tmp_path: Path, capsys) -> None:
    """A plain sparsify directory records no hookpoint or subject: ask for them; then a width
    that does not match the hookpoint is a one-line error and nothing is written."""
    d = FIXTURES / "sparsify_tiny" / "sae"
    out = tmp_path / "o"
    rc, _, err = _cli(["sae", "eval", d, "--out", out, *FAST], capsys)
    assert rc == 2 and "records no hookpoint" in err and "--hookpoint" in err
    rc, _, err = _cli(["sae", "eval", d, "--out", out, "--hookpoint", H0, *FAST], capsys)
    assert rc == 2 and "no subject recorded; pass --subject" in err
    argv = ["sae", "eval", d, "--out", out, "--hookpoint", H0, "--subject", "minigpt", *FAST]
    rc, _, err = _cli(argv, capsys)
    assert rc == 2
    assert err.strip().endswith(
        f"hookpoint {H0}: its output has width 64, but the sparse autoencoder's d_in is 8"
    )
    assert err.count("\n") == 1 and not out.exists()


def test_errors_exit_2_without_output(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Unknown hookpoints, missing or unreadable checkpoints, incomplete runs, bad settings:
    exit 2, one line naming the problem, no output directory."""
    out = tmp_path / "o"
    cases = []
    rc, _, err = _cli(["sae", "eval", run_dir, "--out", out, "--hookpoint", "x.y", *FAST], capsys)
    cases.append((rc, err, f"has no coder for hookpoint 'x.y'; it has: {H0}, {H1}"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text((run_dir / "final" / H0 / "cfg.json").read_text())
    rc, _, err = _cli(["sae", "eval", bad, "--out", out, *FAST], capsys)
    cases.append((rc, err, "sae.safetensors: no such file"))
    (bad / "sae.safetensors").write_bytes(b"not safetensors")
    rc, _, err = _cli(["sae", "eval", bad, "--out", out, *FAST], capsys)
    cases.append((rc, err, "not a readable safetensors file"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("subject: minigpt\n")
    rc, _, err = _cli(["sae", "eval", unfinished, "--out", out], capsys)
    cases.append((rc, err, "the run has no coders in final/"))
    rc, _, err = _cli(["sae", "eval", tmp_path / "missing", "--out", out], capsys)
    cases.append((rc, err, "no such run or sparse coder directory"))
    (tmp_path / "empty").mkdir()
    rc, _, err = _cli(["sae", "eval", tmp_path / "empty", "--out", out], capsys)
    cases.append((rc, err, "is neither a `sparselens sae train` run directory"))
    rc, _, err = _cli(["sae", "eval", run_dir, "--out", out, "--tokens", "-3"], capsys)
    cases.append((rc, err, "tokens"))
    rc, _, err = _cli(["sae", "eval", run_dir, "--out", out, "--context-len", "64"], capsys)
    cases.append((rc, err, "context_len must be >= 2 and <= the subject's context length 32"))
    prov = _provenance("blocks.9.resid_post")
    wrong = tmp_path / "wronghook"
    tiny = SparseCoder(64, SparseCoderConfig(num_latents=8, k=2))
    save_sparse_coder(tiny, wrong, provenance=prov)
    rc, _, err = _cli(["sae", "eval", wrong, "--out", out, *FAST], capsys)
    cases.append((rc, err, "'blocks.9.resid_post' matches no module; available: embed"))
    for rc, err, msg in cases:
        assert rc == 2 and msg in err, (msg, err)
        assert err.startswith("sparselens: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_resolve_target_sparsify_save_dir(run_dir: Path) -> None:
    """A directory of coder directories (sparsify's save_dir) lists one coder per subdirectory;
    a run lists its coders in config order."""
    t = resolve_target(run_dir / "final")
    assert t.kind == "coders" and [c.hookpoint for c in t.coders] == [H0, H1]
    t = resolve_target(run_dir, H1)
    assert t.kind == "run" and [c.hookpoint for c in t.coders] == [H1]
    assert t.coders[0].recorded["val_fraction"] == 0.05


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_writes_json_and_page(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "insp"
    argv = ["sae", "inspect", run_dir, "--hookpoint", H1, "--out", out, "--top", "3", *FAST]
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    assert _files(out) == ["index.html", "latents.json"]
    doc = json.loads((out / "latents.json").read_text())
    assert doc["hookpoint"] == H1 and doc["n_top"] == 3
    assert doc["latents"] and all(len(r["contexts"]) <= 3 for r in doc["latents"])
    first = doc["latents"][0]["contexts"][0]
    assert {"activation", "tokens", "position"} <= first.keys()
    page = (out / "index.html").read_text()
    assert page.count("<section") == len(doc["latents"]) and page.count("<script") == 1
    assert stdout.startswith(f"sparselens sae inspect: {out.resolve()}")


def test_inspect_needs_one_hookpoint(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "insp"
    rc, _, err = _cli(["sae", "inspect", run_dir, "--out", out, *FAST], capsys)
    assert rc == 2 and f"holds several coders ({H0}, {H1}); choose one: --hookpoint" in err
    assert not out.exists()


def test_sae_group_registers_eval_and_inspect(monkeypatch) -> None:
    """The `sae` group of `sparselens.sae.cli_commands` carries both commands."""
    from sparselens.sae.cli_commands import register

    monkeypatch.setitem(cli.COMMANDS, "sae", register)
    parser = cli.build_parser()
    a = parser.parse_args(["sae", "eval", "R", "--tokens", "5", "--hookpoint", "h"])
    assert a.handler.__name__ == "_run_eval_command" and a.target == "R" and a.tokens == "5"
    a = parser.parse_args(["sae", "inspect", "R", "--top", "3"])
    assert a.handler.__name__ == "_run_inspect_command" and a.top == "3"


# -- with the real `sae train` ------------------------------------------------------------------
def test_after_sae_train(tmp_path: Path, subject, capsys, monkeypatch) -> None:
    """`sae train` (the real `sae` group, which registers our commands), then `sae eval` and
    `sae inspect` on its run directory. Eval reads the held-out split the trainer validated on:
    on the same 256 positions its FVU, L0, dense and never-fired fractions equal the run's
    summary (wrong variant caught: evaluating on the train split)."""
    from sparselens.sae.cli_commands import register

    monkeypatch.setitem(cli.COMMANDS, "sae", register)
    run = tmp_path / "run"
    rc, _, err = _cli(
        ["sae", "train", "--out", run, "--batch-size", "8", "--context-len", "16", "--tokens",
         "768", "--lr-warmup-steps", "1", "--eval-tokens", "256", "--sae.num-latents", "64",
         "--sae.k", "4", "--threads", "1", "--no-progress", "-q"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = _cli(["sae", "eval", run, "--tokens", "256", "-q"], capsys)
    assert rc == 0, err
    r = json.loads((run / "eval" / "eval.json").read_text())["hookpoints"][H0]
    assert r["context_len"] == 16 and r["num_latents"] == 64
    s = json.loads((run / "summary.json").read_text())["hookpoints"][H0]
    assert r["tokens"] == s["val_tokens"]
    assert r["fvu"] == pytest.approx(s["fvu"], rel=1e-9) and r["l0"] == pytest.approx(s["l0"])
    assert r["dense_fraction"] == s["dense_fraction"]
    assert r["dead_fraction"] == s["never_fired_on_val_fraction"]
    train = load_tokens(subject, "verbs", split="train")[:256]
    from sparselens.sae import load_sparse_coder

    coder = load_sparse_coder(run / "final" / H0)
    on_train = evaluate(subject, coder, H0, train, context_len=16, batch_size=8)
    assert abs(on_train.fvu - r["fvu"]) > 1e-4
    rc, _, err = _cli(["sae", "inspect", run, "--tokens", "2048", "-q"], capsys)
    assert rc == 0, err
    assert (run / "inspect" / H0 / "index.html").is_file()
