"""Summary, checkpoint provenance, plots and ``report.md`` of a ``sparselens sae train`` run."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sparselens.train.rundir import RunDir, save_figure

if TYPE_CHECKING:
    from sparselens.sae.subject import Subject
    from sparselens.sae.train_config import SAETrainConfig
    from sparselens.sae.trainer import HookpointState

PLOTS = ("fvu_auxk.png", "dead_fraction.png", "firing_density.png")


def summarise(
    config: SAETrainConfig,
    subject: Subject,
    states: list[HookpointState],
    evals: dict[str, dict[str, Any]],
    run: RunDir,
    train_seconds: float,
    t_start: float,
) -> dict[str, Any]:
    """``summary.json``: per hookpoint the held-out FVU, L0, dead / dense fractions, tokens seen
    and wall time, plus the run's setup."""
    hooks: dict[str, Any] = {}
    last = {}
    for r in run.read_metrics():
        if r.get("phase") == "train":
            last[r["hookpoint"]] = r
    for h in states:
        ev = evals[h.name]
        c = h.coder
        hooks[h.name] = {
            "fvu": ev["fvu"],
            "l0": ev["l0"],
            "dead_fraction": float(h.tracker.fraction_dead()),
            "dense_fraction": ev["dense_fraction"],
            "never_fired_on_val_fraction": ev["never_fired_fraction"],
            "tokens_seen": int(h.tracker.tokens_seen),
            "wall_seconds": train_seconds,
            "sae_seconds": h.sae_seconds,
            "val_tokens": ev["val_tokens"],
            "train_fvu_last": last.get(h.name, {}).get("fvu"),
            "train_auxk_last": last.get(h.name, {}).get("auxk"),
            "d_in": c.d_in,
            "num_latents": c.num_latents,
            "k": c.cfg.k,
            "k_aux": c.k_aux,
            "lr": h.lr,
            "final_dir": str(run.path / "final" / h.name),
        }
    return {
        "run_dir": str(run.path),
        "subject": subject.name,
        "subject_kind": subject.kind,
        "corpus": config.corpus,
        "source": "cache" if config.cache else "live",
        "transcode": config.transcode,
        "steps": config.steps,
        "tokens_per_step": config.tokens_per_step,
        "context_len": config.context_len,
        "auxk_alpha": config.sae.auxk_alpha,
        "dead_tokens": config.sae.dead_tokens,
        "hookpoints": hooks,
        "train_seconds": train_seconds,
        "seconds_total": time.perf_counter() - t_start,
    }


def provenance(
    config: SAETrainConfig, subject: Subject, h: HookpointState, result: dict[str, Any]
) -> dict[str, Any]:
    """What ``final/<hookpoint>/cfg.json`` records about where the coder comes from."""
    return {
        "made_by": "sparselens sae train",
        "subject": subject.name,
        "subject_kind": subject.kind,
        "hookpoint": h.name,
        "transcode": config.transcode,
        "corpus": config.corpus,
        "cache": config.cache,
        "context_len": config.context_len,
        "tokens_seen": result["tokens_seen"],
        "steps": config.steps,
        "seed": config.seed,
        "exclude_special_tokens": config.exclude_special_tokens,
        "special_token_ids": list(subject.special_token_ids)
        if config.exclude_special_tokens
        else [],
        "normalisation": "none",
        "val_fvu": result["fvu"],
        "val_l0": result["l0"],
    }


def plots(
    folder: Path,
    metrics: list[dict[str, Any]],
    states: list[HookpointState],
    evals: dict[str, dict[str, Any]],
) -> None:
    """FVU and AuxK loss curves, dead fraction over tokens, and the held-out firing-density
    histogram (log10 frequency; latents that never fired on the validation tokens counted
    beside it)."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    train = [r for r in metrics if r.get("phase") == "train"]
    fig = Figure(figsize=(11, 4.2))
    ax_f, ax_a = fig.subplots(1, 2)
    for h in states:
        rs = [r for r in train if r["hookpoint"] == h.name]
        toks = [r["tokens"] for r in rs]
        ax_f.plot(toks, [r["fvu"] for r in rs], lw=1.2, label=h.name)
        ax_a.plot(toks, [r["auxk"] for r in rs], lw=1.2, label=h.name)
    ax_f.set(xlabel="tokens", ylabel="FVU (train, mean per log interval)", yscale="log")
    ax_f.set_title("fraction of variance unexplained")
    ax_a.set(xlabel="tokens", ylabel="AuxK loss (Var(e)-normalised)")
    ax_a.set_title("AuxK loss (0 while off or no latent is dead)")
    for ax in (ax_f, ax_a):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(fig, folder / PLOTS[0])

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for h in states:
        rs = [r for r in train if r["hookpoint"] == h.name]
        ax.plot([r["tokens"] for r in rs], [r["dead_fraction"] for r in rs], lw=1.2, label=h.name)
    dead_tokens = states[0].coder.cfg.dead_tokens
    ax.set(xlabel="tokens", ylabel="dead fraction", ylim=(-0.02, 1.02))
    ax.set_title(f"latents that did not fire in the last {dead_tokens:,} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, folder / PLOTS[1])

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for h in states:
        freq = evals[h.name]["firing_frequency"]
        live = freq[freq > 0]
        never = int((freq == 0).sum())
        if live.numel():
            ax.hist(
                torch.log10(live).numpy(),
                bins=40,
                histtype="step",
                lw=1.5,
                label=f"{h.name} ({never} never fired)",
            )
    ax.axvline(math.log10(0.1), color="grey", ls="--", lw=1, label="dense (10%)")
    ax.set(xlabel="log10 firing frequency on validation tokens", ylabel="latents")
    ax.set_title("latent firing density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, folder / PLOTS[2])


def report(config: SAETrainConfig, s: dict[str, Any]) -> str:
    """``report.md``: setup, the per-hookpoint results table and the plots."""
    kind = "transcoders" if config.transcode else "sparse autoencoders"
    c = config.sae
    lines = [
        f"# TopK {kind}: training run",
        "",
        f"Run directory: `{s['run_dir']}`; coders in `final/<hookpoint>/` (sparsify layout: "
        "cfg.json + sae.safetensors, with provenance).",
        "",
        "## Setup",
        "",
        f"- subject `{s['subject']}` ({s['subject_kind']}), corpus `{s['corpus']}`, "
        f"{'cached activations' if s['source'] == 'cache' else 'activations computed live'}",
        f"- {c.activation} k = {c.k}, expansion {c.expansion_factor}"
        + (f" / {c.num_latents} latents" if c.num_latents else "")
        + f", AuxK alpha {c.auxk_alpha:g} (dead after {c.dead_tokens:,} tokens), multi-TopK "
        f"{'on' if c.multi_topk else 'off'}",
        f"- Adam, {s['steps']} steps of {config.batch_size} x {config.context_len} positions "
        f"({config.micro_batches} micro-batch(es)), warm-up {config.warmup_steps} steps, "
        f"{config.lr_decay} decay; special tokens "
        f"{'excluded' if config.exclude_special_tokens else 'kept'}; seed {config.seed}",
        "",
        "## Results (held-out validation tokens)",
        "",
        "| hookpoint | latents | lr | FVU | L0 | dead | dense (>10%) | tokens seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, h in s["hookpoints"].items():
        lines.append(
            f"| `{name}` | {h['num_latents']} | {h['lr']:.3g} | {h['fvu']:.4f} | "
            f"{h['l0']:.2f} | {100 * h['dead_fraction']:.1f} % | "
            f"{100 * h['dense_fraction']:.1f} % | {h['tokens_seen']:,} |"
        )
    lines += [
        "",
        "FVU is the dataset-level ratio sum ||y - yhat||^2 / sum ||y - mean(y)||^2 (float64). "
        "Dead: no activation above the fire threshold in the last `dead_tokens` training tokens.",
        "",
        f"Training time {s['train_seconds']:.1f} s (session total {s['seconds_total']:.1f} s).",
        "",
        *[f"![{p}](plots/{p})" for p in PLOTS],
        "",
    ]
    return "\n".join(lines)


__all__ = ["PLOTS", "plots", "provenance", "report", "summarise"]
