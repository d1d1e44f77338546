"""``sparselens spd run <name|file.yaml>``: one SPD run from a bundled config or a YAML file.

The config is a bundled name (``tms_5-2``, ``tms_5-2_id``, ``tms_40-10``, ``tms_40-10_id``,
``resid_mlp1/2/3``, ``resid_mlp3_reference``, ``minigpt_mlp``) or a YAML file of
:class:`~sparselens.spd.config.SPDRunConfig` settings. Every scalar setting is also a flag
(``--steps``, ``--batch-size``, ``--seed``, ...; ``--lr`` sets the peak learning rate, keeping the
schedule's shape), and ``--set KEY=VALUE`` (repeatable) sets any nested setting, the value read as
YAML (``--set losses.importance_minimality.coeff=1e-3``). Flags win over ``--set``, which wins
over the file. ``--resume --out DIR`` continues a run with its saved settings.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sparselens.cli import PROG, UsageError, _default_out, _metavar, run_dir_and_saved_settings

_SCALARS = (int, float, str, bool)


def _is_scalar(annotation: Any) -> bool:
    if annotation in _SCALARS:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return all(_is_scalar(a) for a in args)
    return False


def scalar_fields() -> list[str]:
    """The :class:`SPDRunConfig` fields that are flags (numbers, strings, booleans, choices)."""
    from sparselens.spd.config import SPDRunConfig

    return [n for n, f in SPDRunConfig.model_fields.items() if _is_scalar(f.annotation)]


def register(subparsers: Any) -> None:
    """Add the ``spd`` group with its ``run`` command."""
    spd = subparsers.add_parser(
        "spd",
        help="stochastic parameter decomposition: decompose a model's weights into rank-1 parts",
        description="Stochastic Parameter Decomposition (Bushnaq et al. 2025) commands.",
        allow_abbrev=False,
    )
    sub = spd.add_subparsers(dest="spd_command", metavar="SPD_COMMAND", required=True)
    _register_run(sub)
    _register_eval(sub)


def _register_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint (metrics, plots, report), also while it runs",
        description=(
            "The final evaluation of an SPD run at one of its checkpoints (the latest by "
            "default): one-hot CI errors, MMCS/ML2R, CI-L0, reconstruction under masks, plots "
            "and report.md, written to --out (default RUN_DIR/eval/step-<N>). The run directory "
            "is only read and the run's thread count is used, so a run still training goes on."
        ),
        allow_abbrev=False,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (`spd run --out`)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/eval/step-N)")
    p.add_argument(
        "--threads", type=int, default=None, metavar="INT", help="intra-op threads (the run's)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.spd.run import evaluate_checkpoint

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    s = evaluate_checkpoint(args.run_dir, step=args.step, out=args.out, threads=args.threads)
    if not args.quiet:
        print("\n".join(summary_lines(s)))
    return 0


def _register_run(sub: Any) -> None:
    from sparselens.spd.config import CONFIG_NAMES, SPDRunConfig

    p = sub.add_parser(
        "run",
        help="decompose a toy model or the bundled Mini-GPT (bundled config or YAML file)",
        description=(
            "Run SPD: learn rank-1 subcomponents of the chosen weight matrices and "
            "causal-importance functions, then evaluate (MMCS/ML2R, one-hot CI errors, CI-L0, "
            "reconstruction under masks; CE/KL for the Mini-GPT). CONFIG is a bundled config ("
            + ", ".join(CONFIG_NAMES)
            + ") or a YAML file."
        ),
        epilog=(
            "Writes to --out: config.yaml, manifest.json, metrics.jsonl, checkpoints/ while "
            "running; final/model.safetensors, plots/*.png, summary.json and report.md once "
            "complete. Exit status: 0 done, 2 bad input, 130/143 interrupted (continue exactly "
            "with --resume --out DIR)."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="bundled config name or YAML file (not needed with --resume)",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/spd-<name>-<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a (nested) setting, VALUE read as YAML, e.g. losses.faithfulness=1.0",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    group = p.add_argument_group("settings (also accepted as keys of the YAML file)")
    for name in scalar_fields():
        field = SPDRunConfig.model_fields[name]
        flag = f"--{name.replace('_', '-')}"
        default = field.default if not field.is_required() else "from CONFIG"
        help_text = f"{field.description or ''} (default: {default})".strip()
        if field.annotation is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=_metavar(field.annotation),
                help=help_text,
            )
    group.add_argument(
        "--lr",
        dest="lr_peak",
        default=argparse.SUPPRESS,
        metavar="X",
        help="peak learning rate (the schedule's start; its shape and end fraction are kept)",
    )
    p.set_defaults(handler=_run)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set needs KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: value {value!r} is not valid YAML") from None
    return key, parsed


def settings_from_args(args: argparse.Namespace, base: dict[str, Any] | None) -> Any:
    """:class:`SPDRunConfig` from the saved config (resume) or CONFIG, ``--set``, then flags."""
    from sparselens.spd.config import SPDRunConfig, bundled_config_path, set_path
    from sparselens.train.config import load_yaml_mapping

    if base is not None:
        settings = dict(base)
        if args.config is not None:
            raise UsageError("--resume uses the run's saved config.yaml; do not give CONFIG")
    else:
        if args.config is None:
            raise UsageError("CONFIG is required: a bundled config name or a YAML file")
        path = Path(args.config)
        if not path.is_file():
            if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
                raise UsageError(f"config file {path}: no such file")
            path = bundled_config_path(args.config)
        settings = load_yaml_mapping(path)
    for text in args.overrides:
        key, value = _parse_override(text)
        set_path(settings, key, value)
    for name in scalar_fields():
        if name in vars(args):
            settings[name] = getattr(args, name)
    if "lr_peak" in vars(args):
        lr = settings.get(
            "lr", SPDRunConfig.model_fields["lr"].get_default(call_default_factory=True)
        )
        lr = lr.model_dump() if hasattr(lr, "model_dump") else lr
        if isinstance(lr, int | float):
            lr = {"kind": "constant", "start": lr}
        if not isinstance(lr, dict) or "start" not in lr:
            raise UsageError("--lr: the config's lr must be a number or a schedule")
        try:
            peak = float(args.lr_peak)
        except ValueError:
            raise UsageError(f"lr must be a finite number > 0, got {args.lr_peak}") from None
        old = float(lr["start"])
        end = lr.get("end")
        lr = {**lr, "start": peak}
        if end is not None and old != 0:
            lr["end"] = float(end) * peak / old
        settings["lr"] = lr
    return SPDRunConfig.model_validate(settings)


def _default_name(args: argparse.Namespace) -> str:
    stem = Path(args.config).stem if args.config else "run"
    return f"spd-{stem}"


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.spd.run import run_spd

    if args.resume:
        out, base = run_dir_and_saved_settings(args, "spd")
    else:
        out, base = (Path(args.out) if args.out else _default_out(_default_name(args))), None
    config = settings_from_args(args, base)
    s = run_spd(config, out, resume=args.resume, command=[PROG, *argv])
    if not args.quiet:
        print("\n".join(summary_lines(s)))
    return 0


def _num(x: Any) -> str:
    """A saved number to 3 decimals; NaN (saved as the string "nan") as it is."""
    return f"{x:.3f}" if isinstance(x, float | int) else str(x)


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The lines ``sparselens spd run`` and ``spd eval`` print."""
    ckpt = s.get("checkpoint_step")
    steps = f"{s['steps']} steps" if ckpt is None else f"step {ckpt} of {s['steps']}"
    lines = [
        f"{PROG} spd run: {s['run_dir']}" if ckpt is None else f"{PROG} spd eval: {s['run_dir']}",
        f"  target {s['target']}, {steps} of batch {s['batch_size']}: "
        f"{s['train_seconds']:.1f} s training ({s['step_ms']:.2f} ms/step), "
        f"{s['wall_seconds']:.1f} s in all",
    ]
    if "mmcs" in s:
        lines.append(f"  MMCS {s['mmcs']:.5f}, ML2R {s['ml2r']:.4f} ({s['layers'][0]})")
    active = s.get("one_hot_active")
    per_layer = ", ".join(
        f"{n} {s['ci_l0'][n]:.3f} ({s['non_negligible'][n]}"
        + (f" / {active[n]})" if active else ")")
        for n in s["layers"]
    )
    what = "non-negligible / active on one-hot inputs" if active else "non-negligible"
    lines.append(f"  CI-L0 per layer (subcomponents {what}): {per_layer}")
    if "identity_ci_error" in s:
        errs = {**s["identity_ci_error"], **s["dense_ci_error"]}
        clean = s.get("one_hot_clean", {})  # absent in summaries from before it
        detail = ", ".join(
            f"{k} {v}" + (f" ({clean[k]} clean)" if k in clean else "") for k, v in errs.items()
        )
        lines.append(f"  one-hot CI error (tol 0.1): {detail}; total {s['ci_error_total']}")
    contrib = s.get("neuron_contributions")
    if contrib:
        detail = ", ".join(f"{k} {_num(v['slope'])} / {_num(v['r2'])}" for k, v in contrib.items())
        lines.append(f"  neuron contributions vs the target (slope / R² about y = x): {detail}")
    rec = ", ".join(f"{k} {v:.3g}" for k, v in s["recon"].items())
    lines.append(f"  recon: {rec}")
    if "lm" in s:
        lm = s["lm"]
        lines.append(
            f"  CE target {lm['ce_target']:.4f}, with CI masks {lm['ce']['ci']:.4f} "
            f"(KL {lm['kl']['ci']:.4f}, CE unrecovered {lm['ce_unrecovered']['ci']:.4f})"
        )
    report = Path(s.get("eval_dir", s["run_dir"])) / "report.md"
    lines.append(f"  report: {report}")
    return lines


__all__ = ["register", "scalar_fields", "settings_from_args", "summary_lines"]
