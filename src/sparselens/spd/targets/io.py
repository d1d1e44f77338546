"""Save and load SPD toy targets: a directory of ``model.safetensors`` and ``config.json``.

Nothing is unpickled. ``config.json`` is written last (atomically) and records the SHA-256 of the
tensor file, so a half-written or swapped directory is rejected instead of loading a different
model::

    {"format": "sparselens.spd_target/1", "kind": "tms" | "resid_mlp", "config": {...},
     "files": {"model.safetensors": "<sha256>"}, "W_E_sha256": "<sha256>" (resid_mlp),
     "training": {...training_info...}}

Tied tensors are stored once (the TMS ``linear2.weight`` is ``linear1.weight.T``). The ResidMLP
embedding is not stored: it is regenerated from ``config.embed_seed`` and checked against the
recorded checksum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from sparselens.spd.targets.resid_mlp import ResidMLP, ResidMLPConfig
from sparselens.spd.targets.tms import TMSConfig, TMSModel
from sparselens.train.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    safetensors_bytes,
    sha256_bytes,
    tensors_from_bytes,
)
from sparselens.train.config import format_validation_error

FORMAT = "sparselens.spd_target/1"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
_KINDS: dict[str, tuple[type[nn.Module], type[Any]]] = {
    "tms": (TMSModel, TMSConfig),
    "resid_mlp": (ResidMLP, ResidMLPConfig),
}

Target = TMSModel | ResidMLP


def _kind(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"model must be a TMSModel or ResidMLP, got {type(model).__name__}")


def stored_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries that own their storage: each parameter/persistent buffer once."""
    state = model.state_dict()
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in unique}


def _embedding_sha(model: ResidMLP) -> str:
    return sha256_bytes(model.W_E.detach().cpu().contiguous().numpy().tobytes())


def save_target(model: Target, path: str | Path) -> Path:
    """Write ``model`` into the directory ``path`` (created if needed); return the path."""
    kind = _kind(model)
    directory = Path(path)
    info = getattr(model, "training_info", None) or {}
    try:
        training = json.loads(json.dumps(info, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"model.training_info must be JSON-serialisable: {e}") from None
    blob = safetensors_bytes(stored_tensors(model))
    doc: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "config": model.cfg.model_dump(mode="json"),
        "files": {MODEL_FILE: sha256_bytes(blob)},
    }
    if isinstance(model, ResidMLP):
        doc["W_E_sha256"] = _embedding_sha(model)
    doc["training"] = training
    atomic_write_bytes(directory / MODEL_FILE, blob)
    atomic_write_json(directory / CONFIG_FILE, doc)
    return directory


def read_target_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a target directory (no tensors are read)."""
    directory = Path(path)
    cfg_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such target directory")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: no such file (not an SPD target)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{cfg_path}: not an SPD target (format {got!r}, expected {FORMAT})")
    if doc.get("kind") not in _KINDS:
        raise ValueError(
            f"{cfg_path}: kind must be one of {sorted(_KINDS)}, got {doc.get('kind')!r}"
        )
    files = doc.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(MODEL_FILE), str):
        raise ValueError(f"{cfg_path}: no checksum for {MODEL_FILE}")
    return doc


def load_target(path: str | Path, map_location: str | torch.device = "cpu") -> Target:
    """Read a target written by :func:`save_target`, in eval mode (``training_info`` restored).

    Raises FileNotFoundError / ValueError with one line naming the offending file.
    """
    directory = Path(path)
    doc = read_target_config(directory)
    cfg_path = directory / CONFIG_FILE
    cls, cfg_cls = _KINDS[doc["kind"]]
    try:
        cfg = cfg_cls.model_validate(doc.get("config"))
    except ValidationError as e:
        msg = format_validation_error(e, cfg_cls)
        raise ValueError(f"{cfg_path}: invalid {doc['kind']} config: {msg}") from None
    model_path = directory / MODEL_FILE
    try:
        blob = model_path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_path}: no such file (listed in {CONFIG_FILE})") from None
    if sha256_bytes(blob) != doc["files"][MODEL_FILE]:
        raise ValueError(
            f"{model_path}: does not match the SHA-256 recorded in {CONFIG_FILE} "
            "(corrupt or partially written)"
        )
    tensors = tensors_from_bytes(blob, model_path)
    with torch.random.fork_rng(devices=[]):  # building the model must not move the global RNG
        model = cls(cfg)
    expected = set(stored_tensors(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{model_path}: tensors do not fit the config in {CONFIG_FILE} "
            f"(missing {missing}, unexpected {extra})"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"{model_path}: does not fit the config in {CONFIG_FILE}: {detail}"
        ) from None
    if isinstance(model, ResidMLP) and doc.get("W_E_sha256") != _embedding_sha(model):
        raise ValueError(
            f"{cfg_path}: the embedding regenerated from embed_seed={cfg.embed_seed} does not "
            "match the recorded W_E_sha256 (different torch random stream?)"
        )
    training = doc.get("training")
    model.training_info = dict(training) if isinstance(training, dict) else {}
    return model.to(map_location).eval()


def bundled_targets_dir() -> Path:
    """``sparselens/data/spd_targets``: the verified TMS targets shipped with the package."""
    return Path(__file__).resolve().parents[2] / "data" / "spd_targets"


def load_bundled_target(name: str) -> Target:
    """A bundled target by name (``tms_5-2``, ``tms_5-2_id``, ``tms_40-10``, ``tms_40-10_id``)."""
    from sparselens.spd.targets.tms import TMS_TARGETS

    if name not in TMS_TARGETS:
        raise ValueError(f"name must be one of {', '.join(TMS_TARGETS)}; got {name!r}")
    return load_target(bundled_targets_dir() / name)


__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "MODEL_FILE",
    "bundled_targets_dir",
    "load_bundled_target",
    "load_target",
    "read_target_config",
    "save_target",
    "stored_tensors",
]
