"""Tests of the SPD toy targets (TMS, ResidMLP), their training recipes and their files.

Each model is pinned to an independent NumPy forward, each data generator to its distribution,
and each recipe detail to a test that fails for its known wrong variant: two tied Parameters
(the reference's double Adam step), a trainable identity, U[0, 1) ResidMLP values, labels
without the residual, a cosine schedule over ``steps`` instead of ``steps - 1``, a factored
forward without the cross-layer terms, the output test applied to 40-10 targets.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.spd.targets import io
from sparselens.spd.targets import resid_mlp as R
from sparselens.spd.targets import tms as T

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# -- ResidMLP -----------------------------------------------------------------------------------

SMALL = R.ResidMLPConfig(n_features=6, d_embed=16, d_mlp=3, n_layers=2, feature_probability=0.2)


def test_presets_match_the_paper():
    shapes = {
        n: (c.n_features, c.d_embed, c.d_mlp, c.n_layers, c.feature_probability)
        for n in (1, 2, 3)
        for c in [R.resid_mlp_preset(n)]
    }
    assert shapes == {
        1: (100, 1000, 50, 1, 0.01),
        2: (100, 1000, 25, 2, 0.01),
        3: (102, 1000, 17, 3, 0.01),
    }
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1 and <= 3"):
        R.resid_mlp_preset(4)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="d_mlp"):
        R.ResidMLPConfig(n_features=3, d_mlp=0)
    with pytest.raises(ValueError, match="feature_probability"):
        R.ResidMLPConfig(n_features=3, d_mlp=2, feature_probability=1.5)
    with pytest.raises(ValueError, match="extra"):
        R.ResidMLPConfig(n_features=3, d_mlp=2, bias=True)  # type: ignore[call-arg]


def test_embedding_is_fixed_unit_rows_frozen_and_not_stored():
    """W_E: unit rows, a function of embed_seed only (not of the global RNG or the model seed),
    a buffer (never trained) that is not in the state dict."""
    torch.manual_seed(123)
    a = R.ResidMLP(SMALL)
    torch.manual_seed(456)
    b = R.ResidMLP(SMALL)
    torch.testing.assert_close(a.W_E.norm(dim=1), torch.ones(6))
    assert torch.equal(a.W_E, b.W_E)
    other = R.ResidMLP(SMALL.model_copy(update={"embed_seed": 1}))
    assert not torch.allclose(a.W_E, other.W_E)
    assert all(n != "W_E" for n, _ in a.named_parameters())
    assert set(a.state_dict()) == {
        f"layers.{i}.mlp_{s}.weight" for i in (0, 1) for s in ("in", "out")
    }
    assert [n for n, m in a.named_modules() if isinstance(m, torch.nn.Linear)] == [
        "layers.0.mlp_in",
        "layers.0.mlp_out",
        "layers.1.mlp_in",
        "layers.1.mlp_out",
    ]
    assert all(m.bias is None for m in a.modules() if isinstance(m, torch.nn.Linear))


def _numpy_resid_forward(model: R.ResidMLP, x: np.ndarray) -> np.ndarray:
    E = model.W_E.double().numpy()
    resid = x @ E
    for layer in model.layers:
        A = layer.mlp_in.weight.detach().double().numpy()
        B = layer.mlp_out.weight.detach().double().numpy()
        resid = resid + np.maximum(resid @ A.T, 0.0) @ B.T
    return resid @ E.T


def test_resid_forward_matches_numpy():
    model = _randomise(R.ResidMLP(SMALL))
    x = R.resid_mlp_batch(32, SMALL, torch.Generator().manual_seed(0))
    ref = _numpy_resid_forward(model, x.double().numpy())
    np.testing.assert_allclose(model(x).detach().double().numpy(), ref, atol=1e-5)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_factored_forward_equals_forward(n_layers, d_mlp, seed):
    """The training fast path computes the same function. Fails if a cross-layer term
    ``a_k (B_k^T A_l^T)`` is dropped (any n_layers >= 2 example) or the readoff skips
    ``x E E^T``."""
    cfg = R.ResidMLPConfig(
        n_features=5,
        d_embed=12,
        d_mlp=d_mlp,
        n_layers=n_layers,
        feature_probability=0.5,
        embed_seed=seed % 7,
    )
    model = _randomise(R.ResidMLP(cfg), seed, std=0.5)
    x = R.resid_mlp_batch(16, cfg, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(model.factored_forward(x), model(x), atol=1e-5, rtol=1e-5)


def test_resid_batch_distribution():
    """Values U[-1, 1) (fails for U[0, 1)), each feature on with probability p."""
    cfg = R.ResidMLPConfig(n_features=50, d_mlp=2, d_embed=4, feature_probability=0.1)
    x = R.resid_mlp_batch(4000, cfg, torch.Generator().manual_seed(0))
    on = x != 0
    assert on.float().mean().item() == pytest.approx(0.1, abs=0.005)
    vals = x[on]
    assert vals.min() >= -1.0 and vals.max() < 1.0
    assert vals.mean().item() == pytest.approx(0.0, abs=0.02)
    assert (vals < 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    again = R.resid_mlp_batch(4000, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_labels_are_act_plus_resid():
    """y = x + ReLU(x). Fails for ReLU(x) alone or |x|."""
    x = torch.tensor([[-0.5, 0.0, 0.25, 1.0]])
    torch.testing.assert_close(R.resid_mlp_labels(x), torch.tensor([[-0.5, 0.0, 0.5, 2.0]]))


def test_lr_schedule_half_cosine_to_zero_at_last_step():
    """lr * (1 + cos(pi step / (steps - 1))) / 2: exactly 0 on the last step. Fails for the
    ``step / steps`` convention (last step lr > 0)."""
    steps, lr = 11, 3e-3
    for step in range(steps):
        ref = lr * 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))
        assert R.resid_mlp_lr(step, steps, lr) == pytest.approx(ref, abs=1e-15)
    assert R.resid_mlp_lr(steps - 1, steps, lr) == pytest.approx(0.0, abs=1e-15)
    assert R.resid_mlp_lr(5, steps, lr) == pytest.approx(lr / 2)


def test_train_resid_mlp_learns_is_deterministic_and_leaves_global_state():
    cfg = R.ResidMLPConfig(n_features=8, d_embed=32, d_mlp=4, n_layers=1, feature_probability=0.2)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    a = R.train_resid_mlp(cfg, seed=3, steps=300, batch_size=256, lr=1e-2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    b = R.train_resid_mlp(cfg, seed=3, steps=300, batch_size=256, lr=1e-2)
    assert torch.equal(a.layers[0].mlp_in.weight, b.layers[0].mlp_in.weight)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        untrained = R.ResidMLP(cfg).eval()
    assert a.training_info["final_readoff_mse"] < 0.5 * R.readoff_mse(untrained, seed=5)
    assert a.training_info["steps"] == 300 and not a.training
    with pytest.raises(ValueError, match="steps"):
        R.train_resid_mlp(cfg, steps=0)


@pytest.mark.slow
def test_resid_mlp1_reference_recipe_readoff_mse():
    """The reference recipe reaches the reference's loss (6.95e-4 for 1 layer, seed 0)."""
    model = R.train_resid_mlp(R.resid_mlp_preset(1), seed=0)
    assert 5e-4 < model.training_info["final_readoff_mse"] < 9e-4


# -- save / load --------------------------------------------------------------------------------


def test_resid_roundtrip_and_embedding_not_stored(tmp_path):
    model = _randomise(R.ResidMLP(SMALL))
    model.training_info = {"seed": 7, "final_readoff_mse": 1e-3}
    io.save_target(model, tmp_path / "t")
    back = io.load_target(tmp_path / "t")
    assert isinstance(back, R.ResidMLP) and back.cfg == SMALL and not back.training
    assert back.training_info == {"seed": 7, "final_readoff_mse": 1e-3}
    x = R.resid_mlp_batch(8, SMALL, torch.Generator().manual_seed(1))
    assert torch.equal(back(x), model(x))
    from safetensors.torch import load_file

    assert "W_E" not in load_file(tmp_path / "t" / io.MODEL_FILE)
    assert not list(tmp_path.glob("t/.*.tmp"))


def test_load_rejects_tampering(tmp_path):
    model = _randomise(R.ResidMLP(SMALL))
    d = io.save_target(model, tmp_path / "t")
    cfg_path = d / io.CONFIG_FILE
    doc = json.loads(cfg_path.read_text())
    doc["W_E_sha256"] = "0" * 64
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="embed_seed=0 does not match the recorded W_E_sha256"):
        io.load_target(d)
    io.save_target(model, d)
    blob = bytearray((d / io.MODEL_FILE).read_bytes())
    blob[-1] ^= 1
    (d / io.MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        io.load_target(d)
    io.save_target(model, d)
    doc = json.loads(cfg_path.read_text())
    doc["config"]["d_mlp"] = 4
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not fit the config"):
        io.load_target(d)
    doc["format"] = "other/1"
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not an SPD target"):
        io.load_target(d)
    with pytest.raises(FileNotFoundError, match="no such target directory"):
        io.load_target(tmp_path / "missing")
    with pytest.raises(TypeError, match="TMSModel or ResidMLP"):
        io.save_target(torch.nn.Linear(2, 2), tmp_path / "x")  # type: ignore[arg-type]


# -- TMS ------------------------------------------------------------------------------------------

TMS52 = T.TMS_TARGETS["tms_5-2"]
TMS52_ID = T.TMS_TARGETS["tms_5-2_id"]


def _handmade_tms(
    cfg: T.TMSConfig, norm: float, bias: float, dead: int | None = None
) -> T.TMSModel:
    """Feature columns evenly spread on the unit circle of the first two hidden dims."""
    model = T.TMSModel(cfg)
    ang = 2 * math.pi * torch.arange(cfg.n_features) / cfg.n_features
    W = torch.zeros(cfg.n_hidden, cfg.n_features)
    W[0], W[1] = norm * torch.cos(ang), norm * torch.sin(ang)
    if cfg.n_hidden > 2:  # spread the rest so columns stay distinct
        W[2:] = 0.0
    if dead is not None:
        W[:, dead] = 0.0
    with torch.no_grad():
        model.linear1.weight.copy_(W)
        model.linear2.bias.fill_(bias)
    return model.eval()


SEED_ALIVE = 1  # a 5-2 seed whose initial outputs are not all dead (some are: zero gradient)


def _initialised(cfg: T.TMSConfig, seed: int, zero_bias: bool = False) -> T.TMSModel:
    model = T.TMSModel(cfg)
    T.init_tms_(model, torch.Generator().manual_seed(seed), zero_bias=zero_bias)
    return model


def test_init_is_nn_linear_default_from_the_generator():
    """Weight ~ U(+-1/sqrt(n_features)), bias ~ U(+-1/sqrt(n_hidden)) (nn.Linear(n_f, n_h) and
    nn.Linear(n_h, n_f)); fails for a bias bound of 1/sqrt(n_features)."""
    cfg = T.TMSConfig(n_features=400, n_hidden=25)
    m = _initialised(cfg, 0)
    w, b = m.linear1.weight, m.linear2.bias
    assert w.abs().max() <= 1 / 20 and w.abs().max() > 0.98 / 20
    assert b.abs().max() <= 1 / 5 and b.abs().max() > 0.98 / 5
    assert torch.equal(_initialised(cfg, 0).linear1.weight, w)
    assert torch.equal(_initialised(cfg, 0, zero_bias=True).linear2.bias, torch.zeros(400))


def test_tms_config_validation():
    with pytest.raises(ValueError, match="n_hidden"):
        T.TMSConfig(n_features=5, n_hidden=0)
    with pytest.raises(ValueError, match="feature_probability"):
        T.TMSConfig(n_features=5, n_hidden=2, feature_probability=0.0)
    with pytest.raises(TypeError, match="TMSConfig"):
        T.TMSModel({"n_features": 5})  # type: ignore[arg-type]


@pytest.mark.parametrize("cfg", [TMS52, TMS52_ID], ids=["5-2", "5-2_id"])
def test_tms_forward_matches_numpy(cfg):
    model = _randomise(T.TMSModel(cfg))
    x = T.tms_batch(64, cfg, torch.Generator().manual_seed(0))
    W = model.linear1.weight.detach().double().numpy()
    b = model.linear2.bias.detach().double().numpy()
    ref = np.maximum(x.double().numpy() @ W.T @ W + b, 0.0)  # identity hidden: H = I
    np.testing.assert_allclose(model(x).detach().double().numpy(), ref, atol=1e-6)


def test_tms_weights_tied_as_one_parameter():
    """linear2.weight IS linear1.weight.T (one Parameter): the trainable parameters are the
    weight and the bias only. Fails for the reference's two storage-sharing Parameters."""
    model = T.TMSModel(TMS52_ID)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["linear1.weight", "linear2.bias"]
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    with torch.no_grad():
        model.linear1.weight.add_(1.0)
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    assert set(io.stored_tensors(model)) == {
        "linear1.weight",
        "linear2.bias",
        "hidden_layers.0.weight",
    }


def test_one_adam_step_moves_the_tied_weight_by_lr_not_twice():
    """Adam's first step moves each entry by lr * sign(grad) = lr. The reference's two tied
    Parameters each take that step on the same memory, moving entries by up to 2 lr."""
    model = T.train_tms(TMS52, seed=SEED_ALIVE, steps=1, lr=1e-3, weight_decay=0.0)
    init = _initialised(TMS52, SEED_ALIVE)
    delta = (model.linear1.weight - init.linear1.weight).abs()
    moved = delta[delta > 0]
    assert moved.numel() >= 5
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-2, atol=0)


def test_identity_hidden_layer_is_frozen_identity():
    model = T.train_tms(TMS52_ID, seed=0, steps=50)
    hidden = model.hidden_layers[0]
    assert isinstance(hidden, torch.nn.Linear) and hidden.bias is None
    assert not hidden.weight.requires_grad
    assert torch.equal(hidden.weight, torch.eye(2))


def test_tms_batch_distribution():
    """Values U[0, 1), each feature on with probability p (fails for U[-1, 1))."""
    cfg = T.TMSConfig(n_features=50, n_hidden=2, feature_probability=0.05)
    x = T.tms_batch(4000, cfg, torch.Generator().manual_seed(0))
    on = x != 0
    assert on.float().mean().item() == pytest.approx(0.05, abs=0.003)
    vals = x[on]
    assert vals.min() >= 0.0 and vals.max() < 1.0
    assert vals.mean().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        T.tms_batch(0, cfg)


def test_represented_features_output_test_on_handmade_targets():
    """A pentagon (norms 1.13, bias -0.24) answers 0.72 to x = 0.75: 5 represented. A square
    with a dead fifth feature: 4 (the dead one answers ReLU(b) = 0)."""
    good = _handmade_tms(TMS52, 1.13, -0.24)
    torch.testing.assert_close(T.feature_outputs(good), torch.full((5,), 0.75 * 1.13**2 - 0.24))
    assert T.represented_features(good) == 5
    dead = _handmade_tms(TMS52, 1.13, -0.24, dead=4)
    assert T.represented_features(dead) == 4
    assert T.represented_features(dead, criterion="column_norm") == 4
    assert T.represented_features(good, tol=0.02) == 0  # 0.7177 is 0.032 from 0.75


def test_represented_features_uses_column_norms_for_40_10():
    """A fine 40-10 target answers only ~0.61 to x = 0.75 (sheet §9): the output test counts 0.
    auto picks the column-norm test for 40-10, which counts all 40 (and catches a dead one)."""
    cfg = T.TMS_TARGETS["tms_40-10"]
    model = _handmade_tms(cfg, 1.12, -0.33)
    assert T.represented_features(model, criterion="output") == 0
    assert T.represented_features(model) == 40
    assert T.represented_features(_handmade_tms(cfg, 1.12, -0.33, dead=7)) == 39
    with pytest.raises(ValueError, match="criterion must be one of"):
        T.represented_features(model, criterion="norm")  # type: ignore[arg-type]


def test_recipes_follow_the_reference():
    assert T.tms_recipe(TMS52) == T.TMSRecipe(1024, False, "output")
    assert T.tms_recipe(T.TMS_TARGETS["tms_40-10_id"]) == T.TMSRecipe(8192, True, "column_norm")
    m = T.train_tms(T.TMS_TARGETS["tms_40-10"], seed=0, steps=1, batch_size=8, lr=1e-9)
    assert m.training_info["zero_bias_init"] is True
    assert m.linear2.bias.abs().max().item() < 1e-6
    m = T.train_tms(TMS52, seed=0, steps=1, batch_size=8, lr=1e-9)
    assert m.training_info["batch_size"] == 8 and m.linear2.bias.abs().max().item() > 1e-3


def test_train_tms_learns_deterministic_and_leaves_global_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    a = T.train_tms(TMS52, seed=SEED_ALIVE, steps=400)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    b = T.train_tms(TMS52, seed=SEED_ALIVE, steps=400)
    assert torch.equal(a.linear1.weight, b.linear1.weight)
    x = T.tms_batch(4096, TMS52, torch.Generator().manual_seed(9))
    untrained = _initialised(TMS52, SEED_ALIVE)
    with torch.no_grad():
        assert ((a(x) - x) ** 2).mean() < 0.5 * ((untrained(x) - x) ** 2).mean()


def test_train_verified_tms_retries_until_all_features(monkeypatch):
    made = {0: _handmade_tms(TMS52, 1.0, 0.0, dead=1), 1: _handmade_tms(TMS52, 1.13, -0.24)}
    calls: list[int] = []

    def fake_train(cfg, *, seed, **kw):
        calls.append(seed)
        made[seed].training_info = {"seed": seed}
        return made[seed]

    monkeypatch.setattr(T, "train_tms", fake_train)
    model = T.train_verified_tms(TMS52, seeds=range(5))
    assert calls == [0, 1] and model is made[1]
    assert model.training_info["seeds_tried"] == [
        {"seed": 0, "represented": 4},
        {"seed": 1, "represented": 5},
    ]
    assert model.training_info["criterion"] == "output"
    with pytest.raises(RuntimeError, match=r"no seed .* \(seed 0: 4\)"):
        T.train_verified_tms(TMS52, seeds=[0])
    with pytest.raises(ValueError, match="at least one seed"):
        T.train_verified_tms(TMS52, seeds=[])


@pytest.mark.slow
def test_reference_recipe_is_seed_fragile_and_verification_finds_a_pentagon():
    """Measured: seeds 0 and 1 of the 5-2 recipe miss features; seed 2 gives the pentagon
    (norms ~1.13-1.14, bias ~-0.25, outputs 0.70-0.73 at x = 0.75, as in sheet §9)."""
    model = T.train_verified_tms(TMS52, seeds=range(10))
    tried = model.training_info["seeds_tried"]
    assert [t["represented"] for t in tried][-1] == 5 and len(tried) >= 2
    outs, norms = T.feature_outputs(model), T.column_norms(model)
    assert outs.min() > 0.68 and outs.max() < 0.75
    assert norms.min() > 1.1 and norms.max() < 1.16


def test_tms_decomposition_names():
    mods = T.tms_decomposition(TMS52_ID, 20)
    assert [(m.pattern, m.C, m.tied_to) for m in mods] == [
        ("linear1", 20, None),
        ("hidden_layers.0", 20, None),
        ("linear2", 20, "linear1"),
    ]
    assert [m.pattern for m in T.tms_decomposition(TMS52, 3)] == ["linear1", "linear2"]
    with pytest.raises(ValueError, match="C must be an integer >= 1"):
        T.tms_decomposition(TMS52, 0)


def test_tms_roundtrip_keeps_the_tie(tmp_path):
    model = _randomise(T.TMSModel(TMS52_ID))
    model.training_info = {"seed": 4}
    back = io.load_target(io.save_target(model, tmp_path / "tms"))
    assert isinstance(back, T.TMSModel) and back.cfg == TMS52_ID
    assert back.linear2.weight.data_ptr() == back.linear1.weight.data_ptr()
    x = T.tms_batch(16, TMS52_ID, torch.Generator().manual_seed(0))
    assert torch.equal(back(x), model(x))
    assert back.training_info == {"seed": 4}


# -- bundled targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(T.TMS_TARGETS))
def test_bundled_targets_are_verified(name):
    model = io.load_bundled_target(name)
    cfg = T.TMS_TARGETS[name]
    assert model.cfg == cfg
    assert T.represented_features(model) == cfg.n_features
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    if cfg.identity:
        assert torch.equal(model.hidden_layers[0].weight, torch.eye(cfg.n_hidden))
    made = json.loads((io.bundled_targets_dir() / "MADE_WITH.json").read_text())
    entry = made["targets"][name]
    assert entry["training"]["seed"] == model.training_info["seed"]
    assert entry["command"].startswith("python scripts/train_spd_targets.py")
