"""Mini-GPT, tokenizers, corpora, samplers and generation (work in progress)."""
