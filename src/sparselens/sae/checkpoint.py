"""Save and load :class:`~sparselens.sae.SparseCoder` s in EleutherAI sparsify's on-disk layout.

One directory per hookpoint (reference sheet §1.3/§1.5) holding

* ``cfg.json``: the :class:`~sparselens.sae.SparseCoderConfig` fields plus ``"d_in"``; we also
  write our extra fields (``auxk_alpha``, ``k_aux``, ...) and, optionally, a ``"provenance"``
  entry. sparsify's ``load_from_disk`` drops fields it does not know, so it loads our files.
* ``sae.safetensors``: sparsify's tensor names ``encoder.weight`` (M, d), ``encoder.bias`` (M,),
  ``W_dec`` (M, d), ``b_dec`` (d,) and, with ``skip_connection``, ``W_skip`` (d, d). A BatchTopK
  coder (not a sparsify format) adds its 0-d inference ``threshold`` (JumpReLU, float32).

Loading follows sparsify's ``SparseCoder.load_from_disk``: the dtype is that of the first tensor
of the safetensors file, unknown ``cfg.json`` fields are dropped (with a logged note) and
``decoder=False`` loads the encoder (and ``b_dec``) only. Only safetensors is read (never pickle);
every problem with a file raises one line naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.sparse_coder import SparseCoder
from sparselens.train.atomic import atomic_write_json, save_safetensors

logger = logging.getLogger(__name__)

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
PROVENANCE_KEY = "provenance"
_DECODER_TENSORS = ("W_dec", "W_skip")
THRESHOLD_NAME = "threshold"


def save_sparse_coder(
    sae: SparseCoder,
    directory: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to ``directory`` as ``cfg.json`` + ``sae.safetensors`` (sparsify's layout).

    ``provenance``: JSON-serialisable facts about the run (hookpoint, model, dataset, tokens
    seen, ...) stored under ``cfg.json["provenance"]``. Each file is written atomically; the
    weights first, so a complete ``cfg.json`` is never paired with missing weights. Returns the
    directory.
    """
    if not isinstance(sae, SparseCoder):
        raise TypeError(f"sae must be a SparseCoder, got {type(sae).__name__}")
    if provenance is not None and not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict or None, got {type(provenance).__name__}")
    cfg: dict[str, Any] = sae.cfg.model_dump(mode="json")
    cfg["d_in"] = sae.d_in
    if provenance is not None:
        cfg[PROVENANCE_KEY] = provenance
    try:  # fail before touching the disk
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"provenance must be JSON-serialisable: {e}") from None

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach() for name, t in sae.state_dict().items()}
    save_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(out / CFG_NAME, cfg)
    return out


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a sparse coder directory needs {CFG_NAME})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_provenance(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``"provenance"`` entry of ``directory/cfg.json`` (None when absent)."""
    path = Path(directory) / CFG_NAME
    prov = _read_cfg(path).get(PROVENANCE_KEY)
    if prov is not None and not isinstance(prov, dict):
        raise ValueError(f"{path}: 'provenance' must be an object, got {type(prov).__name__}")
    return prov


def _parse_cfg(path: Path, raw: dict[str, Any]) -> tuple[int, SparseCoderConfig]:
    raw = dict(raw)
    if "d_in" not in raw:
        raise ValueError(f"{path}: missing field 'd_in'")
    d_in = raw.pop("d_in")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"{path}: 'd_in' must be an integer >= 1, got {d_in!r}")
    raw.pop(PROVENANCE_KEY, None)
    known = set(SparseCoderConfig.model_fields)
    unknown = sorted(set(raw) - known)
    if unknown:
        logger.info("%s: ignoring unknown config fields %s", path, ", ".join(unknown))
    try:
        cfg = SparseCoderConfig(**{k: v for k, v in raw.items() if k in known})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{path}: invalid config ({problems})") from None
    return d_in, cfg


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """All tensors of ``path`` (CPU) and the dtype of its first tensor (sparsify's rule)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a sparse coder directory needs {WEIGHTS_NAME})"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({msg})") from None
    if not keys:
        raise ValueError(f"{path}: holds no tensors")
    weights = [k for k in keys if k != THRESHOLD_NAME] or keys
    return tensors, tensors[weights[0]].dtype


def load_sparse_coder(
    directory: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    decoder: bool = True,
) -> SparseCoder:
    """Load a sparse coder saved by sparsify's ``save_to_disk`` or :func:`save_sparse_coder`.

    ``decoder=False`` loads ``encoder.*``, ``b_dec`` (and ``threshold``) only (sparsify's
    encoder-only load): ``W_dec``/``W_skip`` in the file are ignored and the returned module's
    decoder keeps its initial values, so use it for :meth:`~sparselens.sae.SparseCoder.encode`
    only. A BatchTopK file without ``threshold`` is rejected (its eval outputs would differ).
    Raises ``FileNotFoundError`` for a missing directory or file and ``ValueError`` (one line,
    naming the file) for invalid JSON, an invalid config, an unreadable safetensors file,
    missing/unexpected tensors, shape mismatches and non-finite or non-float weights.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such sparse coder directory")
    cfg_path, w_path = root / CFG_NAME, root / WEIGHTS_NAME
    d_in, cfg = _parse_cfg(cfg_path, _read_cfg(cfg_path))
    tensors, dtype = _read_weights(w_path)
    if not dtype.is_floating_point:
        raise ValueError(f"{w_path}: first tensor has non-float dtype {dtype}")

    m = cfg.resolve_num_latents(d_in)
    expected: dict[str, tuple[int, ...]] = {
        "encoder.weight": (m, d_in),
        "encoder.bias": (m,),
        "W_dec": (m, d_in),
        "b_dec": (d_in,),
    }
    if cfg.skip_connection:
        expected["W_skip"] = (d_in, d_in)
    if cfg.activation == "batchtopk":
        expected[THRESHOLD_NAME] = ()
    if not decoder:
        for name in _DECODER_TENSORS:
            expected.pop(name, None)
            tensors.pop(name, None)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{w_path}: missing tensors {', '.join(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(
            f"{w_path}: unexpected tensors {', '.join(unexpected)} for the config in {CFG_NAME}"
        )
    implied = f"d_in={d_in}, num_latents={m}"
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{w_path}: {name} has shape {tuple(t.shape)}, but {CFG_NAME} ({implied}) "
                f"implies {shape}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"{w_path}: {name} has non-float dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{w_path}: {name} holds NaN or infinite values")

    try:
        sae = SparseCoder(d_in, cfg, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    with torch.no_grad():
        params = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
        for name, t in tensors.items():
            params[name].copy_(t)
    return sae


__all__ = ["load_sparse_coder", "read_provenance", "save_sparse_coder"]
