"""TopK sparse autoencoders and transcoders with AuxK, Multi-TopK and dead-latent tracking.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093), with
EleutherAI sparsify's API and parameter layout.
"""

from sparselens.sae.checkpoint import load_sparse_coder, read_provenance, save_sparse_coder
from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.dead_latents import DeadLatentTracker
from sparselens.sae.fvu import FVUAccumulator, fvu, total_variance
from sparselens.sae.sparse_coder import EncoderOutput, ForwardOutput, SparseCoder

__all__ = [
    "DeadLatentTracker",
    "EncoderOutput",
    "FVUAccumulator",
    "ForwardOutput",
    "SparseCoder",
    "SparseCoderConfig",
    "fvu",
    "load_sparse_coder",
    "read_provenance",
    "save_sparse_coder",
    "total_variance",
]
