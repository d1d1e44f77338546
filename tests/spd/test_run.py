"""SPD runs: the run directory, exact resume, the trainer's step, evaluation, targets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparselens.spd import metrics as M
from sparselens.spd import trainer as trainer_mod
from sparselens.spd.config import SPDRunConfig
from sparselens.spd.evaluate import ce_unrecovered, ci_patterns, pattern_errors
from sparselens.spd.metrics import UnitGatedCI
from sparselens.spd.run import FINAL_WEIGHTS, load_run, run_spd
from sparselens.spd.tasks import load_task
from sparselens.spd.trainer import SPDTrainer, mask_seed
from sparselens.train.atomic import load_safetensors

TMS_MODULES = [
    {"pattern": "linear1", "C": 6},
    {"pattern": "linear2", "C": 6, "tied_to": "linear1"},
]


def tiny(**kw) -> SPDRunConfig:
    base = {
        "target": "tms_5-2",
        "decomposition": TMS_MODULES,
        "ci_hidden": [4],
        "steps": 8,
        "batch_size": 32,
        "eval_every": 4,
        "eval_batches": 1,
        "log_every": 2,
        "checkpoint_every": 3,
        "final_eval_samples": 64,
        "faithfulness_warmup": {"steps": 3, "lr": 0.01, "weight_decay": 0.1},
        "losses": {"importance_minimality": {"coeff": 3e-3}},
        "progress": False,
    }
    return SPDRunConfig.model_validate({**base, **kw})


@pytest.fixture
def tms_task():
    """A fresh target (a component model takes its target over: one task per trainer)."""
    return load_task("tms_5-2")


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    out = tmp_path_factory.mktemp("spd") / "run"
    summary = run_spd(tiny(), out)
    return out, summary


def test_run_directory_layout(completed):
    out, s = completed
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "report.md",
                 FINAL_WEIGHTS, "plots/losses.png", "plots/ci_l0.png",
                 "plots/component_norms.png", "plots/ci_histograms.png",
                 "plots/ci_one_hot_linear1.png", "plots/ci_one_hot_linear2.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == [
        "spd-00000006.json",
        "spd-00000008.json",
    ]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed" and m["kind"] == "spd-run" and m["seed"] == 0
    assert m["decomposed_modules"] == ["linear1", "linear2"]
    saved = json.loads((out / "summary.json").read_text())
    for key in ("mmcs", "ml2r", "identity_ci_error", "dense_ci_error", "ci_l0", "wall_seconds",
                "non_negligible", "recon", "step_ms", "train_seconds"):  # fmt: skip
        assert key in saved, key
    assert set(saved["ci_l0"]) == {"linear1", "linear2"}
    model, config, task = load_run(out)
    one_hot = M.one_hot_ci(model, task.n_features, config.one_hot_magnitude)
    assert saved["one_hot_active"] == {  # recounted: CI > 0.1 on some one-hot input
        n: int(sum(bool((ci[:, c] > 0.1).any()) for c in range(ci.shape[1])))
        for n, ci in one_hot.items()
    }
    assert saved["one_hot_clean"] == {  # identity-pattern layers only
        n: M.clean_inputs(one_hot[n], 0.1) for n in ("linear1", "linear2")
    }
    assert set(saved["recon"]) == {"unmasked", "ci", "rounded", "stochastic", "zero", "random"}
    assert saved["mmcs"] == s["mmcs"] and 0.0 <= s["mmcs"] <= 1.0
    report = (out / "report.md").read_text()
    assert "![losses](plots/losses.png)" in report
    err, clean = saved["identity_ci_error"]["linear1"], saved["one_hot_clean"]["linear1"]
    assert f"identity `linear1` {err} ({clean} clean inputs)" in report
    assert "paper Table 1: MMCS 1.000, ML2R 0.993 ± 0.002)" in report  # this target's row


def test_metrics_records(completed):
    out, _ = completed
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [(r["phase"], r["step"]) for r in recs]
    assert phases[:2] == [("warmup", 0), ("eval", 0)]
    assert [s for p, s in phases if p == "train"] == [2, 4, 6, 8]
    assert [s for p, s in phases if p == "eval"] == [0, 4, 8]
    train = [r for r in recs if r["phase"] == "train"]
    assert all("loss/total" in r and math.isfinite(r["loss/total"]) for r in train)
    assert train[0]["lr"] == pytest.approx(tiny().lr_at(1))
    ev = [r for r in recs if r["phase"] == "eval"][-1]
    assert {"recon/ci", "recon/stochastic", "ci_l0/linear1", "faithfulness"} <= set(ev)


def test_stop_then_resume_is_bit_identical(completed, tmp_path):
    """A run stopped after its first checkpoint and resumed ends with exactly the weights, Adam
    state and metrics of the uninterrupted run."""
    ref_out, ref_summary = completed
    out = tmp_path / "run"

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_spd(tiny(), out, on_checkpoint=stop)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    assert not (out / "summary.json").exists()
    summary = run_spd(tiny(), out, resume=True)
    a, b = load_safetensors(ref_out / FINAL_WEIGHTS), load_safetensors(out / FINAL_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = ("wall_seconds", "train_seconds", "step_ms", "run_dir")
    assert {k: v for k, v in summary.items() if k not in strip} == {
        k: v for k, v in ref_summary.items() if k not in strip
    }

    def records(path):
        return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]

    assert records(out) == records(ref_out)
    m = json.loads((out / "manifest.json").read_text())
    assert [r["previous_status"] for r in m["resumes"]] == ["interrupted"]
    # a completed run resumes to its summary; changed settings are refused
    assert run_spd(tiny(), out, resume=True)["mmcs"] == summary["mmcs"]
    with pytest.raises(ValueError, match=r"steps differs from the run's config\.yaml"):
        run_spd(tiny(steps=9), out, resume=True)


def test_load_run_gives_the_trained_model(completed):
    out, _ = completed
    model, config, task = load_run(out)
    assert config == tiny()
    weights = load_safetensors(out / FINAL_WEIGHTS)
    params = dict(model.named_parameters())
    for k, v in weights.items():
        assert torch.equal(params[k], v)
    x = task.sample(5, torch.Generator().manual_seed(0))
    target, _ = model.target_output(x)
    assert torch.equal(target, task.target(x))


def test_new_run_refuses_a_used_directory(completed):
    out, _ = completed
    with pytest.raises(FileExistsError, match="already exists"):
        run_spd(tiny(), out)


def test_bad_decomposition_fails_before_the_run_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="nonexistent"):
        run_spd(tiny(decomposition=[{"pattern": "nonexistent", "C": 3}]), out)
    assert not out.exists()


def test_same_seed_same_weights_other_seed_differs(tms_task):
    def weights(seed):
        t = SPDTrainer(tiny(seed=seed), load_task("tms_5-2"))
        t.faithfulness_warmup()
        for _ in range(3):
            t.train_step()
        return t.trainable_state()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_step_has_no_host_sync(tms_task, monkeypatch):
    """The trainer's own code never reads a tensor on the host during a step (compute_losses is
    stubbed, so syncs inside the method's losses do not count here; Adam's step counters are
    host-side scalars by design and are exempt)."""
    t = SPDTrainer(tiny(), tms_task)

    def fake_losses(model, x, cfg, *, progress, generator=None, **_):
        w = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
        noise = torch.rand((), generator=generator)
        return w * (1 + noise), {"a": w.detach(), "b": x.sum()}

    monkeypatch.setattr(trainer_mod, "compute_losses", fake_losses)
    synced = []

    def guard(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            if not any(self is st.get("step") for st in t.opt.state.values()):
                synced.append(name)
            return original(self, *args, **kwargs)

        return wrapped

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    before = [p.detach().clone() for p in t.params]
    for _ in range(3):
        t.train_step()
    monkeypatch.undo()
    assert synced == []
    assert t.step == 3
    assert any(not torch.equal(a, p) for a, p in zip(before, t.params, strict=True))
    log = t.pop_log()
    assert set(log) == {"total", "a", "b"} and all(math.isfinite(v) for v in log.values())
    assert t.pop_log() == {}


def test_real_train_step_has_no_host_sync(tms_task):
    """A whole step with the real losses (CI, masks, every reconstruction variant, the penalty,
    fused Adam) never copies a tensor value to the host.

    Catches the penalties' NaN scan running inside the step (a host read per layer per step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    t = SPDTrainer(
        tiny(losses={"importance_minimality": {"coeff": 3e-3}, "subset_recon": 1.0}), tms_task
    )
    t.train_step()  # first step: lazy setup (kernel build, optimiser state)
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Reads():
        for _ in range(2):
            t.train_step()
    assert reads == []
    assert t.step == 3


def test_non_finite_losses_raise_when_logged(tms_task, monkeypatch):
    """NaN in the data (so in the CI and the reconstructions) surfaces as a one-line error naming
    the loss terms at the next log, not as silently NaN weights."""
    t = SPDTrainer(tiny(), tms_task)
    clean = t.batch

    def bad_batch():
        x = clean()
        x[0, 0] = float("nan")
        return x

    monkeypatch.setattr(t, "batch", bad_batch)
    t.train_step()
    with pytest.raises(ValueError, match=r"SPD losses .*importance_minimality.* became NaN or inf"):
        t.pop_log()


def test_no_checkpoint_holds_non_finite_weights(tmp_path, monkeypatch):
    """With checkpoints more frequent than logs, a NaN from step 2 on still stops the run before
    any checkpoint after it is written (the trainer checks its accumulated losses first)."""
    from sparselens.spd import run as run_mod

    calls = {"n": 0}
    real_batch = trainer_mod.SPDTrainer.batch

    def batch(self):
        x = real_batch(self)
        calls["n"] += 1
        if calls["n"] >= 2:
            x[0, 0] = float("nan")
        return x

    monkeypatch.setattr(trainer_mod.SPDTrainer, "batch", batch)
    saved = []
    out = tmp_path / "run"
    cfg = tiny(log_every=100, eval_every=100, checkpoint_every=1)
    with pytest.raises(ValueError, match="became NaN or inf by step 2"):
        run_mod.run_spd(cfg, out, on_checkpoint=saved.append)
    assert saved == [1]


def test_resumed_trainer_keeps_fused_adam(tms_task):
    """Loading an optimiser state saved without the fused flag (older checkpoints) keeps the fused
    kernel (``load_state_dict`` would otherwise restore the saved group's flag)."""
    t = SPDTrainer(tiny(), tms_task)
    t.train_step()
    state = t.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    t.load_state_dict(state)
    assert all(g["fused"] for g in t.opt.param_groups)


def test_log_is_the_mean_over_the_interval(tms_task, monkeypatch):
    """pop_log returns the mean of each term over the steps since the last call (not the last
    value, not the sum)."""
    t = SPDTrainer(tiny(), tms_task)
    values = iter([1.0, 2.0, 6.0, 10.0])

    def fake_losses(model, x, cfg, *, progress, generator=None, **_):
        v = torch.tensor(next(values))
        w = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
        return w * 0 + v, {"term": v * 2}

    monkeypatch.setattr(trainer_mod, "compute_losses", fake_losses)
    for _ in range(3):
        t.train_step()
    assert t.pop_log() == pytest.approx({"total": 3.0, "term": 6.0})
    t.train_step()
    assert t.pop_log() == pytest.approx({"total": 10.0, "term": 20.0})


def test_rank_slices_of_the_global_batch(tms_task):
    """Every rank draws the same global batch and keeps its contiguous slice, so the data do not
    depend on the world size."""
    cfg = tiny(batch_size=8)
    full = SPDTrainer(cfg, tms_task).batch()
    parts = []
    for r in range(2):
        t = SPDTrainer(cfg, load_task("tms_5-2"))
        t.world, t.rank, t.local_batch = 2, r, 4
        parts.append(t.batch())
    assert torch.equal(torch.cat(parts), full)
    assert len({mask_seed(0, r) for r in range(4)} | {0}) == 5


def test_warmup_reduces_faithfulness_on_u_v_only(tms_task):
    t = SPDTrainer(tiny(faithfulness_warmup={"steps": 50, "lr": 0.01}), tms_task)
    from sparselens.spd.losses import faithfulness

    ci_before = {k: v for k, v in t.trainable_state().items() if k.startswith("ci_fns")}
    with torch.no_grad():
        before = float(faithfulness(t.model.weight_deltas()))
    after = t.faithfulness_warmup()
    assert after < 0.2 * before
    ci_after = {k: v for k, v in t.trainable_state().items() if k.startswith("ci_fns")}
    assert ci_before and all(torch.equal(ci_before[k], ci_after[k]) for k in ci_before)
    assert all(p.grad is None for p in t.params)


def test_ci_patterns_of_the_toys():
    task = load_task("tms_5-2_id")
    t = SPDTrainer(tiny(target="tms_5-2_id", decomposition=None, C=4), task)
    pats = [(p.module, p.kind, p.k) for p in ci_patterns(task, t.model)]
    assert pats == [
        ("linear1", "identity", None),
        ("hidden_layers.0", "dense", 2),
        ("linear2", "identity", None),
    ]


def _resid_names(n_layers: int) -> list[str]:
    return [f"layers.{i}.mlp_{io}" for i in range(n_layers) for io in ("in", "out")]


def test_ci_patterns_of_resid_mlp_are_per_layer():
    """ResidMLP's patterns are per decomposed matrix, as in the paper (§4.3: "subcomponents in
    both W_in^1 and W_in^2 that are causally important for computing each function") and the
    reference (one IdentityCIPattern / DenseCIPattern per module its glob matches): every
    ``mlp_in`` identity over the features, every ``mlp_out`` dense with k = d_mlp."""
    from types import SimpleNamespace

    task = SimpleNamespace(kind="resid_mlp", info={"target_config": {"d_mlp": 25}})
    model = SimpleNamespace(names=_resid_names(2))
    pats = [(p.module, p.kind, p.k) for p in ci_patterns(task, model)]
    assert pats == [
        ("layers.0.mlp_in", "identity", None),
        ("layers.0.mlp_out", "dense", 25),
        ("layers.1.mlp_in", "identity", None),
        ("layers.1.mlp_out", "dense", 25),
    ]


def test_paper_decomposition_of_resid_mlp2_has_no_ci_error():
    """The paper's ResidMLP-2L solution on one-hot inputs -- one subcomponent per feature in
    EACH layer's W_in (a component spanning both layers), W_out one rank-50 block of 25
    co-active subcomponents per layer -- scores 0. Catches the variant that concatenates the
    layers' CI columns and asks for one subcomponent per feature in all of them (100 errors
    here, one per feature)."""
    from types import SimpleNamespace

    n, C, d_mlp = 100, 400, 25
    task = SimpleNamespace(kind="resid_mlp", info={"target_config": {"d_mlp": d_mlp}})
    model = SimpleNamespace(names=_resid_names(2))
    gen = torch.Generator().manual_seed(0)
    one_hot = {}
    for i in range(2):
        w_in = torch.zeros(n, C)
        w_in[torch.arange(n), torch.randperm(C, generator=gen)[:n]] = 1.0
        w_out = torch.zeros(n, C)
        w_out[:, torch.randperm(C, generator=gen)[:d_mlp]] = 1.0
        one_hot[f"layers.{i}.mlp_in"], one_hot[f"layers.{i}.mlp_out"] = w_in, w_out
    errs = pattern_errors(ci_patterns(task, model), one_hot, 0.1)
    assert errs == {name: 0 for name in _resid_names(2)}
    # a stray entry in layer 1's W_in and a missing column in layer 0's W_out are counted
    one_hot["layers.1.mlp_in"][3, (one_hot["layers.1.mlp_in"][3] == 0).nonzero()[0]] = 0.5
    col = one_hot["layers.0.mlp_out"].sum(0).nonzero()[0]
    one_hot["layers.0.mlp_out"][:, col] = 0.0
    errs = pattern_errors(ci_patterns(task, model), one_hot, 0.1)
    assert errs["layers.1.mlp_in"] == 1 and errs["layers.0.mlp_out"] == 1
    assert errs["layers.0.mlp_in"] == errs["layers.1.mlp_out"] == 0


def test_ce_unrecovered():
    """(CE - CE_target) / (CE_zero - CE_target). Catches the variant divided by CE_zero alone
    (0.25 here instead of 0.5) and the one without subtracting the target's CE."""
    assert ce_unrecovered(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert ce_unrecovered(1.0, 1.0, 3.0) == 0.0
    assert ce_unrecovered(3.0, 1.0, 3.0) == 1.0
    assert math.isnan(ce_unrecovered(1.0, 1.0, 1.0))


def test_resid_target_is_trained_once_and_cached(tmp_path, monkeypatch):
    from sparselens.spd.targets import resid_mlp

    monkeypatch.setenv("SPARSELENS_CACHE", str(tmp_path))
    real = resid_mlp.train_resid_mlp
    calls = []

    def quick(cfg, *, seed=0, **kw):
        calls.append(seed)
        return real(cfg, seed=seed, steps=2, batch_size=8)

    monkeypatch.setattr(resid_mlp, "train_resid_mlp", quick)
    a = load_task("resid_mlp1", target_seed=3)
    b = load_task("resid_mlp1", target_seed=3)
    assert calls == [3]
    assert a.info["target_trained_now"] and not b.info["target_trained_now"]
    assert (tmp_path / "spd_targets" / "resid_mlp1-seed3").exists()
    x = a.sample(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 100)
    assert torch.equal(a.target(x), b.target(x))
    assert [d.pattern for d in a.decomposition()] == ["layers.0.mlp_in", "layers.0.mlp_out"]


def test_resid_run_resumes_and_loads_from_its_own_target_copy(tmp_path, monkeypatch):
    """A ResidMLP run keeps a copy of its on-demand target; resume and load_run read it back.

    Catches the copy being written after the component model took the target over (its state
    then holds ``*.original.weight`` keys that no target config fits, so resume and load_run
    of every ResidMLP run failed).
    """
    from sparselens.spd.targets import resid_mlp

    monkeypatch.setenv("SPARSELENS_CACHE", str(tmp_path / "cache"))
    real = resid_mlp.train_resid_mlp
    monkeypatch.setattr(
        resid_mlp, "train_resid_mlp", lambda cfg, *, seed=0, **kw: real(cfg, seed=seed, steps=2)
    )
    cfg = tiny(
        target="resid_mlp1",
        decomposition=[
            {"pattern": "layers.0.mlp_in", "C": 4},
            {"pattern": "layers.0.mlp_out", "C": 4},
        ],
        steps=4,
        batch_size=16,
        final_eval_samples=32,
    )
    out = tmp_path / "run"

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_spd(cfg, out, on_checkpoint=stop)
    state = load_safetensors(out / "target" / "model.safetensors")
    assert not [k for k in state if ".original." in k]
    summary = run_spd(cfg, out, resume=True)
    gating = summary["mlp_out_neurons"]["layers.0.mlp_out"]
    assert set(gating) == set(UnitGatedCI._fields)
    assert "layers.0.mlp_out`: " in (out / "report.md").read_text()
    assert (out / "plots" / "neurons_layers-0-mlp_out.png").stat().st_size > 0
    contrib = summary["neuron_contributions"]["layers.0.mlp_in"]
    assert set(contrib) == {"slope", "r2"} and all(math.isfinite(v) for v in contrib.values())
    assert "`layers.0.mlp_in` neuron contributions" in (out / "report.md").read_text()
    assert (out / "plots" / "neuron_contributions.png").stat().st_size > 0
    assert set(summary["one_hot_clean"]) == {"layers.0.mlp_in"}  # identity patterns only
    model, _, task = load_run(out)
    x = task.sample(8, torch.Generator().manual_seed(0))
    assert model.target_output(x)[0].shape == (8, 100)
    # wiring: the target's own weights and W_E, the components of both matrices of the layer
    target = task.target.layers[0]
    c_in, c_out = model.component("layers.0.mlp_in"), model.component("layers.0.mlp_out")
    r = M.neuron_contributions(task.target.W_E, target.mlp_in.weight, target.mlp_out.weight,
                               c_in.V, c_in.U, c_out.weight())  # fmt: skip
    assert contrib == pytest.approx({"slope": r.slope, "r2": r.r2}, rel=1e-6)
    direct = (task.target.W_E @ target.mlp_in.weight.T) * (task.target.W_E @ target.mlp_out.weight)
    torch.testing.assert_close(r.target, direct)


def test_minigpt_task_windows(monkeypatch):
    task = load_task("minigpt")
    x = task.sample(3, torch.Generator().manual_seed(0))
    ctx = task.target.config.context_len
    assert x.shape == (3, ctx) and x.dtype == torch.long
    assert int(x.max()) < task.target.config.vocab_size
    assert [d.pattern for d in task.decomposition(8)][:2] == [
        "blocks.0.mlp.fc_in",
        "blocks.0.mlp.fc_out",
    ]


def test_minigpt_run_reports_ce_and_kl(tmp_path):
    cfg = SPDRunConfig.model_validate(
        {
            "target": "minigpt",
            "decomposition": [{"pattern": "blocks.1.mlp.fc_in", "C": 8}],
            "ci_fn": "shared_mlp",
            "ci_hidden": [8],
            "losses": {"output_loss": "kl", "importance_minimality": {"coeff": 1e-3}},
            "steps": 2,
            "batch_size": 2,
            "eval_every": 2,
            "eval_batches": 1,
            "final_eval_samples": 4,
            "progress": False,
        }
    )
    s = run_spd(cfg, tmp_path / "run")
    lm = s["lm"]
    assert set(lm["ce"]) == {"ci", "unmasked", "rounded", "zero", "random"}
    assert lm["ce_target"] < 3.0  # the bundled model knows its corpus
    assert lm["ce_unrecovered"]["zero"] == pytest.approx(1.0)
    assert lm["kl"]["unmasked"] >= 0
    assert "mmcs" not in s and "identity_ci_error" not in s


def test_public_names_resolve():
    import sparselens.spd as spd

    for name in spd.__all__:
        assert getattr(spd, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = spd.nope


def test_evaluations_do_not_change_the_training_trajectory(tmp_path):
    """Evaluations draw from their own generators inside fork_rng: the final weights are the
    same whether a run evaluates every step or only at the end (fails if an evaluation drew from
    a stream the training step uses)."""
    a = run_spd(tiny(eval_every=1, steps=4), tmp_path / "a")
    b = run_spd(tiny(eval_every=1000, steps=4), tmp_path / "b")
    wa, wb = (
        load_safetensors(tmp_path / "a" / FINAL_WEIGHTS),
        load_safetensors(tmp_path / "b" / FINAL_WEIGHTS),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["recon"] == b["recon"]


def test_evaluate_checkpoint_latest_equals_the_final_evaluation(completed, tmp_path):
    """The latest checkpoint (step 8 = the final weights) evaluates to the run's own final
    metrics; an earlier one (step 6) to different ones, written under eval/step-6 by default.
    Catches the wrong checkpoint's weights loaded (or none: the fresh initialisation)."""
    from sparselens.spd.run import evaluate_checkpoint

    out, final = completed
    before = sorted(p.name for p in out.iterdir())
    kept = {n: (out / n).read_bytes() for n in ("metrics.jsonl", "manifest.json", "summary.json")}
    s8 = evaluate_checkpoint(out, out=tmp_path / "e8")
    assert s8["checkpoint_step"] == 8
    for key in ("mmcs", "ml2r", "ci_l0", "recon", "identity_ci_error", "non_negligible"):
        assert s8[key] == final[key], key
    assert (tmp_path / "e8" / "plots" / "ci_one_hot_linear1.png").stat().st_size > 0
    assert "at step 8" in (tmp_path / "e8" / "report.md").read_text().splitlines()[0]
    s6 = evaluate_checkpoint(out, step=6)
    assert s6["checkpoint_step"] == 6 and s6["recon"] != final["recon"]
    doc = json.loads((out / "eval" / "step-6" / "summary.json").read_text())
    assert doc["checkpoint_step"] == 6 and doc["recon"] == s6["recon"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "eval"])
    assert {n: (out / n).read_bytes() for n in kept} == kept
    with pytest.raises(ValueError, match=r"step must be one of the kept checkpoints \[6, 8\]"):
        evaluate_checkpoint(out, step=4)
    for bad in (out, out / "plots"):  # never over the run's own files
        with pytest.raises(ValueError, match="out must be outside the run directory or under"):
            evaluate_checkpoint(out, out=bad)
    with pytest.raises(FileNotFoundError, match="not an SPD run directory"):
        evaluate_checkpoint(tmp_path)


def test_evaluate_checkpoint_threads_and_a_pruned_checkpoint(completed, tmp_path, monkeypatch):
    """The evaluation runs on the run's thread count (or ``threads``) and restores the caller's;
    a listed checkpoint that the running run prunes before it is read: the latest is listed
    again (no step given), or a one-line error names the pruning (a step given)."""
    import shutil

    from sparselens.spd import run as run_mod

    out = tmp_path / "run"
    shutil.copytree(completed[0], out)
    seen = []
    real_eval = run_mod.final_eval

    def spy(model, task, config):
        seen.append(torch.get_num_threads())
        return real_eval(model, task, config)

    monkeypatch.setattr(run_mod, "final_eval", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_mod.evaluate_checkpoint(out, out=tmp_path / "a")
        run_mod.evaluate_checkpoint(out, out=tmp_path / "b", threads=2)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

    real_load = run_mod.load_checkpoint

    def pruned_once(path):
        if "00000008" in path.name and path.exists():
            for p in path.parent.glob("*00000008*"):
                p.unlink()
            raise FileNotFoundError(path)
        return real_load(path)

    monkeypatch.setattr(run_mod, "load_checkpoint", pruned_once)
    with pytest.raises(ValueError, match=r"step 8: the running run pruned that checkpoint"):
        run_mod.evaluate_checkpoint(out, step=8, out=tmp_path / "c")
    shutil.rmtree(out)
    shutil.copytree(completed[0], out)
    assert run_mod.evaluate_checkpoint(out, out=tmp_path / "d")["checkpoint_step"] == 6


def test_contributions_use_the_target_w_out_where_mlp_out_is_not_decomposed():
    """Only ``layers.0.mlp_in`` decomposed: the SPD side of the neuron contributions reads the
    target's own W_out (and W_in, W_E), and the layer is reported under its ``mlp_in`` name."""
    from types import SimpleNamespace

    from sparselens.spd.component_model import ComponentModel
    from sparselens.spd.evaluate import FinalEval, _contributions
    from sparselens.spd.targets.resid_mlp import ResidMLP, ResidMLPConfig

    torch.manual_seed(0)
    cfg = ResidMLPConfig(n_features=6, d_embed=16, d_mlp=3, n_layers=2, feature_probability=0.2)
    target = ResidMLP(cfg)
    w_in = target.layers[0].mlp_in.weight.detach().clone()
    w_out = target.layers[0].mlp_out.weight.detach().clone()
    model = ComponentModel(target, [{"pattern": "layers.0.mlp_in", "C": 4}])
    result = FinalEval(metrics={})
    out = _contributions(model, SimpleNamespace(target=target), result)
    comp = model.component("layers.0.mlp_in")
    r = M.neuron_contributions(target.W_E, w_in, w_out, comp.V, comp.U, w_out)
    assert out == {"layers.0.mlp_in": pytest.approx({"slope": r.slope, "r2": r.r2}, rel=1e-6)}
    torch.testing.assert_close(result.contributions["layers.0.mlp_in"][1], r.spd)
