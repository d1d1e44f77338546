"""``sparselens calibrate``: outputs, one-line errors, interrupts and exact resume."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from sparselens import __version__
from sparselens.cli import main
from sparselens.l0.calibrate_job import CalibrateConfig, run_calibration
from sparselens.l0.synthetic import make_survey

SMALL_SIZE = {"synthetic_records": 300, "synthetic_targets": 30}
SMALL_FIT = {"epochs": 60, "refit_epochs": 30, "checkpoint_every": 20, "progress": False}
SMALL = [
    "--synthetic-records",
    "300",
    "--synthetic-targets",
    "30",
    "--epochs",
    "60",
    "--refit-epochs",
    "30",
    "--checkpoint-every",
    "20",
    "--no-progress",
]
FINAL = ("weights.csv", "target_errors.csv", "summary.json", "report.md")
PLOTS = ("loss.png", "relative_error.png", "weights_hist.png")


def _cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _subprocess_cmd() -> list[str]:
    script = Path(sys.executable).parent / "sparselens"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sparselens.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def _pct(x: float) -> str:
    return f"{100 * x:.4g} %"


def check_outputs(run_dir: Path, M: sp.csr_array, y: np.ndarray, floor: float = 1.0) -> dict:
    """Every output exists and parses; the summary and report agree with weights.csv."""
    for name in (*FINAL, "config.yaml", "manifest.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    for name in PLOTS:
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert not (run_dir / ".staging").exists()
    assert [p for p in run_dir.rglob("*.tmp")] == []

    CalibrateConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["end_time"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    fit = [m for m in metrics if m["phase"] == "fit"]
    refit = [m for m in metrics if m["phase"] == "refit"]
    assert [m["epoch"] for m in fit] == list(range(1, summary["fit"]["epochs"] + 1))
    assert [m["epoch"] for m in refit] == list(range(1, summary["refit"]["epochs"] + 1))
    assert all(math.isfinite(m["loss"]) for m in fit + refit)

    w = _read_weights(run_dir / "weights.csv")
    assert np.array_equal(w["record"], np.arange(M.shape[1]))
    final, gated = w["weight"], w["gated_weight"]
    assert (final >= 0).all() and (gated >= 0).all()
    n = int((final > 0).sum())
    assert summary["nonzero"] == summary["refit"]["nonzero"] == n
    assert summary["fit"]["nonzero"] == int((gated > 0).sum())
    assert math.isclose(summary["refit"]["sum"], final.sum(), rel_tol=1e-12)
    for key, weights in (("fit", gated), ("refit", final)):
        err = np.abs(M @ weights - y) / np.maximum(np.abs(y), floor)
        stats = summary[key]["rel_error"]
        for stat, value in (("mean", err.mean()), ("median", np.median(err)), ("max", err.max())):
            assert abs(stats[stat] - value) <= 1e-5 + 1e-4 * value, (key, stat)

    report = (run_dir / "report.md").read_text()
    assert f"non-zero weights: **{n}** of {M.shape[1]}" in report
    for key in ("fit", "refit"):
        for stat in ("mean", "median", "max"):
            assert _pct(summary[key]["rel_error"][stat]) in report
    for name in PLOTS:
        assert f"(plots/{name})" in report
    return summary


# -- successful runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The real command in a subprocess (small synthetic survey), uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(
        [*_subprocess_cmd(), "calibrate", *SMALL, "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"sparselens calibrate: {out.resolve()}" in proc.stdout
    assert "report:" in proc.stdout
    return out


def test_default_command_writes_every_output(reference_run):
    s = make_survey(300, 30)
    summary = check_outputs(reference_run, s.M, s.y)
    assert summary["refit"]["rel_error"]["max"] < summary["fit"]["rel_error"]["max"]
    rec = summary["recovery"]
    assert rec["true_active"] == 150 and rec["selected"] == summary["nonzero"]
    assert 0 <= rec["selected_true_active"] <= min(rec["true_active"], rec["selected"])
    assert "Recovery of the known truth" in (reference_run / "report.md").read_text()
    weights = _read_weights(reference_run / "weights.csv")
    np.testing.assert_array_equal(weights["true_weight"], s.w_true)


def test_files_and_yaml_config_in_process(tmp_path, capsys):
    s = make_survey(200, 15, seed=5)
    mpath, _ = s.write(tmp_path / "data")
    with open(tmp_path / "data" / "targets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "value", "weight", "tolerance", "group"])
        for j in range(15):
            w.writerow([s.target_names[j], repr(float(s.y[j])), 1 + j % 2, 0, s.groups[j]])
    (tmp_path / "cfg.yaml").write_text(
        "matrix: data/matrix.npz\ntargets: data/targets.csv\n"
        "epochs: 1000\nrefit_epochs: 20\nuse_groups: true\nloss_type: relative_epsilon\n"
        "init_weight: auto\nprogress: false\n"
    )
    out = tmp_path / "run"
    rc, stdout, err = _cli(
        ["calibrate", "--config", tmp_path / "cfg.yaml", "--epochs", "40", "--out", out], capsys
    )
    assert rc == 0, err
    assert "after refit" in stdout
    summary = check_outputs(out, s.M, s.y)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 40  # the flag beats the file
    assert cfg["matrix"] == str(mpath.resolve()) and cfg["init_weight"] == "auto"
    assert summary["data"] == {"source": "files", "n_records": 200, "n_targets": 15, "nnz": s.M.nnz}
    assert "recovery" not in summary and len(summary["groups"]) == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["data"]["matrix_sha256"]) == 64
    assert manifest["command"][:2] == ["sparselens", "calibrate"]
    assert manifest["seed"] == 0


def test_default_out_is_a_timestamped_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(["calibrate", *SMALL, "--refit-epochs", "0", "--epochs", "20"], capsys)
    assert rc == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"calibrate-\d{8}-\d{6}", run.name)
    summary = json.loads((run / "summary.json").read_text())
    w = _read_weights(run / "weights.csv")
    assert np.array_equal(w["weight"], w["gated_weight"])  # no refit: final = gated
    assert summary["refit"]["epochs"] == 0


def test_target_count_bisection(tmp_path):
    cfg = CalibrateConfig(**SMALL_SIZE, **SMALL_FIT, target_count=100, budget_iters=3)
    summary = run_calibration(cfg, tmp_path / "run")
    assert 1 <= len(summary["bisection"]) <= 3 + 20
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["trial"] for m in metrics if m["phase"] == "bisection"] == list(
        range(1, len(summary["bisection"]) + 1)
    )
    best = min(summary["bisection"], key=lambda t: abs(t["count"] - 100))
    assert summary["fit"]["nonzero"] == best["count"]
    assert summary["lambda_l0"] == best["lambda_l0"]

    def stop(epoch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after the bisection, before the refit
        run_calibration(cfg, tmp_path / "again", on_checkpoint=stop)
    resumed = run_calibration(cfg, tmp_path / "again", resume=True)
    assert resumed["bisection"] == summary["bisection"]
    for name in ("weights.csv", "metrics.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparselens {__version__}"


# -- bad input: one line, exit status 2, nothing written ----------------------------------------
@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    s = make_survey(50, 5, seed=1)
    mpath, tpath = s.write(tmp_path / "ok")
    bad = tmp_path / "bad"
    bad.mkdir()
    text = tpath.read_text().splitlines()
    (bad / "nan.csv").write_text("\n".join([*text[:2], "x,nan,people", *text[3:]]) + "\n")
    (bad / "short.csv").write_text("\n".join(text[:-1]) + "\n")
    (bad / "header.csv").write_text("name,value,tolerence\na,1,0\n")
    (bad / "notnum.csv").write_text("name,value\na,lots\n")
    (bad / "not.npz").write_text("hello")
    M = s.M.toarray()
    M[2, 3] = np.inf
    sp.save_npz(bad / "inf.npz", sp.csr_matrix(M))
    (bad / "unknown.yaml").write_text("epochs: 5\nbogus: 1\n")
    return {"M": mpath, "T": tpath, **{p.name: p for p in bad.iterdir()}}


BAD_INPUTS = [
    (
        ["--matrix", "{tmp}/missing.npz", "--targets", "{T}"],
        r"matrix file .*missing\.npz: no such file",
    ),
    (
        ["--matrix", "{M}", "--targets", "{tmp}/missing.csv"],
        r"targets file .*missing\.csv: no such file",
    ),
    (
        ["--matrix", "{M}", "--targets", "{nan.csv}"],
        r"nan\.csv line 3: value must be finite, got nan",
    ),
    (["--matrix", "{M}", "--targets", "{notnum.csv}"], r"line 2: value 'lots' is not a number"),
    (
        ["--matrix", "{M}", "--targets", "{short.csv}"],
        r"has 5 rows but targets file .* has 4 targets",
    ),
    (["--matrix", "{M}", "--targets", "{header.csv}"], r"unknown column 'tolerence'"),
    (["--matrix", "{not.npz}", "--targets", "{T}"], r"not\.npz: not a scipy sparse \.npz"),
    (
        ["--matrix", "{inf.npz}", "--targets", "{T}"],
        r"inf\.npz: must be finite, found inf in row 2",
    ),
    (["--matrix", "{M}"], r"matrix and targets must be given together"),
    (
        ["--matrix", "{M}", "--targets", "{T}", "--synthetic-records", "9"],
        r"synthetic_records applies only",
    ),
    (["--epochs", "-1"], r"epochs must be an integer >= 0, got -1"),
    (["--epochs", "ten"], r"epochs must be an integer >= 0, got ten"),
    (["--beta", "0"], r"beta must be > 0, got 0"),
    (["--tau", "-0.5"], r"beta must be > 0, got -0.5"),
    (["--lr", "inf"], r"lr must be a finite number > 0"),
    (["--init-keep-prob", "1.5"], r"init_keep_prob must be > 0 and <= 1, got 1.5"),
    (["--init-weight", "-3"], r"init_weight must be a finite number > 0 or 'auto'"),
    (
        ["--loss-type", "l1"],
        r"loss_type must be one of 'relative', 'mse' or 'relative_epsilon', got l1",
    ),
    (["--inference", "mode"], r"inference must be one of"),
    (["--checkpoint-every", "0"], r"checkpoint_every must be an integer >= 1, got 0"),
    (
        ["--synthetic-records", "300", "--target-count", "301"],
        r"target_count must be <= the number of records \(300\), got 301",
    ),
    (["--bogus", "1"], r"unrecognized arguments: --bogus 1"),
    (["--config", "{unknown.yaml}"], r"unknown setting 'bogus'"),
    (["--config", "{tmp}/nope.yaml"], r"config file .*nope\.yaml: no such file"),
    (["--resume"], r"cannot resume .*run: no config\.yaml"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(args, pattern, files, tmp_path, capsys):
    subs = {"tmp": str(tmp_path), **{k: str(v) for k, v in files.items()}}
    argv = []
    for a in args:
        for key, value in subs.items():
            a = a.replace("{" + key + "}", value)
        argv.append(a)
    out = tmp_path / "run"
    rc, stdout, err = _cli(["calibrate", *SMALL_ARGS_NO_FIT, *argv, "--out", out], capsys)
    assert rc == 2
    assert stdout == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("sparselens: error: ")
    assert re.search(pattern, err), err
    assert not out.exists()


SMALL_ARGS_NO_FIT = ["--epochs", "1", "--refit-epochs", "0", "--no-progress"]


def test_no_command_and_unknown_command(capsys):
    for argv, pattern in (([], "required: COMMAND"), (["fly"], "invalid choice: 'fly'")):
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and pattern in err


def test_out_in_use_and_resume_with_other_settings(reference_run, tmp_path, capsys):
    rc, _, err = _cli(["calibrate", *SMALL, "--out", reference_run], capsys)
    assert rc == 2 and "already exists" in err and "--resume" in err
    rc, _, err = _cli(["calibrate", "--out", reference_run, "--resume", "--epochs", "61"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "epochs differs from the run's config.yaml (saved 60, given 61)" in err


# -- interrupts and exact resume ----------------------------------------------------------------
def _final_outputs(run: Path) -> list[Path]:
    found = [p for p in run.rglob("*") if p.name in FINAL or p.name in PLOTS]
    return found + [p for p in run.rglob("*.tmp") if not p.name.startswith(".")]


def test_sigkill_after_first_checkpoint_then_resume_is_exact(reference_run, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal
        from sparselens.l0.calibrate_job import CalibrateConfig, run_calibration
        cfg = CalibrateConfig(**{ {**SMALL_SIZE, **SMALL_FIT}!r})
        run_calibration(cfg, {str(out)!r},
                        on_checkpoint=lambda epoch: os.kill(os.getpid(), signal.SIGKILL))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL

    assert _final_outputs(out) == []
    assert not (out / ".staging").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "fit-00000020.json",
        "fit-00000020.safetensors",
    ]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20

    proc = subprocess.run(
        [*_subprocess_cmd(), "calibrate", "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("weights.csv", "metrics.jsonl", "target_errors.csv"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumes"]) == 1
    s = make_survey(300, 30)
    check_outputs(out, s.M, s.y)


def test_sigterm_exits_nonzero_without_partial_outputs(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*_subprocess_cmd(), "calibrate", *SMALL, "--epochs", "1000000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("*.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert stdout == ""
    assert stderr.count("\n") == 1 and "interrupted" in stderr and "SIGTERM" in stderr
    assert _final_outputs(out) == [] and list(out.rglob("*.tmp")) == []
    assert not (out / ".staging").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"


@pytest.mark.parametrize("stop_at", [40, 60])
def test_interrupt_in_process_then_resume(reference_run, tmp_path, stop_at):
    """Stopped mid-fit (40) or after the last fit checkpoint, before the refit (60)."""
    cfg = CalibrateConfig(**SMALL_SIZE, **SMALL_FIT)

    def stop(epoch: int) -> None:
        if epoch == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_calibration(cfg, tmp_path / "run", on_checkpoint=stop)
    assert _final_outputs(tmp_path / "run") == []
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "interrupted"

    seen = []
    summary = run_calibration(cfg, tmp_path / "run", resume=True, on_checkpoint=seen.append)
    assert seen == list(range(stop_at + 20, 61, 20))  # continued after the checkpoint
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    again = run_calibration(cfg, tmp_path / "run", resume=True)  # complete: nothing to do
    assert again == summary
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest
    s = make_survey(300, 30)
    check_outputs(tmp_path / "run", s.M, s.y)
    for name in ("weights.csv", "metrics.jsonl"):
        assert (tmp_path / "run" / name).read_bytes() == (reference_run / name).read_bytes()


@pytest.mark.slow
def test_external_sigkill_at_any_time_then_resume_is_exact(tmp_path):
    """SIGKILL from outside, wherever the run happens to be (possibly mid-checkpoint write)."""
    args = [*SMALL, "--epochs", "3000", "--checkpoint-every", "50"]
    ref = tmp_path / "ref"
    subprocess.run(
        [*_subprocess_cmd(), "calibrate", *args, "--out", str(ref)],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=600,
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*_subprocess_cmd(), "calibrate", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        while not list((out / "checkpoints").glob("*.json")) and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert _final_outputs(out) == []
    subprocess.run(
        [*_subprocess_cmd(), "calibrate", "--out", str(out), "--resume"],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=600,
    )
    assert list(out.rglob("*.tmp")) == []
    for name in ("weights.csv", "metrics.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_python_dash_m_sparselens_is_the_command():
    """``python -m sparselens`` (what ``torchrun -m sparselens`` runs) is the same command."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparselens", "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sparselens {__version__}"
