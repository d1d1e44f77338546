"""The temperature sweep: the synthetic table, monotonicity checks, E[U], the output files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from sparselens.core.softmax import softmax
from sparselens.lm.checkpoint import checkpoint_hash, save_checkpoint
from sparselens.lm.model import MiniGPT, MiniGPTConfig
from sparselens.lm.sweep import (
    FILES,
    PLOTS,
    SAMPLING_TAUS,
    SYNTHETIC_LOGITS,
    TAUS,
    MonotonicityError,
    check_monotone,
    draw_first_tokens,
    entropy_curve,
    expected_unique,
    expected_unique_curve,
    run_sweep,
)
from sparselens.lm.tokenizers import CharTokenizer

TABLE = (0.0007, 0.2335, 0.7175, 1.2066, 1.7864, 2.3372, 2.5994, 2.9323, 2.9832)
MAX_Q = (0.99995, 0.9641, 0.8590, 0.7409, 0.5916, 0.4341, 0.3478, 0.2017, 0.1606)


def test_synthetic_entropies_match_the_table():
    assert TAUS == (0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0, 10.0)
    assert SYNTHETIC_LOGITS == (3, 2, 1, 0.5, 0, -0.5, -1, -2)
    h = entropy_curve(SYNTHETIC_LOGITS)
    np.testing.assert_allclose(h, TABLE, atol=1e-4)
    assert np.all(h < 3.0)
    max_q = [float(softmax(np.array(SYNTHETIC_LOGITS), t).max()) for t in TAUS]
    np.testing.assert_allclose(max_q, MAX_Q, atol=1e-4)


def test_check_monotone_raises_on_a_decrease():
    check_monotone([1, 2, 3], [0.0, 1.0, 1.0], name="h")
    check_monotone([1, 2, 3], [0.0, 1.0, 1.0 - 1e-12], name="h")  # within the tolerance
    with pytest.raises(MonotonicityError, match=r"h decreases from tau=2 to tau=3"):
        check_monotone([1, 2, 3], [0.0, 1.0, 0.9], name="h")
    with pytest.raises(ValueError, match="strictly increasing"):
        check_monotone([1, 1, 3], [0, 1, 2], name="h")
    assert issubclass(MonotonicityError, ValueError)


def test_entropy_curve_rejects_a_non_monotone_entropy(monkeypatch):
    import sparselens.lm.sweep as sweep

    monkeypatch.setattr(sweep, "entropy", lambda z, tau, unit: 1.0 / tau)  # falls with tau
    with pytest.raises(MonotonicityError, match="entropy decreases"):
        entropy_curve(SYNTHETIC_LOGITS)


def test_expected_unique_closed_forms_and_monotone():
    assert expected_unique(np.array([1.0, 0.0, 0.0]), 100) == pytest.approx(1.0)
    v, n = 7, 100
    assert expected_unique(np.full(v, 1 / v), n) == pytest.approx(v * (1 - (1 - 1 / v) ** n))
    q = np.array([0.5, 0.25, 0.25])
    assert expected_unique(q, 2) == pytest.approx(sum(1 - (1 - p) ** 2 for p in q))
    rng = np.random.default_rng(0)
    taus = np.geomspace(0.05, 20, 40)
    for _ in range(20):
        z = rng.normal(size=50) * rng.uniform(0.5, 8)
        eu = expected_unique_curve(z, taus, 100)
        assert 1.0 - 1e-9 <= eu[0] and eu[-1] <= 50
        assert np.all(np.diff(eu) >= -1e-9)


def test_expected_unique_matches_simulation():
    z = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    q = softmax(z, 1.0)
    rng = np.random.default_rng(1)
    counts = [len(set(rng.choice(6, size=5, p=q))) for _ in range(20000)]
    assert np.mean(counts) == pytest.approx(expected_unique(q, 5), abs=0.03)


def test_draws_are_reproducible_per_seed():
    z = np.array([1.0, 0.5, 0.0, -0.5])
    a = draw_first_tokens(z, 1.0, 50, seed=7)
    assert a == draw_first_tokens(z, 1.0, 50, seed=7)
    assert a[1:] == draw_first_tokens(z, 1.0, 49, seed=8)  # draw j uses seed + j
    assert set(a) <= {0, 1, 2, 3}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train("abcdefgh Tomorrowshe")
    model = MiniGPT(
        MiniGPTConfig(
            vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_len=8
        )
    )
    with torch.no_grad():
        model.embed.weight.mul_(50)  # a sharper first-step distribution than at init
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, tok)
    return path, tok


def test_sweep_writes_files_and_manifest(tiny_checkpoint, tmp_path):
    ckpt, tok = tiny_checkpoint
    out = tmp_path / "sweep"
    r = run_sweep(out, ckpt, prompt="Tomorrow she", seed=3, command=["test"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(FILES)
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "report.md").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "lm-sweep" and m["status"] == "completed"
    assert m["seeds"] == list(range(3, 103)) and m["n_samples"] == 100
    assert m["taus"] == list(TAUS) and m["sampling_taus"] == list(SAMPLING_TAUS)
    assert m["synthetic_logits"] == list(SYNTHETIC_LOGITS)
    assert m["checkpoint_hash"] == checkpoint_hash(ckpt)
    assert m["prompt"] == "Tomorrow she"
    # the last 8 ids (context_len) of the prompt
    assert m["prompt_ids"] == tok.encode("Tomorrow she")[-8:] == r.prompt_ids
    assert {"python", "torch", "numpy"} <= set(m["versions"])
    assert "hardware" in m and "git" in m and m["command"] == ["test"]

    res = m["results"]
    np.testing.assert_allclose(res["entropy_bits_synthetic"], TABLE, atol=1e-4)
    h = np.array(res["entropy_bits_model"])
    assert np.all(np.diff(h) >= -1e-9) and h[-1] <= np.log2(tok.vocab_size) + 1e-9
    eu = np.array(res["expected_unique"])
    assert np.all(np.diff(eu) >= -1e-9)
    for t in SAMPLING_TAUS:
        draws = res["draws"][f"{t:g}"]
        assert len(draws) == 100
        assert res["observed_unique"][f"{t:g}"] == len(set(draws)) == r.observed_unique[t]
    assert len(r.table().splitlines()) == 2 + len(TAUS)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["tau"] for row in rows] == list(TAUS)
    np.testing.assert_allclose([row["entropy_bits_model"] for row in rows], h)
    assert json.loads((out / "summary.json").read_text()) == res
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3

    with pytest.raises(FileExistsError, match="not empty"):  # a run never overwrites another
        run_sweep(out, ckpt, prompt="Tomorrow she", seed=3)
    again = run_sweep(tmp_path / "again", ckpt, prompt="Tomorrow she", seed=3)
    assert again.observed_unique == r.observed_unique
    np.testing.assert_array_equal(again.h_model, r.h_model)


def test_sweep_bad_input(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        run_sweep(tmp_path / "out", tmp_path / "nope")
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        run_sweep(tmp_path / "out", ckpt, prompt="")
    with pytest.raises(ValueError, match="seed must be"):
        run_sweep(tmp_path / "out", ckpt, seed=-1)
    assert not (tmp_path / "out").exists()
