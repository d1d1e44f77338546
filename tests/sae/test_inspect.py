"""``sparselens.sae.inspect``: the streaming top-n against a brute-force dense reference, the
contexts and shading of a tiny Mini-GPT against dense TopK codes, and the HTML page (escaping,
self-contained)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sparselens.lm import CharTokenizer, MiniGPT, MiniGPTConfig
from sparselens.lm.tokenizers import BOS_ID, EOS_ID, PAD_ID
from sparselens.sae import SparseCoder, SparseCoderConfig
from sparselens.sae.inspect import (
    Inspection,
    LatentContext,
    LatentReport,
    TopN,
    inspect_latents,
    inspection_json,
    render_html,
)
from sparselens.sae.subject import Subject

T = 8
HOOK = "blocks.0.resid_post"


def tiny_subject(tokenizer=None) -> Subject:
    tok = tokenizer or CharTokenizer.train("abcdefgh ")
    cfg = MiniGPTConfig(
        vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=2, d_ff=32, context_len=T
    )
    torch.manual_seed(0)
    model = MiniGPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.4)
    for p in model.parameters():
        p.requires_grad_(False)
    return Subject("tiny", model, tok, T, (PAD_ID, EOS_ID, BOS_ID), "minigpt")


def stream(n_windows: int = 12, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 13, (n_windows * T,), generator=g)
    ids[4::T] = EOS_ID
    ids[0] = BOS_ID
    return ids


def make_coder(**kw) -> SparseCoder:
    torch.manual_seed(3)
    c = SparseCoder(16, SparseCoderConfig(num_latents=40, k=4, **kw))
    with torch.no_grad():
        c.encoder.bias.normal_(0.0, 0.1)
        c.b_dec.normal_(0.0, 0.3)
    return c


def dense_reference(subject: Subject, c: SparseCoder, tokens: Tensor):
    """Dense (positions, M) activations (0 at special tokens) with plain hooks."""
    win = tokens[: tokens.numel() // T * T].view(-1, T)
    box = {}
    h = subject.model.get_submodule(HOOK).register_forward_hook(
        lambda _m, _a, o: box.__setitem__("y", o)
    )
    try:
        with torch.no_grad():
            subject.model(win)
    finally:
        h.remove()
    x = box["y"].reshape(-1, 16).double()
    with torch.no_grad():
        pre = torch.relu((x - c.b_dec.double()) @ c.W_enc.double().T + c.b_enc.double())
        vals, idx = pre.topk(c.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    keep = ~torch.isin(win.reshape(-1), torch.tensor(subject.special_token_ids))
    z[~keep] = 0.0
    return z, keep


def brute_top(entries: list[tuple[float, int, int]], m: int, n: int) -> list[list[tuple]]:
    """Per latent: entries (value, latent, position) sorted by (-value, position), first n."""
    out: list[list[tuple]] = [[] for _ in range(m)]
    for v, lat, p in entries:
        out[lat].append((v, p))
    return [sorted(e, key=lambda t: (-t[0], t[1]))[:n] for e in out]


# -- streaming top-n ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 4),
    k=st.integers(1, 3),
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5),
    data=st.data(),
)
def test_topn_matches_brute_force(m: int, n: int, k: int, sizes: list[int], data) -> None:
    """The streamed table equals sorting every entry ever offered by (value desc, position asc)
    per latent. Values come from a small set, so ties are frequent. Wrong variants caught: the
    top-n of the last batch only (no merge), and keeping the LATEST of tied activations."""
    k = min(k, m)
    top = TopN(m, n)
    entries: list[tuple[float, int, int]] = []
    pos0 = 0
    for size in sizes:
        lat = torch.stack([torch.randperm(m)[:k] for _ in range(size)]) if size else None
        if lat is None:
            lat = torch.zeros(0, k, dtype=torch.long)
        vals = data.draw(
            st.lists(
                st.sampled_from([0.5, 1.0, 2.0, float("-inf")]),
                min_size=size * k,
                max_size=size * k,
            )
        )
        v = torch.tensor(vals, dtype=torch.float32).reshape(size, k)
        pos = torch.arange(pos0, pos0 + size) * 3  # increasing, not contiguous
        top.update(v, lat, pos)
        for i in range(size):
            for j in range(k):
                if vals[i * k + j] != float("-inf"):
                    entries.append((vals[i * k + j], int(lat[i, j]), int(pos[i])))
        pos0 += size
    want = brute_top(entries, m, n)
    for latent in range(m):
        got = [
            (float(v), int(p))
            for v, p in zip(top.values[latent], top.positions[latent], strict=True)
            if p >= 0
        ]
        assert got == want[latent], latent


def test_topn_rejects_mismatched_shapes() -> None:
    top = TopN(4, 2)
    with pytest.raises(ValueError, match=r"values and latents must be \(N, k\)"):
        top.update(torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        TopN(4, 0)


# -- contexts on a model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subject() -> Subject:
    return tiny_subject()


@pytest.fixture(scope="module")
def case(subject):
    c = make_coder()
    toks = stream()
    insp = inspect_latents(
        subject, c, HOOK, toks, context_len=T, batch_size=5, n_top=3, before=3, after=2
    )
    return c, toks, insp, dense_reference(subject, c, toks)


def test_top_contexts_match_dense_reference(case) -> None:
    """Each latent's contexts are its n largest activations over the kept tokens, the peak is the
    chosen token and density = fire count / kept tokens. Wrong variant caught: density over all
    positions (special tokens included), which is smaller here."""
    c, toks, insp, (z, keep) = case
    n_kept = int(keep.sum())
    fired = (z > c.cfg.fire_threshold).sum(0)
    assert insp.tokens == n_kept and insp.never_fired == [
        i for i in range(c.num_latents) if fired[i] == 0
    ]
    assert [r.latent for r in insp.latents] == [i for i in range(c.num_latents) if fired[i] > 0]
    assert len(insp.latents) >= 10
    for rep in insp.latents:
        col = z[:, rep.latent]
        live = [(float(col[p]), p) for p in range(col.numel()) if col[p] > c.cfg.fire_threshold]
        full = sorted(live, key=lambda t: (-t[0], t[1]))
        want = full[:3]
        got = [(ctx.activation, ctx.position) for ctx in rep.contexts]
        assert [a for a, _ in got] == pytest.approx([a for a, _ in want], rel=1e-5)
        assert len({p for _, p in got}) == len(got)
        for r, (a, p) in enumerate(got):  # positions agree unless a float32-rounding tie
            assert float(col[p]) == pytest.approx(a, rel=1e-5)
            near = [full[j][0] for j in (r - 1, r + 1) if 0 <= j < len(full)]
            assert p == full[r][1] or any(abs(x - full[r][0]) < 1e-5 for x in near)
        assert rep.fire_count == int(fired[rep.latent])
        assert rep.density == pytest.approx(int(fired[rep.latent]) / n_kept, rel=1e-12)
        assert rep.density != pytest.approx(int(fired[rep.latent]) / toks.numel(), rel=1e-6)
        for ctx in rep.contexts:
            assert ctx.activation == pytest.approx(float(col[ctx.position]), rel=1e-5)
            assert ctx.window * T + ctx.offset == ctx.position
            assert ctx.acts[ctx.peak] == pytest.approx(ctx.activation, rel=1e-5)


def test_context_slices_and_shading(case, subject) -> None:
    """A context shows ``before`` tokens before and ``after`` after the peak, clipped to its
    window; each token's shading value is the latent's dense activation there (0 at special
    tokens); the token texts are the tokenizer's (specials by name)."""
    _, toks, insp, (z, _) = case
    tok = subject.tokenizer
    for rep in insp.latents:
        for ctx in rep.contexts:
            lo, hi = max(0, ctx.offset - 3), min(T, ctx.offset + 3)
            assert ctx.peak == ctx.offset - lo
            rows = range(ctx.window * T + lo, ctx.window * T + hi)
            assert ctx.token_ids == toks[list(rows)].tolist()
            assert ctx.tokens == [tok.id_to_token(i) for i in ctx.token_ids]
            want = [float(z[r, rep.latent]) for r in rows]
            assert ctx.acts == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert any("<eos>" in ctx.tokens for rep in insp.latents for ctx in rep.contexts)
    # a special token never becomes a peak
    assert all(
        ctx.tokens[ctx.peak] not in ("<eos>", "<bos>", "<pad>")
        for rep in insp.latents
        for ctx in rep.contexts
    )


def test_batch_size_and_json_round_trip(case, subject) -> None:
    """The result does not depend on the batch size; ``latents.json`` is strict JSON that
    validates back into the same inspection."""
    c, toks, insp, _ = case
    other = inspect_latents(
        subject, c, HOOK, toks, context_len=T, batch_size=1, n_top=3, before=3, after=2
    )
    assert [[x.position for x in r.contexts] for r in other.latents] == [
        [x.position for x in r.contexts] for r in insp.latents
    ]
    doc = json.loads(inspection_json(insp))
    assert Inspection.model_validate(doc) == insp
    assert doc["latents"][0]["contexts"][0].keys() >= {"activation", "tokens", "position"}


def test_include_special_tokens(subject) -> None:
    """With ``exclude_special_tokens=False`` every position counts, so specials can peak."""
    c = make_coder()
    insp = inspect_latents(
        subject, c, HOOK, stream(), context_len=T, batch_size=4, exclude_special_tokens=False
    )
    assert insp.tokens == 12 * T


# -- HTML -------------------------------------------------------------------------------------
class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[override]
        self.tags.append((tag, dict(attrs)))


def _one_latent(tokens: list[str], acts: list[float], peak: int) -> Inspection:
    ctx = LatentContext(
        activation=acts[peak],
        position=peak,
        window=0,
        offset=peak,
        peak=peak,
        tokens=tokens,
        token_ids=list(range(len(tokens))),
        acts=acts,
    )
    rep = LatentReport(latent=7, density=0.25, fire_count=2, contexts=[ctx])
    return Inspection(
        hookpoint="h<1>",
        transcode=False,
        subject="s&t",
        num_latents=8,
        k=1,
        fire_threshold=1e-3,
        context_len=8,
        sequences=1,
        tokens=8,
        n_top=1,
        before=3,
        after=1,
        exclude_special_tokens=True,
        latents=[rep],
        never_fired=[0, 1],
    )


def test_html_escapes_every_text() -> None:
    """A ``<script>`` token is shown as text, never run: the only script element is the page's
    own search code; quotes, ampersands and line breaks are escaped or replaced."""
    evil = "<script>alert('x')</script>"
    page = render_html(_one_latent(["a", evil, '"q"&', "\n"], [0.0, 2.0, 1.0, 0.5], 1))
    assert evil not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script") == 1
    assert "&quot;q&quot;&amp;" in page and "\u21b5" in page
    assert "h&lt;1&gt;" in page and "s&amp;t" in page


def test_html_structure_shading_and_no_external_assets() -> None:
    """One section per latent; the peak token is outlined; shading alpha = activation / top
    activation of the latent; nothing is loaded from elsewhere."""
    page = render_html(_one_latent(["x", "y", "z"], [0.5, 2.0, 0.0], 1))
    p = _Collect()
    p.feed(page)
    sections = [a for t, a in p.tags if t == "section"]
    assert [s["data-id"] for s in sections] == ["7"]
    spans = [a for t, a in p.tags if t == "span" and "t" in a.get("class", "").split()]
    assert [s["class"] for s in spans] == ["t", "t max", "t"]
    alphas = [
        float(re.search(r"rgba\(255,110,0,([0-9.]+)\)", s["style"]).group(1)) if "style" in s else 0
        for s in spans
    ]
    assert alphas == pytest.approx([0.25, 1.0, 0.0])
    assert [s.get("title") for s in spans] == ["0.5", "2", None]
    assert not re.search(r"(src|href)\s*=", page)
    assert "<!DOCTYPE html>" in page and page.rstrip().endswith("</html>")


def test_end_to_end_page_escapes_model_tokens() -> None:
    """Token texts come from the subject's tokenizer and are escaped in the page."""

    class Angle(CharTokenizer):
        def id_to_token(self, i: int) -> str:
            return "<script>" if int(i) >= 4 else super().id_to_token(i)

    subject = tiny_subject(Angle(sorted("abcdefgh ")))
    insp = inspect_latents(subject, make_coder(), HOOK, stream(4), context_len=T, batch_size=4)
    assert insp.latents and insp.latents[0].contexts[0].tokens.count("<script>") >= 1
    page = render_html(insp)
    assert page.count("<script") == 1 and "&lt;script&gt;" in page


def test_bad_arguments(subject) -> None:
    c = make_coder()
    for kw, msg in (
        ({"n_top": 0}, "n_top must be an integer >= 1"),
        ({"before": -1}, "before must be an integer >= 0"),
        ({"context_len": 9}, r"context_len must be an integer >= 1 and <= 8"),
    ):
        args = {"context_len": T, "batch_size": 2, **kw}
        with pytest.raises(ValueError, match=msg):
            inspect_latents(subject, c, HOOK, stream(), **args)
    with pytest.raises(ValueError, match="every evaluated position is a special token"):
        inspect_latents(subject, c, HOOK, torch.full((T,), PAD_ID), context_len=T, batch_size=1)
    with pytest.raises(ValueError, match="d_in is 16"):
        inspect_latents(subject, c, "blocks.0.mlp.fc_in", stream(), context_len=T, batch_size=2)


def test_non_finite_activations_name_hookpoint_and_window() -> None:
    """NaN activations: one line naming the hookpoint and the window (window 5 of 12)."""
    subject = tiny_subject()  # its embedding is poisoned below
    toks = stream()
    toks[toks == 12] = 11
    toks[5 * T + 1] = 12
    with torch.no_grad():
        subject.model.embed.weight[12] = float("inf")
    with pytest.raises(ValueError, match=f"hookpoint {HOOK}: its output holds NaN or inf .* 5 "):
        inspect_latents(subject, make_coder(), HOOK, toks, context_len=T, batch_size=4)


def test_transcoder_contexts_come_from_module_input(subject) -> None:
    """A transcoder at ``blocks.0.mlp`` is encoded from the MLP's input (no b_dec subtraction):
    the peaks are the dense transcoder codes' (wrong variant caught: encoding the output)."""
    torch.manual_seed(4)
    c = SparseCoder(16, SparseCoderConfig(num_latents=24, k=3, transcode=True))
    toks = stream(6)
    insp = inspect_latents(subject, c, "blocks.0.mlp", toks, context_len=T, batch_size=4, n_top=2)
    win = toks.view(-1, T)
    box = {}
    mod = subject.model.get_submodule("blocks.0.mlp")
    h = mod.register_forward_pre_hook(lambda _m, a: box.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            subject.model(win)
    finally:
        h.remove()
    with torch.no_grad():
        x = box["x"].reshape(-1, 16).double()
        pre = torch.relu(x @ c.W_enc.double().T + c.b_enc.double())
        vals, idx = pre.topk(3, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
    z[torch.isin(win.reshape(-1), torch.tensor(subject.special_token_ids))] = 0
    assert insp.transcode is True and insp.latents
    for rep in insp.latents:
        want = z[:, rep.latent].topk(len(rep.contexts)).values.tolist()
        assert [ctx.activation for ctx in rep.contexts] == pytest.approx(want, rel=1e-5)
