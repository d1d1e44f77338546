"""``sparselens.sae.trainer``: one optimiser step against a one-batch autograd reference (micro-
batches, AuxK, Multi-TopK, transcoders), dead-latent bookkeeping, true logged means, the lr
schedule, exact resume, outputs, held-out FVU and bad input."""

from __future__ import annotations

import copy
import json
import logging
import signal
from pathlib import Path

import pytest
import torch
import yaml

from sparselens.sae import DeadLatentTracker, SparseCoder, SparseCoderConfig, load_sparse_coder
from sparselens.sae.activations import ActivationSource
from sparselens.sae.data import load_tokens
from sparselens.sae.fvu import fvu as fvu_fn
from sparselens.sae.subject import load_subject
from sparselens.sae.train_config import SAETrainConfig, gao_lr
from sparselens.sae.trainer import HookpointState, train_sae, train_step
from sparselens.train.checkpoint import list_checkpoints
from sparselens.train.signals import Interrupted

HP = "blocks.0.resid_post"


def tiny(**kw) -> SAETrainConfig:
    """12 steps of 8 x 16 positions on the bundled Mini-GPT, 128 latents, k = 4."""
    settings = dict(
        batch_size=8,
        context_len=16,
        tokens=8 * 16 * 12,
        sae=SparseCoderConfig(num_latents=128, k=4, dead_tokens=300),
        lr_warmup_steps=2,
        log_every=3,
        save_every=4,
        threads=1,
        eval_tokens=512,
        progress=False,
    )
    settings.update(kw)
    return SAETrainConfig(**settings)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, hp: str = HP) -> dict[str, torch.Tensor]:
    return load_sparse_coder(run / "final" / hp).state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("ref") / "run"
    return run, train_sae(tiny(), run)


# -- one step against a one-batch reference -----------------------------------------------------
def _states(cfg: SparseCoderConfig, d: int, dead: int) -> list[HookpointState]:
    torch.manual_seed(0)
    coder = SparseCoder(d, cfg, dtype=torch.float64)
    with torch.no_grad():
        coder.b_dec.normal_()  # b_dec != 0: AuxK must not add it to its reconstruction
        if cfg.transcode:
            coder.W_dec.normal_(0, 0.3)
    tracker = DeadLatentTracker.for_coder(coder)
    tracker.tokens_since_fired[:dead] = cfg.dead_tokens  # these latents are dead
    acc = torch.zeros(3, dtype=torch.float64)
    return [HookpointState("h", coder, tracker, 0.1, acc)]


def _reference_step(coder: SparseCoder, x, y, dead, lr: float, per_chunk: int = 0) -> SparseCoder:
    """Plain autograd on the whole batch: fvu + alpha auxk + multi/8, projection, SGD, renorm.
    ``per_chunk > 0``: the WRONG variant, each of ``per_chunk`` chunks normalised on its own."""
    ref = copy.deepcopy(coder)
    cfg = ref.cfg
    chunks = list(zip(x.tensor_split(per_chunk or 1), y.tensor_split(per_chunk or 1), strict=True))
    for xc, yc in chunks:
        out = ref(xc, yc if cfg.transcode else None, dead_mask=dead)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
    if cfg.normalize_decoder and not cfg.transcode:
        ref.remove_gradient_parallel_to_decoder_directions()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    if cfg.normalize_decoder and not cfg.transcode:
        ref.set_decoder_norm_to_unit_norm()
    return ref


@pytest.mark.parametrize("transcode", [False, True])
@pytest.mark.parametrize("normalization", ["residual", "target"])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_step_equals_one_batch_reference(transcode: bool, normalization: str, micro: int) -> None:
    """Micro-batched shares with full-batch denominators (FVU, Multi-TopK, and AuxK rescaled by
    Var(e_mb)/Var(e_batch)) give the one-batch gradient, so one SGD step matches plain autograd
    on the whole batch; half the latents are dead so AuxK is active, b_dec != 0.

    Wrong variant caught (checked to differ here): each micro-batch normalised by its own
    variance, as sparsify before 1.3.2 / a per-chunk AuxK denominator."""
    d, n = 8, 60
    cfg = SparseCoderConfig(
        num_latents=32,
        k=3,
        k_aux=4,
        multi_topk=True,
        transcode=transcode,
        auxk_alpha=0.5,
        auxk_normalization=normalization,
        dead_tokens=10,
    )
    states = _states(cfg, d, dead=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    y = (x @ torch.randn(d, d, generator=g, dtype=torch.float64)) if transcode else x
    coder = states[0].coder
    dead = states[0].tracker.dead_mask.clone()
    ref = _reference_step(coder, x, y, dead, lr=0.1)
    micro_batches = [
        {"h": (xc, yc)} for xc, yc in zip(x.tensor_split(micro), y.tensor_split(micro), strict=True)
    ]
    opt = torch.optim.SGD(coder.parameters(), lr=0.1)
    train_step(states, micro_batches, opt, step=1)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(coder.state_dict()[name], p, rtol=1e-10, atol=1e-12, msg=name)
    out = ref(x, y if transcode else None, dead_mask=dead)
    assert float(out.auxk_loss.detach()) > 0  # AuxK is really on
    if micro > 1:
        wrong = _reference_step(copy.deepcopy(ref), x, y, dead, 0.1, per_chunk=micro)
        right = _reference_step(copy.deepcopy(ref), x, y, dead, 0.1)
        diff = (wrong.W_dec - right.W_dec).detach().abs().max()
        assert float(diff) > 1e-4


def test_step_b_dec_init_and_tracker_once_per_step() -> None:
    """b_dec starts at the mean of the whole first batch (not its first micro-batch); the dead
    counters are updated once per step: a latent that fired only in micro-batch 1 is reset to 0.

    Wrong variants caught: b_dec from one micro-batch; one tracker update per micro-batch (which
    would leave such a latent at the second micro-batch's token count)."""
    cfg = SparseCoderConfig(num_latents=16, k=2, auxk_alpha=0.0, dead_tokens=1000)
    states = _states(cfg, 4, dead=0)
    h = states[0]
    g = torch.Generator().manual_seed(3)
    y1 = torch.randn(5, 4, generator=g, dtype=torch.float64) + 3.0
    y2 = torch.randn(7, 4, generator=g, dtype=torch.float64) - 1.0
    h.tracker.tokens_since_fired.fill_(50)
    opt = torch.optim.SGD(h.coder.parameters(), lr=0.0)
    train_step(states, [{"h": (y1, y1)}, {"h": (y2, y2)}], opt, step=1, init_b_dec=True)
    torch.testing.assert_close(h.coder.b_dec.data, torch.cat([y1, y2]).mean(0))
    with torch.no_grad():
        o1, o2 = h.coder(y1), h.coder(y2)
    fired1 = set(o1.latent_indices[o1.latent_acts > 1e-3].tolist())
    fired2 = set(o2.latent_indices[o2.latent_acts > 1e-3].tolist())
    since = h.tracker.tokens_since_fired
    assert int(h.tracker.tokens_seen) == 12
    for j in range(16):
        assert int(since[j]) == (0 if j in fired1 | fired2 else 62), j
    assert fired1 - fired2  # a latent fired only in micro-batch 1: the case that matters


def test_step_errors_name_hookpoint_and_step() -> None:
    cfg = SparseCoderConfig(num_latents=16, k=2)
    states = _states(cfg, 4, dead=0)
    opt = torch.optim.SGD(states[0].coder.parameters(), lr=0.1)
    bad = torch.ones(3, 4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^hookpoint h, step 7: x must be finite"):
        train_step(states, [{"h": (bad, bad)}], opt, step=7)
    wide = torch.ones(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^hookpoint h, step 2: .*shape \(\.\.\., 4\)"):
        train_step(states, [{"h": (wide, wide)}], opt, step=2)
    empty = torch.ones(0, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^hookpoint h, step 5: empty batch"):
        train_step(states, [{"h": (empty, empty)}], opt, step=5)


# -- schedule and learning rate -----------------------------------------------------------------
def test_gao_lr_scaling() -> None:
    """lr = 2e-4 / sqrt(latents / 2^14): 2e-4 at 16384 latents, half at 4x as many.
    Wrong variant caught: 1/latents (no square root) scaling."""
    assert gao_lr(2**14) == pytest.approx(2e-4)
    assert gao_lr(2**16) == pytest.approx(1e-4)
    assert gao_lr(1024) == pytest.approx(8e-4)
    assert tiny().lr_for(128) == pytest.approx(2e-4 * (2**14 / 128) ** 0.5)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_lr_factor_counts_optimiser_steps(decay: str) -> None:
    """Warm-up k/W for k <= W, then decay to min_lr_ratio exactly at the last OPTIMISER step,
    whatever micro_batches is. Wrong variant caught: a schedule whose length counts micro-batches
    (sparsify: decay over batches, never completed under accumulation)."""
    import math

    cfg = tiny(
        tokens=8 * 16 * 20, micro_batches=4, lr_warmup_steps=5, lr_decay=decay, min_lr_ratio=0.1
    )
    assert cfg.steps == 20
    for k in range(1, 6):
        assert cfg.lr_factor(k) == pytest.approx(k / 5)
    for k in range(6, 21):
        t = (k - 5) / 15
        ref = {
            "linear": 1 + (0.1 - 1) * t,
            "cosine": 0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2,
            "constant": 1.0,
        }[decay]
        assert cfg.lr_factor(k) == pytest.approx(ref), k
    if decay != "constant":
        assert cfg.lr_factor(20) == pytest.approx(0.1)


# -- full runs ----------------------------------------------------------------------------------
def test_outputs(reference) -> None:
    run, s = reference
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (run / name).is_file(), name
    for name in ("fvu_auxk.png", "dead_fraction.png", "firing_density.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / ".staging").exists()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["subject"] == "minigpt" and cfg["corpus"] == "verbs"
    assert cfg["hookpoints"] == [HP] and cfg["transcode"] is False and cfg["context_len"] == 16
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["kind"] == "sae-train"
    prov = json.loads((run / "final" / HP / "cfg.json").read_text())["provenance"]
    h = s["hookpoints"][HP]
    assert prov["hookpoint"] == HP and prov["subject"] == "minigpt" and prov["corpus"] == "verbs"
    assert prov["context_len"] == 16 and prov["normalisation"] == "none"
    assert prov["tokens_seen"] == h["tokens_seen"]
    # every kept position of the 12 steps was seen once
    assert 0.8 * 12 * 128 < h["tokens_seen"] < 12 * 128
    assert set(h) >= {"fvu", "l0", "dead_fraction", "dense_fraction", "tokens_seen", "wall_seconds"}
    assert h["l0"] <= 4 and 0 < h["fvu"] < 1
    assert list(json.loads((run / "summary.json").read_text())["hookpoints"]) == [HP]


def test_saved_decoder_rows_are_unit_norm(reference) -> None:
    """Rows are renormalised AFTER the last step. Wrong variant caught: sparsify's renormalise
    before each forward, which leaves the saved (post-step) rows off unit norm."""
    w = _weights(reference[0])["W_dec"]
    torch.testing.assert_close(w.norm(dim=1), torch.ones(128), rtol=0, atol=1e-6)


def test_val_fvu_and_l0_match_one_shot_reference(reference) -> None:
    """summary's held-out FVU is the dataset ratio of sums over the validation windows
    (recomputed here in one shot, float64). Wrong variant caught: a mean of per-batch FVUs."""
    run, s = reference
    subject = load_subject()
    coder = load_sparse_coder(run / "final" / HP)
    val = load_tokens(subject, split="val")[: 512 // 16 * 16].view(-1, 16)
    src = ActivationSource(subject, HP)
    ys, outs = [], []
    with torch.no_grad():
        for lo in range(0, val.shape[0], 8):
            y = src(val[lo : lo + 8])[HP][1]
            ys.append(y)
            outs.append(coder(y))
    y = torch.cat(ys).double()
    y_hat = torch.cat([o.sae_out for o in outs]).double()
    ref = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    h = s["hookpoints"][HP]
    assert h["fvu"] == pytest.approx(ref, rel=1e-9)
    per_batch = sum(
        float(fvu_fn(a.double(), o.sae_out.double())) for a, o in zip(ys, outs, strict=True)
    ) / len(ys)
    assert abs(per_batch - ref) > 1e-6 * ref
    l0 = float(torch.cat([(o.latent_acts != 0).sum(-1) for o in outs]).double().mean())
    assert h["l0"] == pytest.approx(l0)
    assert h["val_tokens"] == y.shape[0]


def test_logged_values_are_true_means(reference, tmp_path: Path) -> None:
    """A record averages exactly the steps since the previous one: with log_every=3 each value
    is the mean of the three log_every=1 values (13 steps: the last record covers ONE step).

    Wrong variants caught: dividing by log_every regardless of the steps accumulated; dividing
    by micro-steps (sparsify)."""
    run1 = tmp_path / "every1"
    train_sae(tiny(tokens=8 * 16 * 13, log_every=1), run1)
    run3 = tmp_path / "every3"
    train_sae(tiny(tokens=8 * 16 * 13, log_every=3, micro_batches=2), run3)
    per_step = {r["step"]: r for r in _metrics(run1)}
    recs = _metrics(run3)
    assert [r["step"] for r in recs] == [3, 6, 9, 12, 13]
    prev = 0
    for r in recs:
        window = [per_step[s] for s in range(prev + 1, r["step"] + 1)]
        assert r["steps_averaged"] == len(window)
        for key in ("fvu", "auxk"):
            ref = sum(w[key] for w in window) / len(window)
            assert r[key] == pytest.approx(ref, rel=1e-4, abs=1e-9), (r["step"], key)
        assert r["tokens"] == per_step[r["step"]]["tokens"]
        prev = r["step"]
    assert recs[-1]["lr"] == pytest.approx(0.0, abs=1e-15)  # linear decay ends at the last step


def test_exact_resume(reference, tmp_path: Path) -> None:
    """Stopped by SIGTERM's exception right after the step-8 checkpoint, then resumed: final
    weights and metrics are identical bit for bit to the uninterrupted run.

    Wrong variants caught: not restoring Adam moments, the dead-latent counters or the data
    position (each changes the weights)."""
    ref_run, _ = reference
    run = tmp_path / "run"

    def stop(step: int) -> None:
        if step == 8:
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        train_sae(tiny(), run, on_checkpoint=stop)
    assert [s for s, _ in list_checkpoints(run / "checkpoints", "sae")] == [4, 8]
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run / "final").exists()
    train_sae(tiny(), run, resume=True)
    for name, t in _weights(ref_run).items():
        assert torch.equal(_weights(run)[name], t), name
    assert _metrics(run) == _metrics(ref_run)
    again = train_sae(tiny(), run, resume=True)  # complete: returns the summary
    assert (
        again["hookpoints"][HP]["fvu"]
        == json.loads((run / "summary.json").read_text())["hookpoints"][HP]["fvu"]
    )


def test_resume_rejects_corrupt_checkpoint_and_keeps_files(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def stop(step: int) -> None:
        if step == 4:
            raise Interrupted(signal.SIGINT)

    with pytest.raises(Interrupted):
        train_sae(tiny(), run, on_checkpoint=stop)
    tensors = run / "checkpoints" / "sae-00000004.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum") as e:
        train_sae(tiny(), run, resume=True)
    assert "\n" not in str(e.value)
    assert tensors.read_bytes() == bytes(blob) and (run / "config.yaml").is_file()
    with pytest.raises(ValueError, match=r"tokens differs from the run's config\.yaml"):
        train_sae(tiny(tokens=8 * 16 * 14), run, resume=True)


def test_bad_settings_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"hookpoints: 'blocks\.7\.\*' matches no module"):
        train_sae(tiny(hookpoints=["blocks.7.*"]), tmp_path / "a")
    with pytest.raises(ValueError, match=r"sae\.k must be <= num_latents \(1024\), got 2000"):
        train_sae(tiny(sae=SparseCoderConfig(expansion_factor=16, k=2000)), tmp_path / "b")
    with pytest.raises(ValueError, match="transcoder needs equal input and output widths"):
        train_sae(tiny(hookpoints=["blocks.0.mlp.fc_in"], transcode=True), tmp_path / "c")
    with pytest.raises(ValueError, match="context length 32"):
        train_sae(tiny(context_len=64, batch_size=4), tmp_path / "d")
    with pytest.raises(ValueError, match="tokens must be >= batch_size"):
        tiny(tokens=100)
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be divisible by micro_batches"):
        tiny(micro_batches=3)
    assert not any(tmp_path.iterdir())  # nothing written for bad settings


def test_nan_activations_fail_with_hookpoint_and_step(tmp_path: Path, monkeypatch) -> None:
    """NaN activations at step 6 stop the run with one line naming the hookpoint and step; the
    step-4 checkpoint stays and the manifest says failed."""
    real = ActivationSource.__call__
    calls = {"n": 0}

    def poisoned(self, tokens):
        calls["n"] += 1
        rows = real(self, tokens)
        if calls["n"] == 6:
            x, _ = rows[HP]
            x = x.clone()
            x[3, 5] = float("inf")
            rows[HP] = (x, x)
        return rows

    monkeypatch.setattr(ActivationSource, "__call__", poisoned)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^hookpoint {HP}, step 6: x must be finite"):
        train_sae(tiny(), run)
    assert [s for s, _ in list_checkpoints(run / "checkpoints", "sae")] == [4]
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_transcoder_run(tmp_path: Path) -> None:
    """A transcoder of blocks.0.mlp: config and cfg.json say transcode; the decoder starts at 0
    and is not unit-norm constrained."""
    run = tmp_path / "t"
    s = train_sae(tiny(hookpoints=["blocks.0.mlp"], transcode=True), run)
    coder = load_sparse_coder(run / "final" / "blocks.0.mlp")
    assert coder.cfg.transcode is True
    assert yaml.safe_load((run / "config.yaml").read_text())["sae"]["transcode"] is True
    assert 0 < s["hookpoints"]["blocks.0.mlp"]["fvu"] < 1.5
    assert not torch.allclose(coder.W_dec.norm(dim=1), torch.ones(128))


def test_hf_subject_two_hookpoints(tmp_path: Path) -> None:
    """A tiny random GPT-2 saved with save_pretrained (no downloads), hookpoints
    transformer.h.*.mlp: one coder per block MLP."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    run = tmp_path / "run"
    s = train_sae(
        tiny(
            subject=str(tmp_path / "gpt2"),
            hookpoints=["transformer.h.*.mlp"],
            tokens=8 * 16 * 5,
            val_fraction=0.2,
        ),
        run,
    )
    names = ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert list(s["hookpoints"]) == names
    for n in names:
        coder = load_sparse_coder(run / "final" / n)
        assert coder.d_in == 32 and coder.num_latents == 128
    cfg_yaml = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg_yaml["subject"] == str((tmp_path / "gpt2").resolve())
    assert cfg_yaml["corpus"] == "shakespeare-slice"


def test_default_warmup_is_a_tenth_of_short_runs() -> None:
    cfg = tiny(tokens=8 * 16 * 30, lr_warmup_steps=None)
    assert cfg.warmup_steps == 3 and cfg.lr_factor(1) == pytest.approx(1 / 3)
    assert tiny(tokens=8 * 16 * 1000, lr_warmup_steps=None).warmup_steps == 50
    with pytest.raises(ValueError, match=r"lr_warmup_steps must be <= the number of optimiser"):
        tiny(lr_warmup_steps=13)


def test_partial_sae_mapping_keeps_demo_defaults() -> None:
    """``sae: {k: 4}`` (YAML or --sae.k) changes k only: the demo's 1024 latents and 200k-token
    dead window stay. Wrong variant caught: falling back to SparseCoderConfig's own defaults
    (expansion 32, dead after 10M tokens), which silently changes the run."""
    cfg = SAETrainConfig(sae={"k": 4})
    assert cfg.sae.k == 4 and cfg.sae.expansion_factor == 16 and cfg.sae.dead_tokens == 200_000
    assert SAETrainConfig().sae.k == 8
    assert SAETrainConfig().sae == SAETrainConfig(sae={}).sae
    explicit = SparseCoderConfig(k=8)  # an explicit object is taken as it is
    assert SAETrainConfig(sae=explicit).sae.expansion_factor == 32


def test_batchtopk_threshold_updated_once_per_micro_batch_with_dead_latents() -> None:
    """With micro-batches, dead latents and residual-normalised AuxK, the trainer's extra no-grad
    pass (the batch's Var(e)) must not move BatchTopK's inference threshold: the EMA advances
    once per micro-batch, as in a plain train-mode forward of each.

    Wrong variant caught: the pre-pass run in train mode, which applies the EMA twice per
    micro-batch (threshold ends nearer the batch minimum than training saw)."""
    cfg = SparseCoderConfig(
        num_latents=32, k=3, k_aux=4, activation="batchtopk", threshold_lr=0.3, dead_tokens=10
    )
    states = _states(cfg, 8, dead=16)
    coder = states[0].coder
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(n, 8, generator=g, dtype=torch.float64) * 2 for n in (9, 13)]
    ref = copy.deepcopy(coder)
    with torch.no_grad():
        for c in chunks:
            ref(c)
    assert float(ref.threshold) > 0
    opt = torch.optim.SGD(coder.parameters(), lr=0.0)
    train_step(states, [{"h": (c, c)} for c in chunks], opt, step=1)
    torch.testing.assert_close(coder.threshold, ref.threshold, rtol=1e-12, atol=0)
