"""``sparselens sae eval`` and ``sparselens sae inspect``: evaluate trained sparse coders and
browse their latents.

Both take ``RUN_OR_SAE_DIR``, one of

* a ``sparselens sae train`` run directory (``config.yaml`` + ``final/<hookpoint>/``): every coder
  of the run, or the one named by ``--hookpoint``; subject, corpus, context length, token
  exclusion and validation split come from the run's ``config.yaml``;
* a sparse coder directory (sparsify layout: ``cfg.json`` + ``sae.safetensors``): subject,
  hookpoint, corpus and context length come from its provenance (``cfg.json["provenance"]``),
  and ``--subject`` / ``--hookpoint`` supply what it lacks (a sparsify checkpoint has none);
* a directory of such directories, one per hookpoint (sparsify's ``save_dir`` layout).

Flags override the recorded settings. Tokens are the held-out split (``--split val``) of the
corpus, cut into non-overlapping windows; ``--tokens`` caps the positions used.
``sae eval`` writes ``eval.json``, ``plots/density.png`` and ``report.md`` (default
``<dir>/eval/``; :mod:`sparselens.sae.evaluate` defines the metrics); ``sae inspect`` writes
``latents.json`` and ``index.html`` (default ``<dir>/inspect/<hookpoint>/``;
:mod:`sparselens.sae.inspect`). Every file is complete before the first one is written, each is
written atomically and ``report.md`` last, so an error leaves no partial output. Bad input (a
missing or unreadable checkpoint, a width that does not match the hookpoint, an unknown
hookpoint) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparselens.train.atomic import atomic_write_bytes, atomic_write_text
from sparselens.train.config import load_yaml_mapping

EVAL_FILES = ("eval.json", "plots/density.png", "report.md")
INSPECT_FILES = ("latents.json", "index.html")
_RUN_CONFIG = "config.yaml"
_CODER_FILES = ("cfg.json", "sae.safetensors")


# -- settings -----------------------------------------------------------------------------------
class SAEEvalConfig(BaseModel):
    """Settings of ``sparselens sae eval`` (unset ones come from the run / provenance)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    hookpoint: str | None = Field(
        None,
        min_length=1,
        description="the coder's hookpoint; none: every coder of a run, or the one in cfg.json",
    )
    subject: str | None = Field(
        None,
        min_length=1,
        description="'minigpt', a Mini-GPT or Hugging Face directory; none: the recorded one",
    )
    corpus: str | None = Field(
        None, min_length=1, description="corpus name or .txt file; none: the recorded one"
    )
    split: Literal["val", "train"] = Field("val", description="which split of the corpus")
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="held-out share of the corpus; none: the run's (else 0.05)"
    )
    tokens: int = Field(65_536, ge=0, description="token positions to use (0: the whole split)")
    context_len: int | None = Field(
        None, ge=2, description="tokens per window; none: the recorded one"
    )
    batch_size: int = Field(32, ge=1, le=2**16, description="windows per forward pass")
    exclude_special_tokens: bool = Field(
        True,
        description="leave BOS/EOS/PAD positions out; when not given: as the run recorded it",
    )
    threads: int = Field(2, ge=1, le=1024, description="torch CPU threads")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model and coder run")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")


class SAEInspectConfig(SAEEvalConfig):
    """Settings of ``sparselens sae inspect``."""

    tokens: int = Field(32_768, ge=0, description="token positions to use (0: the whole split)")
    top: int = Field(10, ge=1, le=1000, description="top-activating contexts per latent")
    before: int = Field(12, ge=0, le=4096, description="tokens shown before the peak token")
    after: int = Field(4, ge=0, le=4096, description="tokens shown after the peak token")


# -- what RUN_OR_SAE_DIR holds ------------------------------------------------------------------
@dataclass
class CoderEntry:
    """One coder directory and what was recorded about it (run config, then provenance)."""

    hookpoint: str
    directory: Path
    recorded: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    """The directory given on the command line and its coders, in order."""

    path: Path
    kind: Literal["run", "coder", "coders"]
    coders: list[CoderEntry]


def _is_coder_dir(p: Path) -> bool:
    return (p / _CODER_FILES[0]).is_file()


def _provenance(directory: Path) -> dict[str, Any]:
    from sparselens.sae.checkpoint import read_provenance

    return dict(read_provenance(directory) or {})


def _select(target: Target, hookpoint: str | None) -> Target:
    if hookpoint is None or target.kind == "coder":
        return target
    names = [c.hookpoint for c in target.coders]
    if hookpoint not in names:
        raise ValueError(
            f"{target.path} has no coder for hookpoint {hookpoint!r}; it has: {', '.join(names)}"
        )
    return Target(target.path, target.kind, [c for c in target.coders if c.hookpoint == hookpoint])


def resolve_target(path: str | os.PathLike[str], hookpoint: str | None = None) -> Target:
    """Classify ``path`` (module docstring) and list its coders, narrowed to ``hookpoint``.

    Raises a one-line FileNotFoundError / ValueError for a missing path, a run without
    ``final/`` coders, a coder directory without a recorded hookpoint when none is given, or a
    directory that holds no coder.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such run or sparse coder directory")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected a run or a sparse coder directory)")
    if (root / _RUN_CONFIG).is_file() and not _is_coder_dir(root):
        run_cfg = load_yaml_mapping(root / _RUN_CONFIG)
        final = root / "final"
        subdirs = sorted(p for p in final.iterdir() if _is_coder_dir(p)) if final.is_dir() else []
        if not subdirs:
            raise ValueError(
                f"{root}: the run has no coders in final/ (still running, interrupted or "
                "failed? finish it with `sparselens sae train --resume --out DIR`)"
            )
        order = [str(h) for h in run_cfg.get("hookpoints") or []]
        subdirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
        coders = [CoderEntry(p.name, p, {**run_cfg, **_provenance(p)}) for p in subdirs]
        return _select(Target(root, "run", coders), hookpoint)
    if _is_coder_dir(root):
        prov = _provenance(root)
        name = hookpoint or prov.get("hookpoint")
        if not name:
            raise ValueError(
                f"{root}/cfg.json records no hookpoint (no provenance): pass --hookpoint NAME"
            )
        return Target(root, "coder", [CoderEntry(str(name), root, prov)])
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _is_coder_dir(p))
    if subdirs:
        coders = [CoderEntry(p.name, p, _provenance(p)) for p in subdirs]
        return _select(Target(root, "coders", coders), hookpoint)
    raise ValueError(
        f"{root} is neither a `sparselens sae train` run directory (config.yaml + final/) nor a "
        "sparse coder directory (cfg.json + sae.safetensors) nor a directory of them"
    )


# -- running ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A coder ready to run: loaded subject, coder and tokens, and the settings used."""

    entry: CoderEntry
    subject: Any
    coder: Any
    tokens: torch.Tensor
    context_len: int
    exclude_special_tokens: bool
    corpus: str


def _pick(flag: Any, recorded: dict[str, Any], key: str, default: Any = None) -> Any:
    if flag is not None:
        return flag
    value = recorded.get(key)
    return default if value is None else value


def prepare(
    target: Target, config: SAEEvalConfig, subjects: dict[str, Any] | None = None
) -> list[Prepared]:
    """Load each coder of ``target`` with its subject and tokens (subjects shared by name).

    Raises one-line errors naming the coder directory for unreadable checkpoints, a missing
    subject, transcoder/SAE mismatches and context lengths the subject cannot take.
    """
    from sparselens.sae.checkpoint import load_sparse_coder
    from sparselens.sae.data import load_tokens, resolve_corpus
    from sparselens.sae.subject import load_subject

    subjects = {} if subjects is None else subjects
    token_memo: dict[tuple[str, str, float], torch.Tensor] = {}
    out: list[Prepared] = []
    device = torch.device(config.device)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
    for entry in target.coders:
        rec, where = entry.recorded, entry.directory
        coder = load_sparse_coder(where, device=device)
        recorded_tc = rec.get("transcode")
        if recorded_tc is not None and bool(recorded_tc) != coder.cfg.transcode:
            raise ValueError(
                f"{where}: recorded transcode={bool(recorded_tc)} but cfg.json has "
                f"transcode={coder.cfg.transcode}"
            )
        spec = _pick(config.subject, rec, "subject")
        if not spec:
            raise ValueError(f"{where}: no subject recorded; pass --subject (e.g. minigpt or DIR)")
        spec = str(spec)
        if spec not in subjects:
            subjects[spec] = load_subject(spec)
            subjects[spec].model.to(device)
        subject = subjects[spec]
        corpus = resolve_corpus(subject, str(_pick(config.corpus, rec, "corpus", "default")))
        vf = float(_pick(config.val_fraction, rec, "val_fraction", 0.05))
        t = int(_pick(config.context_len, rec, "context_len", subject.context_len))
        if not 2 <= t <= subject.context_len:
            raise ValueError(
                f"context_len must be >= 2 and <= the subject's context length "
                f"{subject.context_len}, got {t}"
            )
        given = "exclude_special_tokens" in config.model_fields_set
        flag = config.exclude_special_tokens if given else None
        exclude = bool(_pick(flag, rec, "exclude_special_tokens", True))
        key = (corpus, config.split, vf)
        if key not in token_memo:
            token_memo[key] = load_tokens(subject, corpus, split=config.split, val_fraction=vf)
        tokens = token_memo[key]
        if config.tokens:
            tokens = tokens[: config.tokens]
        if tokens.numel() < t:
            raise ValueError(
                f"the {config.split} split of {corpus} gives {tokens.numel()} tokens, fewer than "
                f"one window of context_len {t}; raise --tokens or val_fraction"
            )
        out.append(Prepared(entry, subject, coder, tokens, t, exclude, corpus))
    return out


def _in_dir(where: Path, e: ValueError) -> ValueError:
    return ValueError(f"{where}: {e}")


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_eval(
    target: Target, config: SAEEvalConfig, out: Path | None = None, *, command: list[str] | None
) -> dict[str, Any]:
    """Evaluate every coder of ``target`` and write ``eval.json``, ``plots/density.png`` and
    ``report.md`` into ``out`` (default ``<target>/eval``); return the ``eval.json`` document."""
    from sparselens.sae.evaluate import evaluate

    out = Path(out) if out is not None else target.path / "eval"
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    with _threads(config.threads):
        for p in prepare(target, config):
            try:
                res = evaluate(
                    p.subject,
                    p.coder,
                    p.entry.hookpoint,
                    p.tokens,
                    context_len=p.context_len,
                    batch_size=config.batch_size,
                    exclude_special_tokens=p.exclude_special_tokens,
                    progress=config.progress,
                )
            except ValueError as e:
                raise _in_dir(p.entry.directory, e) from None
            results[p.entry.hookpoint] = res.model_dump(mode="json")
            settings[p.entry.hookpoint] = {
                "coder_dir": str(p.entry.directory.resolve()),
                "subject": p.subject.name,
                "corpus": p.corpus,
            }
    first = next(iter(settings.values()))
    doc = {
        "target": str(target.path.resolve()),
        "target_kind": target.kind,
        "subject": first["subject"],
        "corpus": first["corpus"],
        "split": config.split,
        "tokens_limit": config.tokens,
        "command": command,
        "coders": settings,
        "hookpoints": results,
    }
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    png = _density_png(results)
    report = eval_report(doc)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / EVAL_FILES[1], png)
    atomic_write_text(out / EVAL_FILES[0], text)
    atomic_write_text(out / EVAL_FILES[2], report)
    doc["out"] = str(out.resolve())
    return doc


def _density_png(results: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    from sparselens.sae.evaluate import DENSE_THRESHOLD

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for name, r in results.items():
        h = r["density_histogram"]
        ax.stairs(h["counts"], h["edges"], lw=1.5, label=f"{name} ({h['never_fired']} never fired)")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="grey", ls="--", lw=1, label="dense (10 %)")
    ax.set(xlabel="log10 firing frequency on the evaluated tokens", ylabel="latents")
    ax.set_title("latent firing density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def eval_report(doc: dict[str, Any]) -> str:
    """``report.md`` of an ``eval.json`` document: setup, one table row per hookpoint, the
    definitions and the density plot."""
    lines = [
        "# Sparse coder evaluation",
        "",
        f"Evaluated `{doc['target']}` ({doc['target_kind']}) on subject `{doc['subject']}`, "
        f"{doc['split']} split of corpus `{doc['corpus']}`.",
        "",
        "| hookpoint | tokens | FVU | EV | L0 | dead | dense | CE clean | CE spliced "
        "| CE zero-abl. | CE recovered | ΔCE | KL | shrinkage | cosine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["hookpoints"].items():
        kind = " (transcoder)" if r["transcode"] else ""
        lines.append(
            f"| `{name}`{kind} | {r['tokens']:,} | {r['fvu']:.4f} | {r['explained_variance']:.4f} "
            f"| {r['l0']:.2f} | {100 * r['dead_fraction']:.1f} % "
            f"| {100 * r['dense_fraction']:.1f} % | {r['ce_clean']:.4f} | {r['ce_sae']:.4f} "
            f"| {r['ce_zero_ablation']:.4f} | {_f(r['ce_loss_recovered'], '.3f')} "
            f"| {r['delta_ce']:+.4f} | {r['kl_sae']:.4f} | {r['shrinkage']:.3f} "
            f"| {r['cosine']:.3f} |"
        )
    lines += [
        "",
        "FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over all evaluated tokens (ȳ their mean; float64, streamed); "
        "EV = 1 − FVU. L0: non-zero latents per token. Dead: latents that never fired "
        "(activation > fire_threshold) on these tokens (a shorter window than training's "
        "dead_tokens, so usually more); dense: firing on > 10 % of them. CE "
        "(nats/token): next-token cross-entropy of the clean model, with the coder's output "
        "spliced in at the hookpoint, and with the hookpoint zero-ablated; CE recovered = "
        "(CE zero − CE spliced) / (CE zero − CE clean); ΔCE = CE spliced − CE clean; KL = "
        "KL(p_clean ‖ p_spliced) per position (nats); shrinkage = mean ‖ŷ‖/‖y‖; cosine = "
        "mean cos(y, ŷ). Special tokens are excluded unless the run kept them.",
        "",
        "![latent firing density](plots/density.png)",
        "",
    ]
    return "\n".join(lines)


def run_inspect(
    target: Target, config: SAEInspectConfig, out: Path | None = None
) -> dict[str, Any]:
    """Top contexts of every latent of the one coder of ``target``: ``latents.json`` and
    ``index.html`` in ``out`` (default ``<target>/inspect/<hookpoint>``)."""
    from sparselens.sae.inspect import inspect_latents, inspection_json, render_html

    if len(target.coders) != 1:
        names = ", ".join(c.hookpoint for c in target.coders)
        raise ValueError(f"{target.path} holds several coders ({names}); choose one: --hookpoint")
    with _threads(config.threads):
        (p,) = prepare(target, config)
        try:
            insp = inspect_latents(
                p.subject,
                p.coder,
                p.entry.hookpoint,
                p.tokens,
                context_len=p.context_len,
                batch_size=config.batch_size,
                n_top=config.top,
                before=config.before,
                after=config.after,
                exclude_special_tokens=p.exclude_special_tokens,
                progress=config.progress,
            )
        except ValueError as e:
            raise _in_dir(p.entry.directory, e) from None
    if out is None:
        out = target.path / "inspect"
        if target.kind != "coder":
            out = out / p.entry.hookpoint
    text = inspection_json(insp) + "\n"
    page = render_html(insp)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INSPECT_FILES[0], text)
    atomic_write_text(out / INSPECT_FILES[1], page)
    return {
        "out": str(out.resolve()),
        "hookpoint": insp.hookpoint,
        "latents": len(insp.latents),
        "never_fired": len(insp.never_fired),
        "tokens": insp.tokens,
        "subject": insp.subject,
    }


# -- command line -------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, model: type[BaseModel], default_out: str) -> None:
    from sparselens.cli import add_config_options

    p.add_argument("target", metavar="RUN_OR_SAE_DIR", help="run directory or coder directory")
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: {default_out})")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    group = p.add_argument_group("settings (also accepted as keys of the --config YAML file)")
    add_config_options(group, model)


def register_eval_commands(sub: Any) -> None:
    """Add ``eval`` and ``inspect`` to the ``sparselens sae`` subcommand group ``sub``."""
    p = sub.add_parser(
        "eval",
        help="FVU, L0, dead/dense latents, CE loss recovered and KL of trained coders",
        description=(
            "Evaluate the sparse coders of a `sae train` run (or one coder directory) on held-out "
            "tokens: FVU / explained variance (dataset-level, float64), L0, dead and dense "
            "fractions, firing-density histogram, next-token cross-entropy clean / with the "
            "coder spliced in / zero-ablated, CE loss recovered, ΔCE, KL(clean ‖ spliced), "
            "shrinkage and cosine."
        ),
        epilog=(
            "Writes eval.json, plots/density.png and report.md to --out. Exit status: 0 done, "
            "2 bad input (nothing written)."
        ),
        allow_abbrev=False,
    )
    _add_common(p, SAEEvalConfig, "RUN_OR_SAE_DIR/eval")
    p.set_defaults(handler=_run_eval_command)
    p = sub.add_parser(
        "inspect",
        help="top-activating contexts per latent: latents.json and a browsable index.html",
        description=(
            "Stream held-out tokens through the subject and one coder, keep each latent's "
            "top-activating tokens, and write them with their contexts (per-token activation "
            "shading, peak token outlined) as JSON and a self-contained HTML page."
        ),
        epilog=(
            "Writes latents.json and index.html to --out. Exit status: 0 done, 2 bad input "
            "(nothing written)."
        ),
        allow_abbrev=False,
    )
    _add_common(p, SAEInspectConfig, "RUN_OR_SAE_DIR/inspect[/HOOKPOINT]")
    p.set_defaults(handler=_run_inspect_command)


def _config(model: type[BaseModel], args: argparse.Namespace) -> Any:
    from sparselens.cli import config_from_args

    return config_from_args(model, args)


def _run_eval_command(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.cli import PROG

    config = _config(SAEEvalConfig, args)
    target = resolve_target(args.target, config.hookpoint)
    doc = run_eval(target, config, Path(args.out) if args.out else None, command=[PROG, *argv])
    if not args.quiet:
        lines = [f"{PROG} sae eval: {doc['out']}"]
        for name, r in doc["hookpoints"].items():
            lines.append(
                f"  {name}: FVU {r['fvu']:.4f}, L0 {r['l0']:.1f}, dead "
                f"{100 * r['dead_fraction']:.1f} %, dense {100 * r['dense_fraction']:.1f} %, "
                f"CE recovered {_f(r['ce_loss_recovered'], '.3f')}, KL {r['kl_sae']:.4f} "
                f"({r['tokens']:,} tokens)"
            )
        lines.append(f"  report: {Path(doc['out']) / EVAL_FILES[2]}")
        print("\n".join(lines))
    return 0


def _run_inspect_command(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.cli import PROG

    config = _config(SAEInspectConfig, args)
    target = resolve_target(args.target, config.hookpoint)
    s = run_inspect(target, config, Path(args.out) if args.out else None)
    if not args.quiet:
        print(
            f"{PROG} sae inspect: {s['out']}\n"
            f"  {s['hookpoint']}: {s['latents']} latents fired on {s['tokens']:,} tokens, "
            f"{s['never_fired']} never fired\n"
            f"  page: {Path(s['out']) / INSPECT_FILES[1]}"
        )
    return 0


__all__ = [
    "SAEEvalConfig",
    "SAEInspectConfig",
    "Target",
    "eval_report",
    "prepare",
    "register_eval_commands",
    "resolve_target",
    "run_eval",
    "run_inspect",
]
