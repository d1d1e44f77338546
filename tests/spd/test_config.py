"""SPDRunConfig: validation with one-line messages, the learning-rate schedule, bundled configs."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sparselens.core.schedules import Schedule
from sparselens.spd.config import (
    CONFIG_NAMES,
    SPDRunConfig,
    bundled_config_path,
    load_config,
    lr_at,
    set_path,
)
from sparselens.train.config import format_validation_error

BASE = {
    "target": "tms_5-2",
    "steps": 10,
    "batch_size": 8,
    "losses": {"importance_minimality": {"coeff": 1e-3}},
}


def _reference_lr(kind: str, start: float, end: float, warm_frac: float, steps: int, i: int):
    """spd main's get_lr_with_warmup + schedule fns, written out independently."""
    w = int(warm_frac * steps)
    if i < w:
        return start * i / w
    n = steps - w
    t = (i - w) / (n - 1) if n > 1 else 0.0
    t = min(t, 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["constant", "linear", "cosine"]),
    start=st.floats(1e-5, 1.0),
    end_frac=st.floats(0.0, 1.0),
    warm_frac=st.floats(0.0, 0.9),
    steps=st.integers(1, 300),
    data=st.data(),
)
def test_lr_matches_reference_formula(kind, start, end_frac, warm_frac, steps, data):
    end = start if kind == "constant" else start * end_frac
    sched = Schedule(kind=kind, start=start, end=end if kind != "constant" else None)
    i = data.draw(st.integers(0, steps - 1))
    got = lr_at(sched, warm_frac, steps, i)
    assert got == pytest.approx(_reference_lr(kind, start, end, warm_frac, steps, i), rel=1e-12)


def test_lr_last_step_is_final_value_and_warmup_starts_at_zero():
    """Catches the progress-over-decay_steps variant (the last step would stop short of ``end``)
    and a warm-up that starts at lr/w instead of 0 ((i + 1) / w)."""
    sched = Schedule(kind="cosine", start=1e-3, end=1e-4)
    steps = 100
    assert lr_at(sched, 0.1, steps, steps - 1) == pytest.approx(1e-4, abs=1e-15)
    assert lr_at(sched, 0.1, steps, 0) == 0.0
    assert lr_at(sched, 0.1, steps, 5) == pytest.approx(1e-3 * 5 / 10)
    assert lr_at(sched, 0.1, steps, 10) == pytest.approx(1e-3)  # first decay step = peak
    # the midpoint of the decay (progress 0.5 over 89 intervals) is the cosine midpoint
    assert lr_at(sched, 0.0, 101, 50) == pytest.approx(0.5 * (1e-3 + 1e-4))


def test_lr_number_is_constant_and_config_method_agrees():
    c = SPDRunConfig(**BASE, lr=2e-3)
    assert c.lr == Schedule(kind="constant", start=2e-3)
    assert [c.lr_at(i) for i in range(10)] == [2e-3] * 10
    c = SPDRunConfig(**BASE, lr={"kind": "linear", "start": 1.0, "end": 0.0}, lr_warmup_frac=0.2)
    assert c.warmup_steps == 2
    assert [c.lr_at(i) for i in range(10)] == pytest.approx(
        [0.0, 0.5, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0]
    )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_bundled_configs_validate(name):
    cfg = load_config(name)
    assert bundled_config_path(name).is_file()
    raw = yaml.safe_load(bundled_config_path(name).read_text())
    assert cfg.target == raw["target"]
    assert cfg.decomposition, name  # every bundled config spells its modules out
    assert cfg.losses.output_loss == ("kl" if name == "minigpt_mlp" else "mse")


def test_bundled_config_list_matches_the_files():
    folder = bundled_config_path("tms_5-2").parent
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(CONFIG_NAMES)


def test_tms_configs_follow_the_reference_recipe():
    c = load_config("tms_5-2")
    imp = c.losses.importance_minimality
    assert (c.batch_size, c.ci_fn, c.ci_hidden) == (4096, "mlp", [16])
    assert (imp.coeff, imp.kind, imp.p.at(0.0)) == (3e-3, "lp", 1.0)
    assert [(d.pattern, d.C, d.tied_to) for d in c.decomposition] == [
        ("linear1", 20, None),
        ("linear2", 20, "linear1"),
    ]
    assert c.faithfulness_warmup.steps == 200
    c = load_config("tms_40-10")
    assert c.losses.importance_minimality.p.at(0.0) == 2.0
    assert {d.C for d in c.decomposition} == {200}


def _err(**kw) -> str:
    with pytest.raises(ValidationError) as e:
        SPDRunConfig(**{**BASE, **kw})
    return format_validation_error(e.value, SPDRunConfig)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"batch_size": -3}, "batch_size must be an integer >= 1"),
        ({"target": "tms_9-9"}, "target must be one of"),
        ({"ci_fn": "transformer"}, "ci_fn must be one of"),
        ({"lr_warmup_frac": 1.0}, "lr_warmup_frac must be >= 0 and < 1"),
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"bogus": 1}, "unknown setting 'bogus'"),
        ({"C": 0}, "C must be an integer >= 1"),
        ({"ci_hidden": [16, 0]}, "ci_hidden entries must be integers >= 1"),
        ({"decomposition": []}, "decomposition must list at least one module"),
        ({"decomposition": [{"pattern": "linear1", "C": 4}], "C": 3}, "C applies only"),
        ({"lr": {"kind": "constant", "start": 0.0}}, "lr must start > 0"),
        (
            {"losses": {"output_loss": "kl", "importance_minimality": {"coeff": 0.0}}},
            "output_loss must be 'mse'",
        ),
        ({"losses": None}, "losses"),
        ({"target": "minigpt"}, "output_loss must be 'kl'"),
        ({"dtype": "bfloat16"}, "dtype must be one of"),
        ({"faithfulness_warmup": {"steps": -1}}, "faithfulness_warmup.steps"),
    ],
)
def test_bad_settings_give_one_line_naming_the_field(kw, pattern):
    msg = _err(**kw)
    assert pattern in msg
    assert "\n" not in msg


def test_load_config_errors():
    with pytest.raises(ValueError, match=r"config name must be one of .*tms_5-2.*; got 'tms_9'"):
        load_config("tms_9")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config("missing/dir/run.yaml")


def test_load_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "target: resid_mlp1\nsteps: 7\nbatch_size: 16\nlr: 0.01\n"
        "losses: {importance_minimality: {coeff: 0.001}}\n"
    )
    c = load_config(p, steps=9)
    assert (c.target, c.steps, c.batch_size, c.lr.start, c.lr.kind) == (
        "resid_mlp1",
        9,
        16,
        0.01,
        "constant",
    )


def test_set_path():
    s = {"losses": {"importance_minimality": {"coeff": 1.0}}, "steps": 3}
    set_path(s, "losses.importance_minimality.coeff", 2.0)
    set_path(s, "losses.pgd.n_steps", 4)
    set_path(s, "seed", 5)
    assert s == {
        "losses": {"importance_minimality": {"coeff": 2.0}, "pgd": {"n_steps": 4}},
        "steps": 3,
        "seed": 5,
    }
    with pytest.raises(ValueError, match="steps is not a group of settings"):
        set_path(s, "steps.x", 1)
    with pytest.raises(ValueError, match="dot-separated"):
        set_path(s, "losses..x", 1)
