"""``sparselens sae ...``: train sparse autoencoders / transcoders and cache activations.

Every :class:`~sparselens.sae.train_config.SAETrainConfig` field is a flag (``--batch-size``);
``--hookpoints`` takes one or more patterns, and the nested sparse-coder settings are
``--sae.<field>`` (``--sae.k 8``, ``--sae.auxk-alpha 0``, ``--sae.multi-topk``). A YAML file given
with ``--config`` supplies the same fields (``sae:`` as a mapping); flags win over the file, and
``--resume --out DIR`` continues a run with its saved settings. ``sparselens sae train`` with no
arguments trains on the bundled Mini-GPT and its corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sparselens.cli import (
    PROG,
    _add_run_options,
    _default_out,
    _metavar,
    run_dir_and_saved_settings,
)

SAE_PREFIX = "sae."
_KEEP_NAMES = {"subject": ("minigpt",), "cache": ()}


def register(subparsers: Any) -> None:
    """Add the ``sae`` group: ``train``, ``cache``, ``eval``, ``inspect``."""
    from sparselens.sae.eval_cli import register_eval_commands

    sae = subparsers.add_parser(
        "sae",
        help="TopK sparse autoencoders and transcoders: train, cache, eval, inspect",
        description="TopK sparse autoencoder and transcoder commands.",
        allow_abbrev=False,
    )
    sub = sae.add_subparsers(dest="sae_command", metavar="SAE_COMMAND", required=True)
    _register_train(sub)
    _register_cache(sub)
    register_eval_commands(sub)


# -- flags --------------------------------------------------------------------------------------
def _add_fields(
    group: argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """``--<prefix><field-name>`` for the fields of ``model`` (as :func:`sparselens.cli.
    add_config_options`, with a prefix for nested settings); absent flags stay absent."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = f"--{prefix}{name.replace('_', '-')}"
        default = (defaults or {}).get(name, field.default)
        shown = "none" if default is None else default
        if field.default_factory is not None:
            shown = "see description"
        help_text = f"{field.description or ''} (default: {shown})".strip()
        kw: dict[str, Any] = {
            "dest": prefix + name,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(flag, metavar=_metavar(field.annotation), **kw)


def _settings(
    model: type[BaseModel],
    args: argparse.Namespace,
    base: dict[str, Any] | None,
) -> Any:
    """``model`` from the saved config (resume), the YAML file, then the flags. Paths in the
    YAML file (subject, corpus, cache) are relative to the file; names stay names."""
    from sparselens.lm.corpora import CORPUS_NAMES
    from sparselens.train.config import load_yaml_mapping

    keep = {**_KEEP_NAMES, "corpus": ("default", *CORPUS_NAMES)}
    settings: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None) is not None:
        cfg_path = Path(args.config)
        file_settings = load_yaml_mapping(cfg_path)
        for key, names in keep.items():
            value = file_settings.get(key)
            if isinstance(value, str) and value and value not in names:
                p = Path(value).expanduser()
                file_settings[key] = str(p if p.is_absolute() else cfg_path.parent / p)
        if "sae" in file_settings and isinstance(settings.get("sae"), dict):
            file_settings["sae"] = {**settings["sae"], **(file_settings["sae"] or {})}
        settings.update(file_settings)
    given = vars(args)
    for name in model.model_fields:
        if name in given:
            settings[name] = given[name]
    nested = {k[len(SAE_PREFIX) :]: v for k, v in given.items() if k.startswith(SAE_PREFIX)}
    if nested:
        current = settings.get("sae")
        settings["sae"] = {**(current if isinstance(current, dict) else {}), **nested}
    return model.model_validate(settings)


# -- train --------------------------------------------------------------------------------------
def _register_train(sub: Any) -> None:
    from sparselens.sae.config import SparseCoderConfig
    from sparselens.sae.train_config import DEMO_CODER, SAETrainConfig

    p = sub.add_parser(
        "train",
        help="train TopK SAEs / transcoders on a language model's activations",
        description=(
            "Train one TopK sparse autoencoder (or transcoder) per hookpoint with Adam, AuxK "
            "(Gao et al. 2024) and dead-latent tracking, on activations of the bundled Mini-GPT "
            "(default), a Mini-GPT checkpoint or a local Hugging Face causal LM (--subject DIR), "
            "computed live or read from a cache (--cache DIR). Runs under torchrun for data "
            "parallelism."
        ),
        epilog=(
            "Writes to --out: config.yaml, manifest.json, metrics.jsonl and checkpoints/ while "
            "running; final/<hookpoint>/ (cfg.json + sae.safetensors, sparsify's layout), "
            "summary.json, plots/*.png and report.md once complete. Exit status: 0 done, 2 bad "
            "input, 130/143 interrupted (continue exactly with --resume --out DIR)."
        ),
        allow_abbrev=False,
    )
    _add_run_options(p, "sae-train")
    group = p.add_argument_group("settings (also accepted as keys of the --config YAML file)")
    group.add_argument(
        "--hookpoints",
        nargs="+",
        metavar="PATTERN",
        default=argparse.SUPPRESS,
        help="module-name patterns (fnmatch), e.g. 'blocks.*.resid_post' "
        "(default: blocks.0.resid_post)",
    )
    _add_fields(group, SAETrainConfig, skip=("hookpoints", "sae"))
    coder = p.add_argument_group("sparse coder (--sae.<field>; YAML: a 'sae:' mapping)")
    _add_fields(
        coder, SparseCoderConfig, prefix=SAE_PREFIX, skip=("transcode",), defaults=DEMO_CODER
    )
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.sae.train_config import SAETrainConfig
    from sparselens.sae.trainer import train_sae

    out, base = run_dir_and_saved_settings(args, "sae-train")
    config = _settings(SAETrainConfig, args, base)
    s = train_sae(config, out, resume=args.resume, command=[PROG, *argv])
    if s and not args.quiet:
        lines = [
            f"{PROG} sae train: {s['run_dir']}",
            f"  subject {s['subject']}, corpus {s['corpus']}; {s['steps']} steps x "
            f"{s['tokens_per_step']} positions in {s['train_seconds']:.1f} s",
        ]
        for name, h in s["hookpoints"].items():
            lines.append(
                f"  {name}: FVU {h['fvu']:.4f}, L0 {h['l0']:.1f}, dead "
                f"{100 * h['dead_fraction']:.1f} %, dense {100 * h['dense_fraction']:.1f} % "
                f"({h['num_latents']} latents, k {h['k']}, {h['tokens_seen']:,} tokens)"
            )
        lines.append(f"  coders: {Path(s['run_dir']) / 'final'}")
        lines.append(f"  report: {Path(s['run_dir']) / 'report.md'}")
        print("\n".join(lines))
    return 0


# -- cache --------------------------------------------------------------------------------------
def _register_cache(sub: Any) -> None:
    from sparselens.sae.cache import SAECacheConfig

    p = sub.add_parser(
        "cache",
        help="write a model's activations to disk for `sae train --cache DIR`",
        description=(
            "Run the subject over the train split of the corpus and store the activations of "
            "the hookpoints (inputs too with --transcode), special tokens dropped, in "
            "safetensors shards with an index.json of their provenance."
        ),
        epilog=(
            "Writes to --out: shards/shard-NNNNN.safetensors, then index.json (last), with "
            "config.yaml and manifest.json. A directory without index.json is incomplete."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    p.add_argument("--out", metavar="DIR", help="cache directory (default: runs/sae-cache-<time>)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    group = p.add_argument_group("settings (also accepted as keys of the --config YAML file)")
    group.add_argument(
        "--hookpoints",
        nargs="+",
        metavar="PATTERN",
        default=argparse.SUPPRESS,
        help="module-name patterns (fnmatch) (default: blocks.0.resid_post)",
    )
    _add_fields(group, SAECacheConfig, skip=("hookpoints",))
    p.set_defaults(handler=_run_cache)


def _run_cache(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.sae.cache import SAECacheConfig, write_cache

    config = _settings(SAECacheConfig, args, None)
    out = Path(args.out) if args.out else _default_out("sae-cache")
    index = write_cache(config, out, command=[PROG, *argv])
    if not args.quiet:
        print(
            f"{PROG} sae cache: {out.resolve()}\n"
            f"  {index['rows']:,} rows of {len(index['hookpoints'])} hookpoint(s) "
            f"({', '.join(index['hookpoints'])}) in {len(index['shards'])} shard(s), "
            f"{index['dtype']}; subject {index['subject']}, corpus {index['corpus']}"
        )
    return 0


__all__ = ["register"]
