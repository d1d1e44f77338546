"""``sparselens spd run`` from the command line: bundled names, YAML files, flags, errors."""

from __future__ import annotations

import json

import pytest
import yaml

import sparselens.cli as cli
from sparselens.spd.cli_commands import register, scalar_fields

TINY = [
    "--steps", "4", "--batch-size", "32", "--eval-every", "2", "--eval-batches", "1",
    "--log-every", "2", "--checkpoint-every", "2", "--final-eval-samples", "64",
    "--set", "decomposition=[{pattern: linear1, C: 6}, {pattern: linear2, C: 6, tied_to: linear1}]",
    "--set", "ci_hidden=[4]", "--set", "faithfulness_warmup.steps=2", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _spd_command(monkeypatch):
    """Until the lead wires ``spd`` into sparselens.cli.COMMANDS, add it for these tests."""
    if "spd" not in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, "spd", register)


def _cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_a_bundled_config_with_overrides(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = _cli(["spd", "run", "tms_5-2", *TINY, "--seed", "3", "--out", out], capsys)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0] == f"sparselens spd run: {out.resolve()}"
    assert lines[1].startswith("  target tms_5-2, 4 steps of batch 32:")
    assert any(line.startswith("  MMCS ") for line in lines)
    assert any("one-hot CI error (tol 0.1): linear1" in line for line in lines)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["steps"], saved["seed"], saved["batch_size"]) == (4, 3, 32)
    assert saved["ci_hidden"] == [4] and saved["faithfulness_warmup"]["steps"] == 2
    # bundled settings the flags did not touch stay
    assert saved["losses"]["importance_minimality"]["coeff"] == 3e-3
    assert saved["lr"] == {
        "kind": "cosine", "start": 2e-3, "end": 0.0, "start_frac": 0.0, "end_frac": 1.0
    }  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"][:4] == ["sparselens", "spd", "run", "tms_5-2"]
    # --resume of the completed run prints the same summary and changes nothing
    rc, again, err = _cli(["spd", "run", "--resume", "--out", out, "-q"], capsys)
    assert rc == 0, err
    assert again == ""
    # spd eval of a checkpoint: its own summary lines, written under eval/step-2
    rc, ev, err = _cli(["spd", "eval", out, "--step", "2"], capsys)
    assert rc == 0, err
    lines = ev.splitlines()
    assert lines[0] == f"sparselens spd eval: {out.resolve()}"
    assert lines[1].startswith("  target tms_5-2, step 2 of 4 of batch 32:")
    assert lines[-1] == f"  report: {out.resolve() / 'eval' / 'step-2' / 'report.md'}"
    assert (out / "eval" / "step-2" / "summary.json").is_file()
    rc, _, err = _cli(["spd", "eval", out, "--step", "3"], capsys)
    assert rc == 2 and "step must be one of the kept checkpoints [2, 4], got 3" in err
    assert len(err.strip().splitlines()) == 1


def test_yaml_file_lr_flag_and_quiet(tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(
        "target: tms_5-2\nsteps: 2\nbatch_size: 16\nlr: {kind: linear, start: 0.002, end: 0.001}\n"
        "decomposition: [{pattern: linear1, C: 4}]\nci_hidden: [2]\nfinal_eval_samples: 32\n"
        "eval_batches: 1\nlosses: {importance_minimality: {coeff: 0.001}}\nprogress: false\n"
    )
    out = tmp_path / "run"
    rc, stdout, err = _cli(["spd", "run", cfg, "--lr", "0.004", "--out", out, "-q"], capsys)
    assert rc == 0, err
    assert stdout == ""
    lr = yaml.safe_load((out / "config.yaml").read_text())["lr"]
    assert (lr["kind"], lr["start"], lr["end"]) == ("linear", 0.004, 0.002)  # shape kept


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["tms_9-9"], "config name must be one of tms_5-2, "),
        (["nowhere/cfg.yaml"], "config file nowhere/cfg.yaml: no such file"),
        ([], "CONFIG is required"),
        (["tms_5-2", "--steps", "0"], "steps must be an integer >= 1 and"),
        (["tms_5-2", "--batch-size", "many"], "batch_size must be an integer"),
        (["tms_5-2", "--ci-fn", "rnn"], "ci_fn must be one of"),
        (["tms_5-2", "--set", "losses.importance_minimality.bogus=1"], "unknown setting"),
        (["tms_5-2", "--set", "steps"], "--set needs KEY=VALUE"),
        (["tms_5-2", "--set", "decomposition=[{pattern: nope, C: 2}]"], "nope"),
        (["tms_5-2", "--lr", "fast"], "lr must be a finite number > 0"),
        (["tms_5-2", "--resume"], "--resume needs --out DIR"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, pattern):
    out = [] if "--resume" in args else ["--out", tmp_path / "run"]
    rc, _, err = _cli(["spd", "run", *args, *out, "-q"], capsys)
    assert rc == 2
    assert err.startswith("sparselens: error: ") and err.count("\n") == 1, err
    assert pattern in err
    assert not (tmp_path / "run").exists()


def test_flags_cover_the_scalar_settings():
    names = scalar_fields()
    assert {"steps", "batch_size", "seed", "threads", "target", "C", "ci_fn"} <= set(names)
    assert not {"losses", "decomposition", "lr", "faithfulness_warmup"} & set(names)


def _summary(**extra):
    base = dict(run_dir="runs/x", target="tms_5-2", steps=10, batch_size=8, train_seconds=1.0)
    base |= dict(step_ms=100.0, wall_seconds=2.0, layers=["a"], recon={"ci": 1e-3})
    base |= dict(ci_l0={"a": 1.5}, non_negligible={"a": 3})
    return {**base, **extra}


def test_summary_lines_of_old_and_new_summaries():
    """``spd eval`` / ``--resume`` print saved summaries: one from before ``one_hot_active``,
    ``one_hot_clean`` and ``neuron_contributions`` still prints; a new one shows them, NaN saved
    as "nan" included, clean counts only beside the identity-pattern layers."""
    from sparselens.spd.cli_commands import summary_lines

    old = summary_lines(_summary())
    assert "  CI-L0 per layer (subcomponents non-negligible): a 1.500 (3)" in old
    assert not any("neuron contributions" in line for line in old)
    errors = dict(identity_ci_error={"a": 4}, dense_ci_error={"b": 1}, ci_error_total=5)
    assert "  one-hot CI error (tol 0.1): a 4, b 1; total 5" in summary_lines(_summary(**errors))
    new = summary_lines(
        _summary(
            **errors,
            one_hot_clean={"a": 7},
            one_hot_active={"a": 2},
            neuron_contributions={"a": {"slope": 0.96612, "r2": "nan"}},
        )
    )
    what = "non-negligible / active on one-hot inputs"
    assert f"  CI-L0 per layer (subcomponents {what}): a 1.500 (3 / 2)" in new
    assert "  neuron contributions vs the target (slope / R² about y = x): a 0.966 / nan" in new
    assert "  one-hot CI error (tol 0.1): a 4 (7 clean), b 1; total 5" in new
