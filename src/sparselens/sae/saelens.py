"""Export :class:`~sparselens.sae.SparseCoder` s to SAELens' on-disk layout, and import back.

SAELens (``sae-lens`` 6.x, verified with :data:`SAELENS_VERSION`) loads a directory holding
``cfg.json`` and ``sae_weights.safetensors`` with ``SAE.load_from_disk(path)``. Its TopK SAE
(``architecture="topk"``) computes (Gao et al. 2024, arXiv 2406.04093, eq. 2-3)::

    pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc     (* ||W_dec rows|| if rescale)
    acts = ReLU(TopK_k(pre))                                       (dense, zeros elsewhere)
    out  = (acts / ||W_dec rows|| if rescale) @ W_dec + b_dec

A TopK :class:`SparseCoder` computes ``TopK_k(ReLU(W_enc (x - b_dec) + b_enc))`` and
``sum_j a_j W_dec[j] + b_dec``, so the export mapping (reference sheet §5.5) is
``W_enc = encoder.weight^T`` (d_in, M), ``b_enc = encoder.bias``, ``W_dec = W_dec`` **as stored**
(M, d_in), ``b_dec = b_dec``, with ``apply_b_dec_to_input=True`` and
``rescale_acts_by_decoder_norm=False``. SAELens' own sparsify converter gets two of these wrong
(sheet §5.4): it transposes ``W_dec`` and sets ``apply_b_dec_to_input = not normalize_decoder``,
dropping ``b_dec`` from the input of every default sparsify SAE.

* BatchTopK coders export as SAELens ``"jumprelu"`` (as SAELens saves its own BatchTopK SAEs):
  at inference a BatchTopK coder keeps the pre-activations above its scalar ``threshold``
  buffer, i.e. JumpReLU with that threshold for every latent.
* Transcoders are refused: SAELens' ``transcoder``/``skip_transcoder`` architectures apply a
  plain ReLU, so it has no architecture that runs a TopK transcoder.

:func:`import_saelens` inverts the mapping for SAELens ``"topk"`` checkpoints, folding
``rescale_acts_by_decoder_norm`` (``W_enc`` columns and ``b_enc`` times the decoder row norms,
``W_dec`` rows divided by them, as SAELens' ``fold_W_dec_norm``) and
``apply_b_dec_to_input=False`` (``b_enc += b_dec @ W_enc``) into the weights, so the imported
coder reproduces SAELens' activations and reconstruction. Run provenance goes into SAELens'
``metadata`` (``model_name``, ``hook_name``, ``dataset_path``, ``context_size``, ...) and,
with our full config, under ``metadata["sparselens"]`` so that a round trip is lossless.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from sparselens import __version__
from sparselens.core.checks import check_finite
from sparselens.sae.checkpoint import load_sparse_coder, read_provenance
from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.sparse_coder import SparseCoder
from sparselens.train.atomic import atomic_write_json, load_safetensors, save_safetensors

#: The sae-lens release the layout was verified against (scripts/verify_saelens_export.py).
SAELENS_VERSION = "6.54.12"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
#: Key under SAELens' ``metadata`` holding our version, config and provenance.
METADATA_KEY = "sparselens"

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    **{v: k for k, v in _DTYPES.items()},
    **{f"torch.{v}": k for k, v in _DTYPES.items()},
}
#: SAELens metadata field <- provenance keys that may carry it (first present wins).
_METADATA_FIELDS: dict[str, tuple[str, ...]] = {
    "model_name": ("model_name", "model", "subject"),
    "hook_name": ("hook_name", "hookpoint"),
    "dataset_path": ("dataset_path", "dataset", "corpus"),
    "context_size": ("context_size", "context_len", "ctx_len"),
    "prepend_bos": ("prepend_bos",),
    "exclude_special_tokens": ("exclude_special_tokens",),
}
#: SAELens TopK options that import folds into the weights: field -> (default, other value).
_FOLDABLE = {"apply_b_dec_to_input": (True, False), "rescale_acts_by_decoder_norm": (False, True)}


# ---- export ---------------------------------------------------------------------------------


def _inference_threshold(coder: SparseCoder) -> Tensor:
    thr = getattr(coder, "threshold", None)
    if not isinstance(thr, Tensor) or thr.dim() != 0 or not thr.is_floating_point():
        raise ValueError(
            "a batchtopk coder exports to SAELens as JumpReLU with its inference threshold, "
            "but this SparseCoder has no 0-d float 'threshold' buffer"
        )
    check_finite("threshold", thr)
    return thr.detach()


def saelens_tensors(coder: SparseCoder) -> dict[str, Tensor]:
    """The ``sae_weights.safetensors`` tensors of ``coder`` (mapping in the module doc)."""
    if not isinstance(coder, SparseCoder):
        raise TypeError(f"coder must be a SparseCoder, got {type(coder).__name__}")
    cfg = coder.cfg
    if cfg.transcode or coder.W_skip is not None:
        raise ValueError(
            "cannot export a transcoder / skip-transcoder to SAELens: its transcoder "
            "architectures apply a plain ReLU, none runs TopK"
        )
    if coder.dtype not in _DTYPES:
        raise ValueError(
            f"coder dtype must be one of {', '.join(_DTYPES.values())}, got {coder.dtype}"
        )
    tensors = {
        "W_enc": coder.W_enc.detach().t(),
        "b_enc": coder.b_enc.detach(),
        "W_dec": coder.W_dec.detach(),
        "b_dec": coder.b_dec.detach(),
    }
    if cfg.activation == "batchtopk":
        tensors["threshold"] = _inference_threshold(coder).to(coder.dtype).expand(coder.num_latents)
    for name, t in tensors.items():
        check_finite(f"coder {name}", t)
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def _metadata(coder: SparseCoder, provenance: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        # a 6.x version keeps SAELens off its pre-6.0 config rewriting path
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
    }
    prov = provenance or {}
    for field, keys in _METADATA_FIELDS.items():
        for key in keys:
            if prov.get(key) is not None:
                meta[field] = prov[key]
                break
    meta[METADATA_KEY] = {
        "version": __version__,
        "config": coder.cfg.model_dump(mode="json"),
        "provenance": provenance,
    }
    if coder.cfg.activation == "batchtopk":  # the buffer's own precision, for a lossless import
        meta[METADATA_KEY]["threshold"] = float(_inference_threshold(coder))
    return meta


def saelens_config(coder: SparseCoder, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """SAELens ``cfg.json`` of ``coder``: ``topk`` (``jumprelu`` for BatchTopK) with
    ``apply_b_dec_to_input=True``, no rescaling or normalisation, and ``metadata``."""
    if provenance is not None and not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict or None, got {type(provenance).__name__}")
    batch = coder.cfg.activation == "batchtopk"
    cfg: dict[str, Any] = {
        "architecture": "jumprelu" if batch else "topk",
        "d_in": coder.d_in,
        "d_sae": coder.num_latents,
        "dtype": _DTYPES.get(coder.dtype, str(coder.dtype)),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if not batch:
        cfg["k"] = coder.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = _metadata(coder, provenance)
    return cfg


def export_saelens(
    coder: SparseCoder,
    path: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``coder`` to ``path`` as SAELens' ``cfg.json`` + ``sae_weights.safetensors``.

    ``SAE.load_from_disk(path)`` in sae-lens 6.x then returns a ``TopKSAE`` (``JumpReLUSAE``
    for BatchTopK) whose ``encode`` equals our activations scattered densely and whose forward
    equals our ``sae_out``. ``provenance`` (e.g. from :func:`~sparselens.sae.read_provenance`)
    fills SAELens' metadata fields (module doc). Everything is validated before the disk is
    touched; each file is written atomically, weights first; a directory this call created is
    removed again if writing fails. Returns the directory.
    """
    tensors = saelens_tensors(coder)
    cfg = saelens_config(coder, provenance)
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"provenance must be JSON-serialisable: {e}") from None
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        atomic_write_json(out / CFG_NAME, cfg)
    except BaseException:
        if created is not None:  # the outermost directory this call made
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def convert_to_saelens(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Export the sparsify-layout checkpoint in ``source`` (e.g. a run's ``final/<hookpoint>``)
    to SAELens' layout in ``path``, carrying its ``cfg.json`` provenance into the metadata."""
    return export_saelens(load_sparse_coder(source), path, provenance=read_provenance(source))


# ---- import ---------------------------------------------------------------------------------


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a SAELens directory needs {CFG_NAME})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _positive_int(path: Path, cfg: dict[str, Any], name: str) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{path}: '{name}' must be an integer >= 1, got {v!r}")
    return v


def _check_supported(path: Path, cfg: dict[str, Any], arch: Any, ours: dict[str, Any]) -> None:
    if arch not in ("topk", "jumprelu"):
        raise ValueError(
            f"{path}: architecture {arch!r} cannot be represented by a SparseCoder "
            "(supported: 'topk', and 'jumprelu' exported from a sparselens batchtopk coder)"
        )
    if arch == "jumprelu" and ours.get("activation") != "batchtopk":
        raise ValueError(
            f"{path}: a 'jumprelu' SAE imports only when sparselens exported it from a "
            "batchtopk coder (metadata.sparselens.config); a general JumpReLU is not TopK"
        )
    for name, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(name, "none") != allowed:
            raise ValueError(
                f"{path}: {name} must be 'none' to import into a SparseCoder, got {cfg.get(name)!r}"
            )
    for name, values in _FOLDABLE.items():
        if cfg.get(name, values[0]) not in values:
            raise ValueError(f"{path}: '{name}' must be true or false, got {cfg.get(name)!r}")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{path}: finetuning_scaling_factor is not supported")


def _ours(cfg: dict[str, Any]) -> dict[str, Any]:
    meta = cfg.get("metadata")
    ours = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    return ours if isinstance(ours, dict) else {}


def _our_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    raw = _ours(cfg).get("config")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: metadata.{METADATA_KEY}.config must be an object")
    return raw


def _build_config(
    path: Path, raw: dict[str, Any], arch: str, d_sae: int, k: int, unit_rows: bool
) -> SparseCoderConfig:
    """Our config from ``metadata.sparselens.config`` (fields of other sparselens versions
    dropped), with SAELens' ``d_sae``/``k``/architecture taking precedence."""
    known = set(SparseCoderConfig.model_fields)
    fields = {name: v for name, v in raw.items() if name in known}
    fields.setdefault("normalize_decoder", unit_rows)
    activation = "batchtopk" if arch == "jumprelu" else "topk"
    fields.update(num_latents=d_sae, k=k, activation=activation)
    try:
        scfg = SparseCoderConfig(**fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{path}: invalid config ({problems})") from None
    if scfg.transcode or scfg.skip_connection:
        raise ValueError(f"{path}: metadata describes a transcoder, but the file holds an SAE")
    return scfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a SAELens directory needs {WEIGHTS_NAME})")
    tensors = load_safetensors(path)
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    scale = tensors.pop("scaling_factor", None)  # SAELens drops an all-ones one too
    if scale is not None and not bool((scale == 1).all()):
        raise ValueError(f"{path}: a scaling_factor other than ones is not supported")
    return tensors


def import_saelens(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SparseCoder:
    """Load a SAELens TopK SAE directory (``cfg.json`` + ``sae_weights.safetensors``) as a
    :class:`SparseCoder` with the same activations and reconstruction (module doc).

    The dtype is SAELens' ``cfg["dtype"]`` (tensors are cast to it, as SAELens does). Our own
    exports round-trip exactly, including the full config kept in ``metadata.sparselens``;
    other checkpoints get ``normalize_decoder`` set when every decoder row has unit norm.
    Architectures and options a SparseCoder cannot represent (``standard``, ``gated``,
    transcoders, a general ``jumprelu``, activation normalisation, ``hook_z`` reshaping) raise
    one ``ValueError`` line naming the file and the field.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such SAELens directory")
    cfg_path, w_path = root / CFG_NAME, root / WEIGHTS_NAME
    cfg = _read_cfg(cfg_path)
    arch = cfg.get("architecture")
    ours = _our_config(cfg_path, cfg)
    _check_supported(cfg_path, cfg, arch, ours)
    d_in, d_sae = _positive_int(cfg_path, cfg, "d_in"), _positive_int(cfg_path, cfg, "d_sae")
    k = _positive_int(cfg_path, cfg, "k") if arch == "topk" else ours.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(f"{cfg_path}: 'k' must be an integer in [1, d_sae={d_sae}], got {k!r}")
    dtype = _DTYPE_NAMES.get(str(cfg.get("dtype", "float32")))
    if dtype is None:
        raise ValueError(
            f"{cfg_path}: 'dtype' must be one of {', '.join(_DTYPES.values())}, "
            f"got {cfg.get('dtype')!r}"
        )

    tensors = _read_tensors(w_path)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{w_path}: missing tensors {', '.join(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{w_path}: unexpected tensors {', '.join(unexpected)} for {arch!r}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{w_path}: {name} has shape {tuple(t.shape)}, but {CFG_NAME} "
                f"(d_in={d_in}, d_sae={d_sae}) implies {shape}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{w_path}: {name} has non-float dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{w_path}: {name} holds NaN or infinite values")

    # fold SAELens' options into SparseCoder weights, in float64, then cast once
    w = {n: t.to(dtype).double() for n, t in tensors.items()}
    W_enc, b_enc, W_dec, b_dec = w["W_enc"].t(), w["b_enc"], w["W_dec"], w["b_dec"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)
        if not bool((norms > 0).all()):
            raise ValueError(f"{w_path}: W_dec has a zero row; rescale_acts_by_decoder_norm fails")
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec
    rows = W_dec.norm(dim=1)
    unit_rows = bool(((rows - 1).abs() <= 1e-4).all())

    scfg = _build_config(cfg_path, ours, arch, d_sae, k, unit_rows)
    coder = SparseCoder(d_in, scfg, device=device, dtype=dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(W_enc)
        coder.encoder.bias.copy_(b_enc)
        coder.W_dec.copy_(W_dec)
        coder.b_dec.copy_(b_dec)
        if arch == "jumprelu":
            _set_threshold(w_path, coder, tensors["threshold"].to(dtype), _ours(cfg))
    return coder


def _set_threshold(path: Path, coder: SparseCoder, thr: Tensor, ours: dict[str, Any]) -> None:
    """Load the (uniform) JumpReLU threshold into the coder's buffer, at the buffer's own
    precision when the metadata's value rounds to the file's."""
    if not bool((thr == thr[0]).all()):
        raise ValueError(f"{path}: threshold differs across latents; a BatchTopK coder has one")
    buf = getattr(coder, "threshold", None)
    if not isinstance(buf, Tensor):
        raise ValueError(f"{path}: this SparseCoder has no 'threshold' buffer to load into")
    exact = ours.get("threshold")
    if isinstance(exact, int | float) and not isinstance(exact, bool):
        t = torch.tensor(float(exact), dtype=buf.dtype)
        if bool(t.to(thr.dtype) == thr[0]):
            buf.copy_(t)
            return
    buf.copy_(thr[0])


__all__ = [
    "CFG_NAME",
    "SAELENS_VERSION",
    "WEIGHTS_NAME",
    "convert_to_saelens",
    "export_saelens",
    "import_saelens",
    "saelens_config",
    "saelens_tensors",
]
