"""Train and verify the bundled TMS targets under ``src/sparselens/data/spd_targets/``.

For each name (``tms_5-2``, ``tms_5-2_id``, ``tms_40-10``, ``tms_40-10_id``) this runs the
reference recipe (:func:`sparselens.spd.targets.tms.train_verified_tms`: AdamW wd 0.01, lr 5e-3
constant, 10k steps; B 1024 for 5-2, B 8192 and zero bias init for 40-10; one torch thread),
trying seeds in order until every feature is represented (5-2: one-hot 0.75 answered within 0.1;
40-10: every column norm above half the largest). It saves ``<name>/model.safetensors`` and
``<name>/config.json`` and records the command, the seeds tried and the checks in
``MADE_WITH.json``. Usage::

    .venv/bin/python scripts/train_spd_targets.py [--only tms_5-2 ...] [--max-seeds 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparselens.spd.targets.io import bundled_targets_dir, load_target, save_target
from sparselens.spd.targets.tms import (
    TMS_TARGETS,
    column_norms,
    feature_outputs,
    represented_features,
    train_verified_tms,
)
from sparselens.train.atomic import atomic_write_json
from sparselens.train.manifest import git_info, hardware_info, package_versions, utc_now


def _summary(model: Any) -> dict[str, Any]:
    outs = feature_outputs(model)
    norms = column_norms(model)
    return {
        "training": model.training_info,
        "represented_output_test": represented_features(model, criterion="output"),
        "represented_column_norm_test": represented_features(model, criterion="column_norm"),
        "one_hot_0.75_outputs": {"min": float(outs.min()), "max": float(outs.max())},
        "column_norms": {"min": float(norms.min()), "max": float(norms.max())},
        "bias_mean": float(model.linear2.bias.detach().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(TMS_TARGETS), default=list(TMS_TARGETS))
    ap.add_argument("--max-seeds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=bundled_targets_dir())
    args = ap.parse_args(argv)

    command = " ".join(["python scripts/train_spd_targets.py", *sys.argv[1:]])
    made_path = args.out / "MADE_WITH.json"
    made: dict[str, Any] = {}
    if made_path.exists():
        made = json.loads(made_path.read_text(encoding="utf-8"))
    made.setdefault("targets", {})
    for name in args.only:
        cfg = TMS_TARGETS[name]
        model = train_verified_tms(cfg, seeds=range(args.max_seeds))
        path = save_target(model, args.out / name)
        reloaded = load_target(path)
        assert represented_features(reloaded) == cfg.n_features, name
        made["targets"][name] = {
            "config": cfg.model_dump(mode="json"),
            "command": command,
            **_summary(reloaded),
        }
        info = model.training_info
        print(
            f"{name}: seed {info['seed']} ({len(info['seeds_tried'])} tried), "
            f"{info['train_seconds']:.1f} s, loss {info['final_loss']:.2e}",
            flush=True,
        )
    made.update(
        {
            "description": "Verified TMS targets for `sparselens spd run` (reference recipe, "
            "seeds tried in order until every feature is represented).",
            "command": command,
            "versions": package_versions(),
            "git": git_info(),
            "hardware": hardware_info(),
            "trained_at": utc_now(),
        }
    )
    made["targets"] = dict(sorted(made["targets"].items()))
    atomic_write_json(made_path, made)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
