"""Checkpoints as ``safetensors + json`` (or one ``torch.save`` file), written atomically.

A training state is a nested structure of dicts, lists, tuples, tensors, numpy arrays and plain
scalars (a model ``state_dict``, an optimiser ``state_dict``, a generator state, a loss
history). :func:`flatten_state` splits it into a flat ``{name: tensor}`` map (stored as
safetensors, no pickle) and a JSON tree that points at those names; :func:`unflatten_state`
inverts it exactly: float32 tensors round-trip bit for bit, dict keys keep their types (an
optimiser's ``{0: ...}`` stays an ``int`` key) and tuples stay tuples.

Files for step ``s`` are ``<prefix>-<s:08d>.safetensors`` then ``<prefix>-<s:08d>.json``; the
JSON is written last and carries the SHA-256 of the tensor file, so a checkpoint exists only
once both are complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparselens.train.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    load_torch,
    safetensors_bytes,
    save_torch,
    sha256_bytes,
    tensors_from_bytes,
)

if TYPE_CHECKING:
    import torch

FORMAT = "sparselens.checkpoint/1"
_RESERVED = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def _float_to_json(x: float) -> Any:
    return x if math.isfinite(x) else {"__float__": repr(x)}


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``state`` into ``(json_tree, {name: tensor})``; raise TypeError on other types."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: str) -> str:
        base = path or "root"
        name, i = base, 1
        while name in tensors:
            name, i = f"{base}#{i}", i + 1
        return name

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            name = name_for(path)
            tensors[name] = obj.detach().cpu().contiguous()
            return {"__tensor__": name}
        if isinstance(obj, np.ndarray):
            name = name_for(path)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
            return {"__ndarray__": name}
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int | np.integer):
            return int(obj)
        if isinstance(obj, float | np.floating):
            return _float_to_json(float(obj))
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            plain = all(isinstance(k, str) and k not in _RESERVED for k in obj)
            if plain:
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {
                "__dict__": [
                    [enc(k, f"{path}.key"), enc(v, f"{path}.{k}" if path else str(k))]
                    for k, v in obj.items()
                ]
            }
        where = path or "<root>"
        raise TypeError(f"cannot checkpoint {type(obj).__name__} at {where}")

    return enc(state, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if isinstance(obj, dict):
            if len(obj) == 1:
                ((key, val),) = obj.items()
                if key == "__tensor__":
                    return tensors[val]
                if key == "__ndarray__":
                    return tensors[val].numpy()
                if key == "__tuple__":
                    return tuple(dec(v) for v in val)
                if key == "__dict__":
                    return {_hashable(dec(k)): dec(v) for k, v in val}
                if key == "__float__":
                    return float(val)
            return {k: dec(v) for k, v in obj.items()}
        return obj

    return dec(tree)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


_NAME = re.compile(r"^(?P<prefix>.+)-(?P<step>\d{8,})\.(?P<ext>json|pt)$")


def checkpoint_stem(prefix: str, step: int) -> str:
    """``<prefix>-<step:08d>``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
        raise ValueError(f"checkpoint prefix must match [A-Za-z0-9_.]+, got {prefix!r}")
    return f"{prefix}-{step:08d}"


def save_checkpoint(
    directory: str | Path,
    state: Any,
    step: int,
    *,
    meta: dict[str, Any] | None = None,
    prefix: str = "ckpt",
    fmt: str = "safetensors",
) -> Path:
    """Write one checkpoint atomically; return the path that marks it complete.

    ``fmt="safetensors"``: tensors in ``.safetensors``, structure and ``meta`` (JSON-able) in
    ``.json`` (returned). ``fmt="torch"``: one ``.pt`` file readable with ``weights_only=True``.
    """
    directory = Path(directory)
    stem = checkpoint_stem(prefix, step)
    header = {"format": FORMAT, "step": int(step), "meta": meta or {}}
    if fmt == "torch":
        return save_torch(directory / f"{stem}.pt", {**header, "state": state})
    if fmt != "safetensors":
        raise ValueError(f"fmt must be 'safetensors' or 'torch', got {fmt!r}")
    tree, tensors = flatten_state(state)
    blob = safetensors_bytes(tensors) if tensors else b""
    atomic_write_bytes(directory / f"{stem}.safetensors", blob)
    doc = {
        **header,
        "tensors": f"{stem}.safetensors",
        "sha256": sha256_bytes(blob),
        "state": tree,
    }
    return atomic_write_text(directory / f"{stem}.json", json.dumps(doc) + "\n")


def load_checkpoint(path: str | Path) -> tuple[Any, int, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, step, meta)``.

    Raises ValueError when the file is not a checkpoint or its tensor file does not match.
    """
    path = Path(path)
    if path.suffix == ".pt":
        doc = load_torch(path)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path}: not a sparselens checkpoint")
        return doc["state"], int(doc["step"]), dict(doc["meta"])
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a sparselens checkpoint ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sparselens checkpoint")
    blob = (path.parent / doc["tensors"]).read_bytes()
    if sha256_bytes(blob) != doc["sha256"]:
        raise ValueError(f"{path}: tensor file {doc['tensors']} does not match its checksum")
    tensors = tensors_from_bytes(blob, path.parent / doc["tensors"]) if blob else {}
    return unflatten_state(doc["state"], tensors), int(doc["step"]), dict(doc["meta"])


def list_checkpoints(directory: str | Path, prefix: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, path)``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m is None or (prefix is not None and m["prefix"] != prefix):
            continue
        if m["ext"] == "json" and not p.with_suffix(".safetensors").exists():
            continue
        found.append((int(m["step"]), p))
    return sorted(found)


def prune_checkpoints(directory: str | Path, keep_last: int, prefix: str | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and orphaned tensor files)."""
    directory = Path(directory)
    ckpts = list_checkpoints(directory, prefix)
    for _, p in ckpts[: max(len(ckpts) - keep_last, 0)]:
        p.unlink(missing_ok=True)  # the marker first: a half-pruned checkpoint is never listed
        if p.suffix == ".json":
            p.with_suffix(".safetensors").unlink(missing_ok=True)
    live = {p.with_suffix(".safetensors") for _, p in list_checkpoints(directory, prefix)}
    for p in directory.glob("*.safetensors"):
        m = re.match(r"^(?P<prefix>.+)-\d{8,}$", p.stem)
        if m and (prefix is None or m["prefix"] == prefix) and p not in live:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


__all__ = [
    "FORMAT",
    "checkpoint_stem",
    "flatten_state",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "unflatten_state",
]
