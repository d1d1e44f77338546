"""TopK sparse autoencoders and transcoders with AuxK, Multi-TopK and dead-latent tracking.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093), with
EleutherAI sparsify's API and parameter layout.

* the model: :class:`SparseCoder` (:class:`SparseCoderConfig`), FVU and dead-latent statistics,
  sparsify-format checkpoints (:func:`save_sparse_coder`, :func:`load_sparse_coder`);
* training (``sparselens sae train``): :class:`SAETrainConfig`, :func:`train_sae`,
  activation sources (:func:`load_subject`, :class:`ActivationCache` / :func:`write_cache`);
* evaluation and inspection (``sparselens sae eval|inspect``);
* SAELens interoperability: :func:`export_saelens`, :func:`import_saelens`.

The training, cache and interop names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparselens.sae.checkpoint import load_sparse_coder, read_provenance, save_sparse_coder
from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.dead_latents import DeadLatentTracker
from sparselens.sae.fvu import FVUAccumulator, fvu, total_variance
from sparselens.sae.sparse_coder import EncoderOutput, ForwardOutput, SparseCoder

_LAZY: dict[str, str] = {
    "SAETrainConfig": "train_config",
    "train_sae": "trainer",
    "load_subject": "subject",
    "Subject": "subject",
    "ActivationSource": "activations",
    "ActivationCache": "cache",
    "SAECacheConfig": "cache",
    "write_cache": "cache",
    "export_saelens": "saelens",
    "import_saelens": "saelens",
    "convert_to_saelens": "saelens",
}

__all__ = [
    "ActivationCache",
    "ActivationSource",
    "DeadLatentTracker",
    "EncoderOutput",
    "FVUAccumulator",
    "ForwardOutput",
    "SAECacheConfig",
    "SAETrainConfig",
    "SparseCoder",
    "SparseCoderConfig",
    "Subject",
    "convert_to_saelens",
    "export_saelens",
    "fvu",
    "import_saelens",
    "load_sparse_coder",
    "load_subject",
    "read_provenance",
    "save_sparse_coder",
    "total_variance",
    "train_sae",
    "write_cache",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparselens.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparselens.sae.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
