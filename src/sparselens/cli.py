"""The ``sparselens`` command: one subcommand group per capability.

``calibrate`` and ``lm`` (``lm train``, ``lm sweep``) exist so far; a capability adds itself by
writing a ``register(subparsers)`` function (which may add a nested group, e.g. ``sparselens lm
train``) and listing it in :data:`COMMANDS`. Every config field becomes a ``--flag``
(``lambda_l0`` → ``--lambda-l0``), a YAML file given with ``--config`` supplies the same fields,
and flags win over the file.

Bad input exits with status 2 and one line on stderr, ``sparselens: error: <message>``;
an interrupt (Ctrl-C, SIGTERM) exits with 130 / 143 and leaves no partial outputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from sparselens import __version__

PROG = "sparselens"
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line or input problem: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- config fields as flags ---------------------------------------------------------------------
def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return "|".join(_metavar(a).strip("{}") for a in args)
    return {int: "INT", float: "X", Path: "PATH", str: "TEXT"}.get(annotation, "VALUE")


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    aliases: dict[str, Sequence[str]] | None = None,
) -> None:
    """Add ``--field-name`` for every field of ``model``; values stay strings for pydantic to
    validate (so messages name the field); absent flags do not appear in the namespace."""
    aliases = aliases or {}
    for name, field in model.model_fields.items():
        flags = [f"--{name.replace('_', '-')}", *aliases.get(name, ())]
        default = field.default
        shown = "none" if default is None else default
        help_text = f"{field.description or ''} (default: {shown})".strip()
        if field.annotation is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                *flags,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=_metavar(field.annotation),
                help=help_text,
            )


def config_from_args(
    model: type[BaseModel],
    args: argparse.Namespace,
    *,
    base: dict[str, Any] | None = None,
    path_fields: Sequence[str] = (),
) -> BaseModel:
    """``model(**{**base, **config file, **flags})``; relative paths in the config file are
    relative to the file, those given as flags to the current directory."""
    from sparselens.train.config import load_yaml_mapping

    settings: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None) is not None:
        cfg_path = Path(args.config)
        file_settings = load_yaml_mapping(cfg_path)
        for key in path_fields:
            value = file_settings.get(key)
            if isinstance(value, str) and value:
                p = Path(value).expanduser()
                file_settings[key] = str(p if p.is_absolute() else cfg_path.parent / p)
        settings.update(file_settings)
    for name in model.model_fields:
        if name in vars(args):
            settings[name] = getattr(args, name)
    return model.model_validate(settings)


# -- calibrate ----------------------------------------------------------------------------------
def _default_out(stem: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{stem}-{stamp}"
    i = 2
    while out.exists():
        out = Path("runs") / f"{stem}-{stamp}-{i}"
        i += 1
    return out


def _add_run_options(p: argparse.ArgumentParser, stem: str) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    p.add_argument("--out", metavar="DIR", help=f"run directory (default: runs/{stem}-<timestamp>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")


def register_calibrate(subparsers: Any) -> None:
    """``sparselens calibrate``: sparse survey calibration (L0 gates, then a refit)."""
    from sparselens.l0.calibrate_job import CalibrateConfig

    p = subparsers.add_parser(
        "calibrate",
        help="choose few survey records and weights that match target totals",
        description=(
            "Sparse calibration: fit L0-gated non-negative weights w so that M @ w matches the "
            "targets y with few non-zero records, then refit the weights on the selected "
            "records. Give --matrix and --targets, or neither for the bundled synthetic survey."
        ),
        epilog=(
            "Writes to --out: config.yaml, manifest.json, metrics.jsonl, checkpoints/ while "
            "running; weights.csv, target_errors.csv, summary.json, plots/*.png and report.md "
            "once complete. Exit status: 0 done, 2 bad input, 130/143 interrupted (continue "
            "with --resume --out DIR)."
        ),
    )
    _add_run_options(p, "calibrate")
    group = p.add_argument_group("settings (also accepted as keys of the --config YAML file)")
    add_config_options(group, CalibrateConfig, aliases={"beta": ("--tau", "--temperature")})
    p.set_defaults(handler=_run_calibrate)


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.4g} %"


def run_dir_and_saved_settings(
    args: argparse.Namespace, kind: str
) -> tuple[Path, dict[str, Any] | None]:
    """The run directory (``--out`` or a fresh ``runs/<kind>-<time>``) and, for ``--resume``, the
    settings saved in its ``config.yaml``."""
    from sparselens.train.config import load_yaml_mapping

    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    out = Path(args.out) if args.out else _default_out(kind)
    if not args.resume:
        return out, None
    cfg = out / "config.yaml"
    if not cfg.is_file():
        raise UsageError(f"cannot resume {out}: no config.yaml there (not a run directory)")
    return out, load_yaml_mapping(cfg)


def _run_calibrate(args: argparse.Namespace, argv: list[str]) -> int:
    from sparselens.l0.calibrate_job import CalibrateConfig, run_calibration

    out, base = run_dir_and_saved_settings(args, "calibrate")
    config = config_from_args(CalibrateConfig, args, base=base, path_fields=("matrix", "targets"))
    assert isinstance(config, CalibrateConfig)
    summary = run_calibration(config, out, resume=args.resume, command=[PROG, *argv])
    if not args.quiet:
        f, r = summary["fit"]["rel_error"], summary["refit"]["rel_error"]
        d = summary["data"]
        lines = [
            f"{PROG} calibrate: {summary['run_dir']}",
            f"  {d['n_records']} records x {d['n_targets']} targets; non-zero weights "
            f"{summary['nonzero']} ({_fmt_pct(summary['nonzero'] / d['n_records'])}), "
            f"lambda_l0 {summary['lambda_l0']:.4g}",
            "  relative error     mean / median / max",
            f"    before refit     {_fmt_pct(f['mean'])} / {_fmt_pct(f['median'])} / "
            f"{_fmt_pct(f['max'])}",
            f"    after refit      {_fmt_pct(r['mean'])} / {_fmt_pct(r['median'])} / "
            f"{_fmt_pct(r['max'])}",
        ]
        if "recovery" in summary:
            rec = summary["recovery"]
            lines.append(
                f"  truth: {rec['selected_true_active']} of {rec['true_active']} active records "
                f"selected; weight sum {rec['weight_sum']:.6g} vs {rec['true_weight_sum']:.6g}"
            )
        lines.append(f"  report: {Path(summary['run_dir']) / 'report.md'}")
        print("\n".join(lines))
    return 0


def register_lm(subparsers: Any) -> None:
    """``sparselens lm train|sweep``: Mini-GPT training and the temperature sweep."""
    from sparselens.lm.cli_commands import register

    register(subparsers)


def register_sae(subparsers: Any) -> None:
    """``sparselens sae train|cache|eval|inspect``: TopK sparse autoencoders and transcoders."""
    from sparselens.sae.cli_commands import register

    register(subparsers)


def register_spd(subparsers: Any) -> None:
    """``sparselens spd run``: Stochastic Parameter Decomposition."""
    from sparselens.spd.cli_commands import register

    register(subparsers)


COMMANDS: dict[str, Callable[[Any], None]] = {
    "calibrate": register_calibrate,
    "lm": register_lm,
    "sae": register_sae,
    "spd": register_spd,
}
"""Subcommand groups: name → ``register(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``sparselens`` parser."""
    parser = _Parser(
        prog=PROG,
        description="Learning sparse structure: L0 gates, sparse calibration, TopK SAEs, "
        "parameter decomposition.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS.values():
        register(sub)
    for action in sub.choices.values():
        action.allow_abbrev = False
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    from sparselens.train.config import format_validation_error
    from sparselens.train.logging_setup import setup_logging
    from sparselens.train.signals import Interrupted, termination_signals

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose_debug = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = ("warning", "info", "debug")[min(args.verbose, 2)]
        if args.quiet:
            level = "error"
        verbose_debug = level == "debug"
        setup_logging(level)
        with termination_signals():
            return int(args.handler(args, argv))
    except ValidationError as e:
        msg = format_validation_error(e)
    except Interrupted as e:
        print(f"{PROG}: interrupted ({e}); continue with --resume --out DIR", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError) as e:
        if verbose_debug:
            logging.getLogger(__name__).debug("traceback", exc_info=True)
        msg = str(e)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | FileExistsError):
            msg = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    print(f"{PROG}: error: {_one_line(msg)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
