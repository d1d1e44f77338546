"""Run machinery: atomic writes, checkpoints (exact round trip), the run directory, manifest,
staged outputs, logging, progress bars, seeding and signals."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparselens.train import (
    Interrupted,
    RunDir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    format_validation_error,
    load_safetensors,
    load_torch,
    load_yaml_mapping,
    progress_bar,
    remove_temp_files,
    save_safetensors,
    save_torch,
    seed_everything,
    setup_logging,
    termination_signals,
)
from sparselens.train.checkpoint import (
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)


def _tmp_files(d):
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


# -- atomic writes ------------------------------------------------------------------------------
def test_atomic_writers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5, None]})
    atomic_write_yaml(tmp_path / "sub" / "d.yaml", {"b": 1, "a": "z"})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5, None]}
    text = (tmp_path / "sub" / "d.yaml").read_text()
    assert yaml.safe_load(text) == {"b": 1, "a": "z"}
    assert text.index("b:") < text.index("a:")  # insertion order kept
    assert _tmp_files(tmp_path) == []


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.csv"
    atomic_write_text(target, "old,complete\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(target, "w") as f:
            f.write("new,half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old,complete\n"
    assert _tmp_files(tmp_path) == []


def test_failure_at_replace_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="replace failed"):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _tmp_files(tmp_path) == []


def test_an_interrupt_as_the_temp_file_is_created_leaves_no_temp_file(tmp_path, monkeypatch):
    """SIGTERM/SIGINT become exceptions (``train.signals``) that can land between the temp file's
    creation and the cleanup handler being in place. Simulated by an interrupt right after the
    file is created, before its descriptor is returned. Catches naming the temp file only once
    ``mkstemp`` returns (the interrupt then strands ``.<name>.<random>.tmp``: a flaky CLI test)."""
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    real_open = os.open

    def interrupted_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT:
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(os, "open", interrupted_open)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert json.loads(target.read_text()) == {"v": 1}


def test_a_killed_write_leaves_only_a_hidden_temp_file_that_cleanup_removes(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "v1")
    # what a SIGKILL between write and replace leaves behind
    (tmp_path / ".report.md.abc123.tmp").write_text("v2 half")
    assert target.read_text() == "v1"
    removed = remove_temp_files(tmp_path)
    assert [p.name for p in removed] == [".report.md.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_atomic_open_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass


# -- torch and safetensors ----------------------------------------------------------------------
class _NotAllowed:
    pass


def test_torch_state_round_trip_with_weights_only(tmp_path):
    state = {"w": torch.arange(5.0), "meta": {"epoch": 3, "names": ["a", "b"]}, "t": (1, 2.5)}
    save_torch(tmp_path / "s.pt", state)
    back = load_torch(tmp_path / "s.pt")
    assert torch.equal(back["w"], state["w"])
    assert back["meta"] == state["meta"] and back["t"] == (1, 2.5)


def test_load_torch_refuses_arbitrary_pickles(tmp_path):
    torch.save({"obj": _NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_torch(tmp_path / "evil.pt")


def test_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(7, dtype=torch.int64)}
    save_safetensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    back = load_safetensors(tmp_path / "t.safetensors")
    assert set(back) == {"a", "b"}
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


# -- checkpoints --------------------------------------------------------------------------------
def _adam_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    return p, opt


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_flatten_state_round_trips_exactly():
    _, opt = _adam_state()
    gen = torch.Generator().manual_seed(5)
    state = {
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), None, bools, tensors
        "generator": gen.get_state(),
        "history": [{"loss": 0.1 + 0.2, "n": 3}, {"loss": float("nan")}, {"loss": -math.inf}],
        "array": np.arange(4, dtype=np.int32),
        "odd": {"__tensor__": "not a tensor", 7: "int key"},
    }
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # the tree is plain JSON
    assert _equal(unflatten_state(json.loads(json.dumps(tree)), tensors), state)


def test_flatten_state_rejects_unknown_types():
    with pytest.raises(TypeError, match=r"_NotAllowed at a\.0"):
        flatten_state({"a": [_NotAllowed()]})


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_checkpoint_resumes_an_optimizer_exactly(tmp_path, fmt):
    p, opt = _adam_state()
    path = save_checkpoint(
        tmp_path,
        {"p": p.detach().clone(), "opt": opt.state_dict()},
        3,
        meta={"note": "x"},
        fmt=fmt,
    )
    for _ in range(4):  # the uninterrupted run
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()

    state, step, meta = load_checkpoint(path)
    assert step == 3 and meta == {"note": "x"}
    q = torch.nn.Parameter(state["p"])
    opt2 = torch.optim.Adam([q], lr=0.1)
    opt2.load_state_dict(state["opt"])
    for _ in range(4):
        opt2.zero_grad()
        (q**2).sum().backward()
        opt2.step()
    assert torch.equal(p, q)


def test_checkpoint_checksum_and_completeness(tmp_path):
    path = save_checkpoint(tmp_path, {"w": torch.ones(3)}, 10, prefix="fit")
    assert path.name == "fit-00000010.json"
    # a tensor file without its json marker (killed between the two writes) is not a checkpoint
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, 20, prefix="fit")
    (tmp_path / "fit-00000020.json").unlink()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    # a corrupted tensor file is detected
    (tmp_path / "fit-00000010.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(path)


# -- the run directory --------------------------------------------------------------------------
class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.1, gt=0)
    epochs: int = Field(10, ge=0)


def test_rundir_manifest_fields(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config(_Cfg(lr=0.5))
    manifest = run.start(kind="test", seed=7, command=["sparselens", "x", "--lr", "0.5"])
    assert run.read_config() == {"lr": 0.5, "epochs": 10}
    on_disk = json.loads(run.manifest_path.read_text())
    assert on_disk == manifest
    assert on_disk["seed"] == 7 and on_disk["status"] == "running"
    assert on_disk["command"] == ["sparselens", "x", "--lr", "0.5"]
    versions = on_disk["versions"]
    for key in ("sparselens", "torch", "numpy", "scipy", "python"):
        assert isinstance(versions[key], str) and versions[key], key
    assert versions["torch"] == torch.__version__
    hw = on_disk["hardware"]
    assert hw["cpu_count"] == os.cpu_count()
    assert hw["torch_threads"] == torch.get_num_threads()
    assert hw["cuda_available"] == torch.cuda.is_available()
    assert isinstance(hw["platform"], str)
    assert "git" in on_disk and (on_disk["git"] is None or len(on_disk["git"]["commit"]) == 40)
    assert on_disk["start_time"].endswith("+00:00") and on_disk["end_time"] is None

    done = run.finish("completed")
    assert done["status"] == "completed" and done["end_time"] >= done["start_time"]


def test_rundir_refuses_a_used_directory_and_resume_needs_a_run(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        RunDir(tmp_path / "used")
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        RunDir(tmp_path / "nothing", resume=True)
    RunDir(tmp_path / "empty_ok")  # a new or empty directory is fine
    RunDir(tmp_path / "empty_ok")


def test_resume_records_itself_and_cleans_leftovers(tmp_path):
    run = RunDir(tmp_path)
    run.write_config({"a": 1})
    run.start(kind="t", seed=0)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".ckpt-00000001.json.x.tmp").write_text("{")
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "report.md").write_text("half")

    again = RunDir(tmp_path, resume=True)
    assert not (tmp_path / ".staging").exists() and _tmp_files(tmp_path) == []
    manifest = again.start(kind="t", seed=0, command=["resume"])
    assert len(manifest["resumes"]) == 1
    assert manifest["resumes"][0]["command"] == ["resume"]
    assert manifest["resumes"][0]["previous_status"] == "running"


def test_metrics_append_rewrite_and_torn_lines(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}])
    run.append_metrics([])
    with open(run.metrics_path, "a") as f:
        f.write('{"epoch": 3, "lo')  # a kill mid-line
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    run.rewrite_metrics([{"epoch": 1, "loss": 0.5}])
    assert run.metrics_path.read_text() == '{"epoch": 1, "loss": 0.5}\n'


def test_rundir_checkpoints_keep_the_newest(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (10, 20, 30):
        run.save_checkpoint({"w": torch.full((2,), float(step))}, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(run.checkpoints)] == [20, 30]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "ckpt-00000020.json",
        "ckpt-00000020.safetensors",
        "ckpt-00000030.json",
        "ckpt-00000030.safetensors",
    ]
    state, step, _ = run.load_checkpoint()
    assert step == 30 and torch.equal(state["w"], torch.full((2,), 30.0))


def test_staging_moves_everything_or_nothing(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with run.staging() as stage:
            (stage / "weights.csv").write_text("w")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    with run.staging() as stage:
        (stage / "plots").mkdir()
        (stage / "plots" / "a.png").write_bytes(b"png")
        (stage / "weights.csv").write_text("w")
        (stage / "report.md").write_text("r")
        assert not (tmp_path / "weights.csv").exists()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "plots",
        "plots/a.png",
        "report.md",
        "weights.csv",
    ]


# -- helpers ------------------------------------------------------------------------------------
def test_seed_everything_is_reproducible_and_validated():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            seed_everything(bad)


def test_progress_bar_is_silent_off_a_terminal():
    buf = io.StringIO()
    with progress_bar(10, "fit", file=buf) as bar:
        bar.update(10)
    assert buf.getvalue() == ""
    assert progress_bar(5, enabled=False).disable


def test_setup_logging_is_idempotent():
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    logger = setup_logging("info", stream=buf)
    logging.getLogger("sparselens.some.module").info("hello")
    assert buf.getvalue().count("hello") == 1
    assert sum(getattr(h, "_sparselens_handler", False) for h in logger.handlers) == 1
    with pytest.raises(ValueError, match="log level"):
        setup_logging("loud")
    setup_logging("warning")


def test_sigterm_becomes_an_exception_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, termination_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # pragma: no cover - the handler raises first
    assert info.value.exit_code == 143 and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == before


def test_validation_errors_become_one_line_naming_field_and_range():
    with pytest.raises(ValidationError) as info:
        _Cfg(lr=-1, epochs="x")
    msg = format_validation_error(info.value, _Cfg)
    assert "\n" not in msg
    assert "lr must be > 0, got -1" in msg
    assert "epochs must be an integer >= 0, got x" in msg
    with pytest.raises(ValidationError) as info:
        _Cfg(learning_rate=1)
    assert format_validation_error(info.value, _Cfg) == "unknown setting 'learning_rate'"


def test_load_yaml_mapping_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_yaml_mapping(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        load_yaml_mapping(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml_mapping(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml_mapping(tmp_path / "empty.yaml") == {}
