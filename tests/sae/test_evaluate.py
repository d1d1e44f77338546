"""``sparselens.sae.evaluate``: every metric against an independent dense reference on a tiny
Mini-GPT (hand-written forward hooks, dense TopK codes, ``F.cross_entropy`` / ``F.kl_div``), and
tests that fail on the known wrong variants of each formula."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sparselens.lm import CharTokenizer, MiniGPT, MiniGPTConfig
from sparselens.lm.tokenizers import BOS_ID, EOS_ID, PAD_ID
from sparselens.sae import SparseCoder, SparseCoderConfig
from sparselens.sae.evaluate import (
    DENSE_THRESHOLD,
    ce_loss_recovered,
    density_histogram,
    evaluate,
    resolve_hookpoint,
    token_windows,
)
from sparselens.sae.subject import Subject

T = 8
HOOK = "blocks.0.resid_post"


def tiny_subject(seed: int = 0) -> Subject:
    """A 2-layer Mini-GPT (d 16) with large random weights, so ablations move the loss."""
    tok = CharTokenizer.train("abcdefgh ")
    cfg = MiniGPTConfig(
        vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=2, d_ff=32, context_len=T
    )
    torch.manual_seed(seed)
    model = MiniGPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.4)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Subject("tiny", model, tok, T, (PAD_ID, EOS_ID, BOS_ID), "minigpt")


def token_stream(subject: Subject, windows: int, seed: int = 1) -> Tensor:
    """``windows`` sequences of T tokens sampled from the model itself (so that the clean model
    predicts them well and ablations hurt), each starting with ``<bos>``, with an ``<eos>`` at
    position 5, then 3 tokens of tail that fill no window."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.full((windows, 1), BOS_ID)
    with torch.no_grad():
        for t in range(1, T):
            if t == 5:
                nxt = torch.full((windows, 1), EOS_ID)
            else:
                p = torch.softmax(subject.model(seq)[:, -1], -1)
                nxt = torch.multinomial(p, 1, generator=g)
            seq = torch.cat([seq, nxt], 1)
    return torch.cat([seq.reshape(-1), torch.tensor([5, 6, 7])])


def make_coder(d: int = 16, *, transcode: bool = False, seed: int = 3, **kw) -> SparseCoder:
    torch.manual_seed(seed)
    cfg = SparseCoderConfig(num_latents=48, k=4, transcode=transcode, **kw)
    c = SparseCoder(d, cfg)
    with torch.no_grad():
        c.b_dec.normal_(0.0, 0.3)
        c.encoder.bias.normal_(0.0, 0.2)
        if transcode:
            c.W_dec.normal_(0.0, 0.3)
    return c


# -- the independent reference ------------------------------------------------------------------
def grab(model: torch.nn.Module, name: str, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(input, output, logits) of module ``name`` with plain torch hooks."""
    box: dict[str, Tensor] = {}
    mod = model.get_submodule(name)
    h1 = mod.register_forward_pre_hook(lambda _m, a: box.__setitem__("in", a[0].clone()))
    h2 = mod.register_forward_hook(lambda _m, _a, o: box.__setitem__("out", o.clone()))
    try:
        logits = model(tokens)
    finally:
        h1.remove()
        h2.remove()
    return box["in"], box["out"], logits


def logits_with(model: torch.nn.Module, name: str, tokens: Tensor, new: Tensor) -> Tensor:
    h = model.get_submodule(name).register_forward_hook(lambda _m, _a, _o: new)
    try:
        return model(tokens)
    finally:
        h.remove()


def dense_codes(c: SparseCoder, x: Tensor) -> Tensor:
    """Dense (N, M) TopK code: ReLU(W_enc (x - b_dec) + b_enc) (no b_dec for transcoders), top k."""
    x = x.double()
    b_pre = 0.0 if c.cfg.transcode else c.b_dec.double()
    pre = torch.relu((x - b_pre) @ c.W_enc.double().T + c.b_enc.double())
    vals, idx = pre.topk(c.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals)


def dense_decode(c: SparseCoder, z: Tensor, x: Tensor) -> Tensor:
    out = z @ c.W_dec.double() + c.b_dec.double()
    if c.W_skip is not None:
        out = out + x.double() @ c.W_skip.double().T
    return out


def reference(subject: Subject, c: SparseCoder, name: str, tokens: Tensor, exclude: bool = True):
    """All metrics over all windows at once, computed the plain dense way."""
    model = subject.model
    win = tokens[: tokens.numel() // T * T].view(-1, T)
    with torch.no_grad():
        x_in, out, logits = grab(model, name, win)
        keep = ~torch.isin(win, torch.tensor(subject.special_token_ids))
        if not exclude:
            keep = torch.ones_like(keep)
        y_all = out.reshape(-1, out.shape[-1])
        src = x_in if c.cfg.transcode else out
        x = src.reshape(-1, src.shape[-1])[keep.reshape(-1)]
        y = y_all[keep.reshape(-1)].double()
        z = dense_codes(c, x)
        y_hat = dense_decode(c, z, x)
        new = y_all.clone()
        new[keep.reshape(-1)] = y_hat.float()
        spliced = new.view_as(out)
        ablated = torch.where(keep.unsqueeze(-1), 0.0, out)
        pred = keep[:, :-1].reshape(-1)
        tgt = win[:, 1:].reshape(-1)[pred]

        def lp(lg: Tensor) -> Tensor:
            return F.log_softmax(lg[:, :-1].double(), -1).reshape(-1, lg.shape[-1])[pred]

        lp_clean = lp(logits)
        lp_sae = lp(logits_with(model, name, win, spliced))
        lp_zero = lp(logits_with(model, name, win, ablated))
    fired = (z > c.cfg.fire_threshold).sum(0)
    n = y.shape[0]
    yn, hn = y.norm(dim=1), y_hat.norm(dim=1)
    ok = yn > 0
    return {
        "y": y,
        "y_hat": y_hat,
        "z": z,
        "keep": keep,
        "fvu": float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()),
        "l0": int((z != 0).sum()) / n,
        "dead": float((fired == 0).double().mean()),
        "dense": float((fired / n > DENSE_THRESHOLD).double().mean()),
        "ce_clean": float(F.nll_loss(lp_clean, tgt)),
        "ce_sae": float(F.nll_loss(lp_sae, tgt)),
        "ce_zero": float(F.nll_loss(lp_zero, tgt)),
        "lp_clean": lp_clean,
        "lp_sae": lp_sae,
        "lp_zero": lp_zero,
        "kl_sae": float(F.kl_div(lp_sae, lp_clean, log_target=True, reduction="sum") / len(tgt)),
        "kl_zero": float(F.kl_div(lp_zero, lp_clean, log_target=True, reduction="sum") / len(tgt)),
        "shrinkage": float((hn[ok] / yn[ok]).mean()),
        "cosine": float(F.cosine_similarity(y[ok], y_hat[ok], dim=1).mean()),
        "rrb": float(hn.pow(2).sum() / (y * y_hat).sum()),
        "n": n,
        "preds": len(tgt),
    }


@pytest.fixture(scope="module")
def subject() -> Subject:
    return tiny_subject()


@pytest.fixture(scope="module")
def stream(subject) -> Tensor:
    return token_stream(subject, 13)


@pytest.fixture(scope="module")
def sae_case(subject, stream):
    c = make_coder()
    res = evaluate(subject, c, HOOK, stream, context_len=T, batch_size=3)
    return c, res, reference(subject, c, HOOK, stream)


# -- activation metrics -------------------------------------------------------------------------
def test_fvu_is_dataset_ratio_of_mean_centred_sums(sae_case, subject, stream) -> None:
    """FVU = sum||y - yhat||^2 / sum||y - ybar||^2 over all evaluated tokens, ybar their mean.

    Wrong variants caught: the variance around zero (``sum ||y||^2`` denominator, SAELens
    #659/#665) and the mean of per-batch FVUs (SAELens #443 / "legacy"): both differ here by
    far more than the tolerance."""
    _, res, ref = sae_case
    assert res.fvu == pytest.approx(ref["fvu"], rel=1e-5)
    assert res.explained_variance == pytest.approx(1 - ref["fvu"], rel=1e-5)
    y, y_hat = ref["y"], ref["y_hat"]
    around_zero = float((y - y_hat).pow(2).sum() / y.pow(2).sum())
    assert abs(around_zero - ref["fvu"]) > 0.02
    # per-batch FVUs (batch_size 3 windows), then averaged
    per_window = ref["keep"].sum(1).tolist()
    bounds = np.cumsum([0] + [sum(per_window[i : i + 3]) for i in range(0, len(per_window), 3)])
    legacy = np.mean(
        [
            float((y[a:b] - y_hat[a:b]).pow(2).sum() / (y[a:b] - y[a:b].mean(0)).pow(2).sum())
            for a, b in itertools.pairwise(bounds)
        ]
    )
    assert abs(legacy - ref["fvu"]) > 0.005
    assert res.fvu != pytest.approx(legacy, rel=1e-3)


def test_sparsity_counts_match_dense_reference(sae_case) -> None:
    """L0 = mean non-zero latents per token; dead = never above fire_threshold on the evaluated
    tokens; dense = firing on > 10 % of them; the histogram covers every live latent."""
    c, res, ref = sae_case
    assert res.l0 == pytest.approx(ref["l0"], rel=1e-12)
    assert res.dead_fraction == pytest.approx(ref["dead"], abs=1e-12)
    assert res.dense_fraction == pytest.approx(ref["dense"], abs=1e-12)
    assert 0 < res.dead_fraction < 1 and 0 < res.dense_fraction < 1  # both counts are exercised
    h = res.density_histogram
    assert sum(h.counts) + h.never_fired == c.num_latents
    assert h.never_fired == round(ref["dead"] * c.num_latents)
    assert res.tokens == ref["n"] and res.predictions == ref["preds"]
    assert res.positions == 13 * T and res.sequences == 13


def test_shrinkage_cosine_and_relative_bias(sae_case) -> None:
    """shrinkage = mean ||yhat||/||y|| per token (not ||sum yhat|| / ||sum y||); cosine = mean
    per-token cosine; gamma = E||yhat||^2 / E<y, yhat> (Gated-SAE eq. 10)."""
    _, res, ref = sae_case
    assert res.shrinkage == pytest.approx(ref["shrinkage"], rel=1e-6)
    assert res.cosine == pytest.approx(ref["cosine"], rel=1e-6)
    assert res.relative_reconstruction_bias == pytest.approx(ref["rrb"], rel=1e-6)
    ratio_of_means = float(ref["y_hat"].norm(dim=1).mean() / ref["y"].norm(dim=1).mean())
    assert abs(ratio_of_means - ref["shrinkage"]) > 1e-3


def test_dead_counts_firing_not_selection(subject, stream) -> None:
    """Latents picked by TopK with a zero activation (fewer than k positive pre-activations) do
    not count as firing. Wrong variant caught: 'alive = ever among the selected indices'
    (sparsify's counter), which reports fewer dead latents here."""
    c = make_coder()
    with torch.no_grad():
        c.encoder.bias[:40] = -50.0  # 40 latents can never be positive: < k positives per token
    res = evaluate(subject, c, HOOK, stream, context_len=T, batch_size=4)
    ref = reference(subject, c, HOOK, stream)
    assert res.dead_fraction == pytest.approx(ref["dead"]) and res.dead_fraction >= 40 / 48
    with torch.no_grad():
        x = ref["y"].float()
        picked = torch.unique(c(x).latent_indices)
    selected_alive = picked.numel() / c.num_latents
    assert 1 - selected_alive < res.dead_fraction
    assert res.l0 < c.cfg.k  # zero picks are not counted in L0 either


def test_fire_threshold_is_the_coders(subject, stream) -> None:
    """A latent fires only above ``cfg.fire_threshold``: a threshold above half the live
    latents' largest activation turns them dead (wrong variant caught: firing = any act > 0)."""
    c = make_coder()
    z = reference(subject, c, HOOK, stream)["z"]
    peaks = z.max(0).values
    low = float((peaks <= 1e-3).double().mean())
    live = peaks[peaks > 1e-3].sort().values
    mid = live.numel() // 2
    c.cfg.fire_threshold = float(live[mid - 1 : mid + 1].mean())  # between two peaks
    res = evaluate(subject, c, HOOK, stream, context_len=T, batch_size=4)
    assert res.dead_fraction == pytest.approx(reference(subject, c, HOOK, stream)["dead"])
    assert res.fire_threshold == c.cfg.fire_threshold
    assert res.dead_fraction > low + 0.1


# -- downstream loss ----------------------------------------------------------------------------
def test_cross_entropies_and_loss_recovered(sae_case) -> None:
    """CE clean / spliced / zero-ablated match F.nll_loss over the kept next-token predictions;
    loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean).

    Wrong variants caught: ``(CE_sae - CE_clean) / (CE_zero - CE_clean)`` (the complement), the
    inverted ratio ``(CE_zero - CE_clean) / (CE_zero - CE_sae)`` and a mean-ablation baseline
    instead of the zero ablation."""
    _, res, ref = sae_case
    pairs = (("ce_clean", "ce_clean"), ("ce_sae", "ce_sae"), ("ce_zero_ablation", "ce_zero"))
    for key, want in pairs:
        assert getattr(res, key) == pytest.approx(ref[want], rel=1e-5), key
    rec = (ref["ce_zero"] - ref["ce_sae"]) / (ref["ce_zero"] - ref["ce_clean"])
    assert res.ce_loss_recovered == pytest.approx(rec, rel=1e-4)
    assert res.delta_ce == pytest.approx(ref["ce_sae"] - ref["ce_clean"], rel=1e-4)
    complement = (ref["ce_sae"] - ref["ce_clean"]) / (ref["ce_zero"] - ref["ce_clean"])
    assert abs(complement - rec) > 0.05
    inverted = (ref["ce_zero"] - ref["ce_clean"]) / (ref["ce_zero"] - ref["ce_sae"])
    assert abs(inverted - rec) > 0.05
    assert ref["ce_zero"] - ref["ce_clean"] > 0.2  # the ablation matters in this model


def test_zero_not_mean_ablation_baseline(subject, stream, sae_case) -> None:
    """The ablation replaces the kept activations by zeros, not by their mean."""
    _, res, ref = sae_case
    win = stream[: stream.numel() // T * T].view(-1, T)
    with torch.no_grad():
        _, out, _ = grab(subject.model, HOOK, win)
        keep = ref["keep"].unsqueeze(-1)
        mean = out[keep.expand_as(out)].view(-1, out.shape[-1]).mean(0)
        lg = logits_with(subject.model, HOOK, win, torch.where(keep, mean, out))
        pred = ref["keep"][:, :-1].reshape(-1)
        tgt = win[:, 1:].reshape(-1)[pred]
        ce_mean = float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1])[pred], tgt))
    assert abs(ce_mean - ref["ce_zero"]) > 0.05
    assert res.ce_zero_ablation == pytest.approx(ref["ce_zero"], rel=1e-5)


def test_kl_is_clean_to_spliced(sae_case) -> None:
    """KL(p_clean || p_spliced) summed over the vocabulary, mean over predictions. Wrong variant
    caught: the reversed direction KL(p_spliced || p_clean)."""
    _, res, ref = sae_case
    assert res.kl_sae == pytest.approx(ref["kl_sae"], rel=1e-4)
    assert res.kl_zero_ablation == pytest.approx(ref["kl_zero"], rel=1e-4)
    lp_c, lp_s = ref["lp_clean"], ref["lp_sae"]
    reverse = float((lp_s.exp() * (lp_s - lp_c)).sum(-1).mean())
    forward = float((lp_c.exp() * (lp_c - lp_s)).sum(-1).mean())
    assert forward == pytest.approx(ref["kl_sae"], rel=1e-9)
    assert abs(reverse - forward) > 1e-2 * forward


@pytest.mark.parametrize("batch_size", [1, 5, 100])
def test_batch_size_does_not_change_results(subject, stream, sae_case, batch_size: int) -> None:
    """Every number is a ratio of dataset sums, so the batching cannot matter (per-batch means of
    CE would: the batches hold different numbers of kept positions)."""
    c, res, _ = sae_case
    other = evaluate(subject, c, HOOK, stream, context_len=T, batch_size=batch_size)
    a, b = res.model_dump(), other.model_dump()
    for key, value in a.items():
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert b[key] == value, key


def test_special_tokens_excluded_everywhere(subject, stream, sae_case) -> None:
    """Special positions enter neither activation metrics nor CE/KL, and the splice leaves them
    untouched; with ``exclude_special_tokens=False`` every position counts. Wrong variant caught:
    counting special positions (the two settings give different FVU and CE_sae)."""
    c, res, _ = sae_case
    incl = evaluate(
        subject, c, HOOK, stream, context_len=T, batch_size=4, exclude_special_tokens=False
    )
    ref = reference(subject, c, HOOK, stream, exclude=False)
    assert incl.tokens == incl.positions == ref["n"] > res.tokens
    assert incl.fvu == pytest.approx(ref["fvu"], rel=1e-5)
    assert incl.ce_sae == pytest.approx(ref["ce_sae"], rel=1e-5)
    assert abs(incl.fvu - res.fvu) > 1e-3 and abs(incl.ce_sae - res.ce_sae) > 1e-3


def test_transcoder_reads_input_and_replaces_output(subject, stream) -> None:
    """A transcoder at ``blocks.0.mlp`` encodes the MLP's input (no b_dec subtraction) and its
    prediction replaces the MLP's output. Wrong variant caught: encoding the output (SAE style),
    which gives another FVU."""
    name = "blocks.0.mlp"
    c = make_coder(transcode=True, skip_connection=True)
    with torch.no_grad():
        c.W_skip.normal_(0.0, 0.1)
    res = evaluate(subject, c, name, stream, context_len=T, batch_size=4)
    ref = reference(subject, c, name, stream)
    assert res.transcode is True
    for key, want in (("fvu", "fvu"), ("l0", "l0"), ("ce_sae", "ce_sae"), ("kl_sae", "kl_sae")):
        assert getattr(res, key) == pytest.approx(ref[want], rel=1e-5), key
    with torch.no_grad():
        y = ref["y"]
        z_out = dense_codes(c, y)
        wrong = dense_decode(c, z_out, y)
    wrong_fvu = float((y - wrong).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert abs(wrong_fvu - ref["fvu"]) > 1e-2


def test_result_is_json_and_coder_mode_restored(sae_case, subject, stream) -> None:
    import json

    c, res, _ = sae_case
    doc = json.loads(json.dumps(res.model_dump(mode="json"), allow_nan=False))
    assert doc["hookpoint"] == HOOK and doc["transcode"] is False
    c.train()
    evaluate(subject, c, HOOK, stream[: 2 * T], context_len=T, batch_size=2)
    assert c.training


# -- small formulas -----------------------------------------------------------------------------
def test_ce_loss_recovered_formula() -> None:
    """(zero - sae) / (zero - clean): 0.75 here; the complement would give 0.25 and the inverted
    ratio (zero - clean) / (zero - sae) 4/3; None when the ablation changes nothing."""
    assert ce_loss_recovered(1.0, 1.5, 3.0) == pytest.approx(0.75)
    assert ce_loss_recovered(1.0, 3.0, 3.0) == 0.0
    assert ce_loss_recovered(1.0, 1.0, 3.0) == 1.0
    assert ce_loss_recovered(2.0, 2.5, 2.0) is None


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=30),
    extra=st.integers(0, 5000),
)
def test_density_histogram_bins_log10_frequency(counts: list[int], extra: int) -> None:
    """Each live latent lands in the bin of log10(count / n); never-fired ones are counted apart."""
    n = max(counts) + extra + 1
    h = density_histogram(torch.tensor(counts), n)
    assert h.never_fired == sum(1 for c in counts if c == 0)
    assert sum(h.counts) == sum(1 for c in counts if c > 0)
    assert h.edges[-1] == 0.0 and h.edges[0] <= math.log10(1 / n)
    edges = np.array(h.edges)
    want = np.zeros(len(edges) - 1, dtype=int)
    for c in counts:
        if c:
            v = math.log10(c / n)
            i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(want) - 1)
            want[i] += 1
    assert h.counts == want.tolist()


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_one_line_errors(subject, stream) -> None:
    c = make_coder()
    with pytest.raises(ValueError, match=r"hookpoint: 'blocks.9.nope' matches no module; avail"):
        evaluate(subject, c, "blocks.9.nope", stream, context_len=T, batch_size=2)
    with pytest.raises(ValueError, match=r"matches \d+ modules"):
        evaluate(subject, c, "blocks.*.resid_post", stream, context_len=T, batch_size=2)
    with pytest.raises(ValueError, match=r"has width 16, but the sparse autoencoder's d_in is 8"):
        evaluate(subject, make_coder(8), HOOK, stream, context_len=T, batch_size=2)
    with pytest.raises(ValueError, match=r"context_len must be an integer >= 2 and <= 8"):
        evaluate(subject, c, HOOK, stream, context_len=9, batch_size=2)
    with pytest.raises(ValueError, match=r"transcode=True but the sparse coder"):
        evaluate(subject, c, HOOK, stream, context_len=T, batch_size=2, transcode=True)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate(subject, c, HOOK, stream[:5], context_len=T, batch_size=2)
    with pytest.raises(ValueError, match="every evaluated position is a special token"):
        evaluate(subject, c, HOOK, torch.full((2 * T,), EOS_ID), context_len=T, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate(subject, c, HOOK, stream, context_len=T, batch_size=0)
    with pytest.raises(TypeError, match="integer dtype"):
        token_windows(stream.float(), T)
    assert resolve_hookpoint(subject, "blocks.1.resid_po*") == "blocks.1.resid_post"


def poison(subject: Subject, token_id: int, value: float):
    """Make the embedding output ``value`` at every position holding ``token_id`` (a hook, so
    the tied unembedding stays finite); returns the hook handle."""

    def hook(_m, args, out):
        return torch.where((args[0] == token_id).unsqueeze(-1), value, out)

    return subject.model.embed.register_forward_hook(hook)


def test_non_finite_activations_name_hookpoint_and_window(subject, stream) -> None:
    """A NaN in the subject's forward pass is a one-line error naming the hookpoint and the first
    window holding it (not the coder's anonymous "x must be finite"), raised before any metric;
    non-finite clean logits name their window too."""
    toks = stream.clone()
    toks[toks == 3] = 4
    toks[6 * T + 2] = 3  # only window 6 holds token 3
    h = poison(subject, 3, float("nan"))
    try:
        msg = f"hookpoint {HOOK}: its output holds NaN or inf activations in window 6 "
        with pytest.raises(ValueError, match=msg):
            evaluate(subject, make_coder(), HOOK, toks, context_len=T, batch_size=4)
    finally:
        h.remove()
    box: list[Tensor] = []
    h1 = subject.model.register_forward_pre_hook(lambda _m, args: box.append(args[0]))
    h2 = subject.model.head.register_forward_hook(
        lambda _m, _a, out: torch.where((box[-1] == 3).unsqueeze(-1), float("nan"), out)
    )
    try:
        with pytest.raises(ValueError, match=r"clean logits hold NaN or \+inf in window 6$"):
            evaluate(subject, make_coder(), HOOK, toks, context_len=T, batch_size=4)
    finally:
        h1.remove()
        h2.remove()


@pytest.mark.parametrize("name", ["transformer.h.0", "transformer.h.0.attn"])
def test_hugging_face_modules(name: str) -> None:
    """GPT-2 modules: a block (tensor output) and its attention (a tuple: the first element is
    read and replaced). References: the model's own ``labels=`` loss for CE clean (no special
    tokens excluded) and a hand-written splice for CE spliced."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=T, bos_token_id=39,
        eos_token_id=39,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    subject = Subject("gpt2", model, None, T, (), "hf")
    toks = torch.randint(0, 40, (5 * T,), generator=torch.Generator().manual_seed(2))
    c = make_coder()
    res = evaluate(subject, c, name, toks, context_len=T, batch_size=2)
    win = toks.view(-1, T)

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    with torch.no_grad():
        hf_loss = float(model(input_ids=win, labels=win, use_cache=False).loss)
        box: dict[str, Tensor] = {}
        mod = model.get_submodule(name)
        h = mod.register_forward_hook(lambda _m, _a, o: box.__setitem__("y", first(o)))
        model(input_ids=win, use_cache=False)
        h.remove()
        y = box["y"].reshape(-1, 16)
        y_hat = dense_decode(c, dense_codes(c, y), y).float().view_as(box["y"])

        def swap(_m, _a, o):
            return (y_hat, *o[1:]) if isinstance(o, tuple) else y_hat

        h = mod.register_forward_hook(swap)
        spliced_loss = float(model(input_ids=win, labels=win, use_cache=False).loss)
        h.remove()
    assert res.ce_clean == pytest.approx(hf_loss, rel=1e-5)
    assert res.ce_sae == pytest.approx(spliced_loss, rel=1e-5)
    assert abs(spliced_loss - hf_loss) > 1e-3
    assert res.tokens == res.positions == 5 * T and res.predictions == 5 * (T - 1)


def test_batchtopk_coder_uses_its_inference_threshold(subject, stream) -> None:
    """A BatchTopK coder is evaluated in eval mode: JumpReLU at its learned ``threshold``, so L0
    varies per token (padding zeros are not counted) and matches the dense reference
    ``#{pre > threshold}``; the coder's training mode is restored."""
    torch.manual_seed(5)
    c = SparseCoder(16, SparseCoderConfig(num_latents=48, k=4, activation="batchtopk"))
    with torch.no_grad():
        c.b_dec.normal_(0.0, 0.3)
        c.threshold.fill_(0.35)
    c.train()
    res = evaluate(subject, c, HOOK, stream, context_len=T, batch_size=3)
    ref = reference(subject, c, HOOK, stream)
    with torch.no_grad():
        y = ref["y"]
        pre = torch.relu((y - c.b_dec.double()) @ c.W_enc.double().T + c.b_enc.double())
        z = torch.where(pre > c.threshold.double(), pre, 0.0)
        y_hat = z @ c.W_dec.double() + c.b_dec.double()
    assert res.l0 == pytest.approx(int((z != 0).sum()) / z.shape[0], rel=1e-12)
    assert res.l0 != pytest.approx(c.cfg.k)
    fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert res.fvu == pytest.approx(fvu, rel=1e-5)
    assert c.training and float(c.threshold) == pytest.approx(0.35)  # evaluation left it alone
