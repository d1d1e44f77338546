"""Top-activating contexts per latent of a sparse coder, as JSON and a static HTML page.

:func:`inspect_latents` makes two passes over non-overlapping windows of a token stream:

1. Streaming top-n (:class:`TopN`): every batch's sparse codes ``(values, indices)`` (N, k) are
   merged into a running ``(num_latents, n)`` table of the largest activations and their token
   positions, touching only the latents that fired in the batch; the dense N x M activation
   matrix is never formed. Order: activation descending, then position ascending (ties keep the
   earliest occurrence). A latent fires on a token when its activation exceeds the coder's
   ``fire_threshold``; its density is the share of evaluated tokens it fired on.
2. Only the windows holding a selected context are run again, to read the latent's activation on
   every token around the peak (the shading of the page).

Special tokens (BOS/EOS/PAD) are excluded by default: they never become a peak and their
activations are shown as 0 (they stay visible as context). Contexts never cross a window
boundary (an activation depends on the window it was computed in).

:func:`render_html` writes one self-contained page (inline CSS and a few lines of inline
JavaScript for the search box; no external assets). Every text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from sparselens.core.checks import check_int
from sparselens.sae.evaluate import (
    batches,
    coder_mode,
    read_hookpoint,
    resolve_hookpoint,
    token_windows,
)
from sparselens.sae.sparse_coder import SparseCoder
from sparselens.sae.subject import Subject


class TopN:
    """Running top-``n`` activations (and their positions) per latent, from sparse codes.

    ``values`` (M, n) float64, ``-inf`` in unused slots; ``positions`` (M, n) int64, -1 there.
    Each row is sorted by value descending, ties by position ascending.
    """

    def __init__(self, num_latents: int, n: int, device: torch.device | str = "cpu") -> None:
        self.num_latents = check_int("num_latents", num_latents, ge=1)
        self.n = check_int("n", n, ge=1)
        self.values = torch.full((num_latents, n), -torch.inf, dtype=torch.float64, device=device)
        self.positions = torch.full((num_latents, n), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, values: Tensor, latents: Tensor, positions: Tensor) -> None:
        """Offer entries: ``values``/``latents`` (N, k) and the tokens' ``positions`` (N,).

        Positions must be larger than those of earlier updates for the tie order to hold (they
        are when tokens are streamed in order). Only finite values are considered.
        """
        if (
            values.shape != latents.shape
            or values.dim() != 2
            or positions.shape != values.shape[:1]
        ):
            raise ValueError(
                f"values and latents must be (N, k) and positions (N,), got "
                f"{tuple(values.shape)}, {tuple(latents.shape)} and {tuple(positions.shape)}"
            )
        dev = self.values.device
        v = values.detach().reshape(-1).to(dev, torch.float64)
        lat = latents.reshape(-1).to(dev, torch.int64)
        pos = positions.to(dev, torch.int64).unsqueeze(1).expand(values.shape).reshape(-1)
        ok = torch.isfinite(v) & (v > self.values[lat, -1])  # could enter its latent's table
        v, lat, pos = v[ok], lat[ok], pos[ok]
        if v.numel() == 0:
            return
        touched, group = torch.unique(lat, return_inverse=True)
        n = self.n
        g = torch.cat([torch.arange(touched.numel(), device=dev).repeat_interleave(n), group])
        cv = torch.cat([self.values[touched].reshape(-1), v])
        cp = torch.cat([self.positions[touched].reshape(-1), pos])
        # lexicographic (group asc, value desc, position asc) from three stable sorts
        order = torch.sort(cp, stable=True).indices
        order = order[torch.sort(cv[order], descending=True, stable=True).indices]
        order = order[torch.sort(g[order], stable=True).indices]
        g, cv, cp = g[order], cv[order], cp[order]
        counts = torch.bincount(g, minlength=touched.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(g.numel(), device=dev) - starts[g]
        sel = rank < n  # every group holds >= n entries (its old table), so all slots refill
        self.values[touched[g[sel]], rank[sel]] = cv[sel]
        self.positions[touched[g[sel]], rank[sel]] = cp[sel]


class LatentContext(BaseModel):
    """One top-activating token of a latent and the tokens around it.

    ``position``: index of the peak token in the evaluated token stream (``window * context_len
    + offset``); ``tokens``/``token_ids``/``acts``: the shown slice of that window with the
    latent's activation on each token; ``peak``: index of the peak token within the slice.
    """

    model_config = ConfigDict(extra="forbid")

    activation: float
    position: int
    window: int
    offset: int
    peak: int
    tokens: list[str]
    token_ids: list[int]
    acts: list[float]


class LatentReport(BaseModel):
    """A latent's firing density and its top contexts (largest activation first)."""

    model_config = ConfigDict(extra="forbid")

    latent: int
    density: float
    fire_count: int
    contexts: list[LatentContext]


class Inspection(BaseModel):
    """The whole inspection: the setup, one :class:`LatentReport` per latent that fired, and
    the ids of the latents that never fired. ``model_dump(mode="json")`` is ``latents.json``."""

    model_config = ConfigDict(extra="forbid")

    hookpoint: str
    transcode: bool
    subject: str
    num_latents: int
    k: int
    fire_threshold: float
    context_len: int
    sequences: int
    tokens: int
    n_top: int
    before: int
    after: int
    exclude_special_tokens: bool
    latents: list[LatentReport]
    never_fired: list[int]


def _token_text(tokenizer: Any, token_id: int, memo: dict[int, str]) -> str:
    """Readable text of one id (``id_to_token`` when the tokenizer has it: specials by name)."""
    if token_id not in memo:
        f = getattr(tokenizer, "id_to_token", None)
        memo[token_id] = str(f(token_id)) if callable(f) else str(tokenizer.decode([token_id]))
    return memo[token_id]


@torch.no_grad()
def inspect_latents(
    subject: Subject,
    coder: SparseCoder,
    hookpoint: str,
    tokens: Tensor,
    *,
    context_len: int,
    batch_size: int,
    n_top: int = 10,
    before: int = 12,
    after: int = 4,
    transcode: bool | None = None,
    exclude_special_tokens: bool = True,
    progress: bool = False,
) -> Inspection:
    """Top ``n_top`` contexts of every latent of ``coder`` at ``hookpoint`` (module docstring).

    ``tokens``: a 1-D stream cut into ``context_len`` windows (or 2-D windows), run
    ``batch_size`` windows at a time; each context shows ``before`` tokens before the peak and
    ``after`` after it (within its window). Raises one-line ValueErrors as
    :func:`~sparselens.sae.evaluate.evaluate` does.
    """
    from sparselens.train.progress import progress_bar

    name = resolve_hookpoint(subject, hookpoint)
    tc = coder_mode(coder, transcode)
    t = check_int("context_len", context_len, ge=1, le=subject.context_len)
    n = check_int("n_top", n_top, ge=1, le=10_000)
    b_ctx = check_int("before", before, ge=0)
    a_ctx = check_int("after", after, ge=0)
    check_int("batch_size", batch_size, ge=1)
    windows = token_windows(tokens, t)
    specials = tuple(subject.special_token_ids) if exclude_special_tokens else ()
    thr = float(coder.cfg.fire_threshold)
    top = TopN(coder.num_latents, n, coder.device)
    fire = torch.zeros(coder.num_latents, dtype=torch.int64, device=coder.device)
    kept = torch.zeros((), dtype=torch.int64)
    was_training = coder.training
    coder.eval()
    bar = progress_bar(windows.shape[0], f"sae inspect {name}", enabled=progress)
    try:
        start = 0
        for batch in batches(windows, batch_size):
            hb = read_hookpoint(
                subject,
                coder,
                name,
                batch,
                transcode=tc,
                specials=specials,
                with_logits=False,
                first_window=start // t,
            )
            if hb.x.shape[0]:
                enc = coder.encode(hb.x.to(coder.device, coder.dtype))
                acts = torch.where(enc.top_acts > thr, enc.top_acts, -torch.inf)
                pos = start + hb.keep.reshape(-1).nonzero().squeeze(1)
                top.update(acts, enc.top_indices, pos)
                fired = (enc.top_acts > thr).reshape(-1).to(torch.int64)
                fire.index_add_(0, enc.top_indices.reshape(-1), fired)
                kept += hb.x.shape[0]
            start += batch.numel()
            bar.update(batch.shape[0])
        n_kept = int(kept)
        if n_kept == 0:
            raise ValueError("every evaluated position is a special token; nothing to inspect")
        shading = _shading(subject, coder, name, windows, top, tc, specials, batch_size)
    finally:
        bar.close()
        coder.train(was_training)

    memo: dict[int, str] = {}
    values, positions = top.values.cpu(), top.positions.cpu()
    fire_l = fire.cpu().tolist()
    reports: list[LatentReport] = []
    for lat in range(coder.num_latents):
        if fire_l[lat] == 0:
            continue
        contexts = []
        for r in range(n):
            v = float(values[lat, r])
            if v == -float("inf"):
                break
            p = int(positions[lat, r])
            w, off = divmod(p, t)
            lo, hi = max(0, off - b_ctx), min(t, off + a_ctx + 1)
            ids = windows[w, lo:hi].tolist()
            contexts.append(
                LatentContext(
                    activation=v,
                    position=p,
                    window=w,
                    offset=off,
                    peak=off - lo,
                    tokens=[_token_text(subject.tokenizer, i, memo) for i in ids],
                    token_ids=ids,
                    acts=shading[(lat, r)][lo:hi],
                )
            )
        reports.append(
            LatentReport(
                latent=lat, density=fire_l[lat] / n_kept, fire_count=fire_l[lat], contexts=contexts
            )
        )
    return Inspection(
        hookpoint=name,
        transcode=tc,
        subject=subject.name,
        num_latents=coder.num_latents,
        k=coder.cfg.k,
        fire_threshold=thr,
        context_len=t,
        sequences=int(windows.shape[0]),
        tokens=n_kept,
        n_top=n,
        before=b_ctx,
        after=a_ctx,
        exclude_special_tokens=bool(exclude_special_tokens),
        latents=reports,
        never_fired=[i for i, c in enumerate(fire_l) if c == 0],
    )


def _shading(
    subject: Subject,
    coder: SparseCoder,
    name: str,
    windows: Tensor,
    top: TopN,
    transcode: bool,
    specials: tuple[int, ...],
    batch_size: int,
) -> dict[tuple[int, int], list[float]]:
    """Per selected (latent, rank): the latent's activation on every token of the peak's window
    (0 on special tokens), from a second pass over those windows only."""
    t = windows.shape[1]
    lat, rank = (top.positions >= 0).nonzero(as_tuple=True)
    if lat.numel() == 0:
        return {}
    win = top.positions[lat, rank] // t
    needed, where = torch.unique(win, return_inverse=True)
    out: dict[tuple[int, int], list[float]] = {}
    ar = torch.arange(t, device=coder.device)
    for lo in range(0, needed.numel(), batch_size):
        chunk = needed[lo : lo + batch_size].cpu()
        hb = read_hookpoint(
            subject,
            coder,
            name,
            windows[chunk],
            transcode=transcode,
            specials=specials,
            with_logits=False,
        )
        rows = chunk.numel() * t
        acts = torch.zeros(rows, coder.cfg.k, dtype=torch.float64, device=coder.device)
        idx = torch.full((rows, coder.cfg.k), -1, dtype=torch.int64, device=coder.device)
        keep = hb.keep.reshape(-1).to(coder.device)
        if hb.x.shape[0]:
            enc = coder.encode(hb.x.to(coder.device, coder.dtype))
            k = enc.top_acts.shape[1]  # BatchTopK rows may be narrower or wider than k
            if k != acts.shape[1]:
                acts = torch.zeros(rows, k, dtype=torch.float64, device=coder.device)
                idx = torch.full((rows, k), -1, dtype=torch.int64, device=coder.device)
            acts[keep] = enc.top_acts.double()
            idx[keep] = enc.top_indices
        sel = ((where >= lo) & (where < lo + chunk.numel())).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        r_idx = ((where[sel] - lo) * t).unsqueeze(1) + ar  # (C, T) rows of each context
        l_sel = lat[sel].to(coder.device)
        a = (acts[r_idx] * (idx[r_idx] == l_sel[:, None, None])).sum(-1)  # (C, T)
        for (li, ri), row in zip(
            zip(lat[sel].tolist(), rank[sel].tolist(), strict=True), a.cpu().tolist(), strict=True
        ):
            out[(li, ri)] = row
    return out


# -- outputs ------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h1{font-size:1.3em}header p{margin:.2em 0;color:#555}
#q{width:24em;padding:.3em;margin:.6em 0}
section{border-top:1px solid #ddd;padding:.4em 0}
h2{font-size:1em;margin:.3em 0}h2 small{font-weight:normal;color:#666}
.ctx{font-family:ui-monospace,monospace;white-space:pre;margin:.15em 0;overflow-x:auto}
.ctx .a{display:inline-block;width:5.5em;color:#666;text-align:right;margin-right:.8em}
.t{border-radius:2px}.t.max{outline:2px solid #c02;font-weight:bold}
"""

_JS = """
const q=document.getElementById('q');
q.addEventListener('input',()=>{const s=q.value.trim().toLowerCase();
for(const e of document.querySelectorAll('section.latent')){
const hit=!s||e.dataset.id===s.replace(/^#/,'')||e.textContent.toLowerCase().includes(s);
e.style.display=hit?'':'none';}});
"""


def _shown(text: str) -> str:
    """Visible stand-ins for line breaks and tabs, then HTML-escaped."""
    return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u21e5"), quote=True)


def render_html(insp: Inspection, title: str | None = None) -> str:
    """A self-contained HTML page of ``insp``: per latent its density and top contexts, each
    token shaded by the latent's activation relative to the latent's largest one (unshaded where
    it is 0), the peak token outlined; a search box filters latents by id or text."""
    esc = html.escape
    title = title or f"latents of {insp.hookpoint}"
    head = (
        f"{insp.num_latents} latents, k {insp.k}, {'transcoder' if insp.transcode else 'SAE'} "
        f"at {insp.hookpoint} of {insp.subject}; {insp.tokens:,} tokens in {insp.sequences:,} "
        f"windows of {insp.context_len}; {len(insp.never_fired)} latents never fired "
        f"(activation > {insp.fire_threshold:g})"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1><p>{esc(head)}</p>",
        "<p>Shading: the latent's activation on each token relative to its top activation; the "
        "outlined token is the one the context was chosen for. Hover a token for its value.</p>",
        '<input id="q" type="search" placeholder="filter: latent id (#12) or text"></header>',
    ]
    for rep in insp.latents:
        peak = max((c.activation for c in rep.contexts), default=0.0) or 1.0
        parts.append(
            f'<section class="latent" data-id="{rep.latent}"><h2>latent {rep.latent} '
            f"<small>density {rep.density:.3g} ({rep.fire_count:,} tokens)</small></h2>"
        )
        for c in rep.contexts:
            spans = []
            for i, (tok, a) in enumerate(zip(c.tokens, c.acts, strict=True)):
                cls = "t max" if i == c.peak else "t"
                if a > 0:
                    alpha = min(a / peak, 1.0)
                    style = f' title="{a:.4g}" style="background:rgba(255,110,0,{alpha:.3f})"'
                else:
                    style = ""  # most tokens: keep the page small
                spans.append(f'<span class="{cls}"{style}>{_shown(tok)}</span>')
            parts.append(
                f'<div class="ctx"><span class="a">{c.activation:.4g}</span>{"".join(spans)}</div>'
            )
        parts.append("</section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def inspection_json(insp: Inspection) -> str:
    """``latents.json``: the inspection as strict JSON."""
    doc = insp.model_dump(mode="json")
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


__all__ = [
    "Inspection",
    "LatentContext",
    "LatentReport",
    "TopN",
    "inspect_latents",
    "inspection_json",
    "render_html",
]
