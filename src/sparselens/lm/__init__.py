"""A small GPT of sparselens's own, its tokenizers and corpora, exact samplers and generation.

``MiniGPT`` (pre-LN, RoPE, tied head, KV cache, named hook points) is the default subject of the
sparse-dictionary and parameter-decomposition tools; ``load_checkpoint()`` loads the bundled model
trained on the generated verbs corpus.
"""

from sparselens.lm.checkpoint import (
    checkpoint_hash,
    default_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sparselens.lm.generate import generate
from sparselens.lm.model import HOOK_POINTS, KVCache, MiniGPT, MiniGPTConfig
from sparselens.lm.sampling import Greedy, MinP, Sampler, Temperature, TopK, TopP
from sparselens.lm.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "HOOK_POINTS",
    "BPETokenizer",
    "CharTokenizer",
    "Greedy",
    "KVCache",
    "MinP",
    "MiniGPT",
    "MiniGPTConfig",
    "Sampler",
    "Temperature",
    "Tokenizer",
    "TopK",
    "TopP",
    "checkpoint_hash",
    "default_checkpoint",
    "generate",
    "load_checkpoint",
    "load_tokenizer",
    "save_checkpoint",
]
