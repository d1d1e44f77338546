"""The language model a sparse coder is trained on or evaluated against (:class:`Subject`).

:func:`load_subject` accepts

* ``"minigpt"``: the bundled Mini-GPT trained on the verbs corpus
  (:func:`sparselens.lm.checkpoint.default_checkpoint`);
* a directory holding a Mini-GPT checkpoint (:mod:`sparselens.lm.checkpoint` layout, its
  ``config.json`` has ``"format": "sparselens.minigpt/1"``);
* a directory holding a Hugging Face causal LM (any other ``config.json``), loaded with
  ``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)``: never the hub. Its
  tokenizer comes from the directory when it has one, else a byte-level fallback (token id = byte
  value, needs ``vocab_size >= 256``).

Every subject is frozen: eval mode, ``requires_grad=False`` on all parameters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from sparselens.lm.hooks import module_names as _all_module_names

MINIGPT = "minigpt"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TextTokenizer(Protocol):
    """What a subject's tokenizer provides."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Subject:
    """A frozen causal LM with its tokenizer, context length and special tokens.

    ``name`` is the spec it was loaded from (``"minigpt"`` or a resolved directory path), so
    ``load_subject(subject.name)`` loads it again.
    """

    name: str
    model: nn.Module
    tokenizer: Any
    context_len: int
    special_token_ids: tuple[int, ...]
    kind: Literal["minigpt", "hf"]

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (CPU for a parameter-free model)."""
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""
        cfg = getattr(self.model, "config", None)
        return int(cfg.vocab_size)  # both MiniGPTConfig and HF configs carry it

    def logits(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, T, vocab)`` of ``tokens`` ``(B, T)`` (integer ids)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, seq) integer tensor, got {shape}")
        if tokens.shape[1] > self.context_len:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions, more than the subject's context_len "
                f"{self.context_len}"
            )
        if self.kind == "minigpt":
            return self.model(tokens)
        return self.model(input_ids=tokens, use_cache=False).logits

    def module_names(self) -> list[str]:
        """Names a hookpoint pattern can match, in model order: for Mini-GPT its hook points
        first (``embed``, ``blocks.0.resid_pre``, ..., ``blocks.0.resid_post``, ``blocks.1...``,
        ``ln_f``, ``head``), then every other submodule; for a Hugging Face model its
        ``named_modules()`` names."""
        names = _all_module_names(self.model)
        if self.kind == "minigpt":
            hooks = set(self.model.hook_points())  # type: ignore[operator]
            return [n for n in names if n in hooks] + [n for n in names if n not in hooks]
        return names


class ByteTokenizer:
    """Fallback tokenizer: one id per UTF-8 byte (id = byte value)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`TextTokenizer` interface (no specials
    added on encode)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.backend.decode([int(i) for i in ids]))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _minigpt_subject(name: str, directory: Path | None) -> Subject:
    from sparselens.lm.checkpoint import load_checkpoint

    model, tok = load_checkpoint(directory)
    where = directory if directory is not None else "the bundled Mini-GPT"
    if tok is None:
        raise ValueError(f"{where}: the Mini-GPT checkpoint has no tokenizer.json")
    specials = tuple(sorted({int(tok.pad_id), int(tok.eos_id), int(tok.bos_id)}))
    return Subject(
        name=name,
        model=_freeze(model),
        tokenizer=tok,
        context_len=int(model.config.context_len),
        special_token_ids=specials,
        kind="minigpt",
    )


def _hf_context_len(config: Any, path: Path) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{path}: config.json states no context length (n_positions or similar)")


def _hf_subject(path: Path) -> Subject:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency of the dev env
        raise ValueError(f"{path}: loading a Hugging Face model needs `transformers`") from None

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{path}: cannot load a Hugging Face causal LM ({msg})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = model.config
    vocab = int(config.vocab_size)
    tokenizer: Any
    if any((path / f).is_file() for f in _HF_TOKENIZER_FILES):
        try:
            backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            raise ValueError(f"{path}: cannot load its tokenizer ({msg})") from None
        tokenizer = HFTokenizer(backend)
        ids = [int(i) for i in getattr(backend, "all_special_ids", []) or []]
    else:
        if vocab < ByteTokenizer.vocab_size:
            raise ValueError(
                f"{path}: no tokenizer files and vocab_size {vocab} < 256, so the byte-level "
                "fallback tokenizer cannot be used; add the tokenizer files to the directory"
            )
        tokenizer = ByteTokenizer()
        ids = []
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, attr, None)
        ids += [v] if isinstance(v, int) else list(v) if isinstance(v, list | tuple) else []
    if isinstance(tokenizer, ByteTokenizer):
        ids = []  # every id below 256 is a byte of text here, never a special token
    specials = tuple(sorted({int(i) for i in ids if 0 <= int(i) < vocab}))
    return Subject(
        name=str(path),
        model=_freeze(model),
        tokenizer=tokenizer,
        context_len=_hf_context_len(config, path),
        special_token_ids=specials,
        kind="hf",
    )


def load_subject(spec: str | os.PathLike[str] = MINIGPT) -> Subject:
    """Load the subject model named by ``spec`` (see the module docstring), frozen, on CPU.

    Raises a one-line ``ValueError`` for a path that does not exist, is not a directory, or
    holds neither a Mini-GPT checkpoint nor a Hugging Face causal LM.
    """
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"subject must be 'minigpt' or a directory path, got {type(spec).__name__}")
    if str(spec) == MINIGPT:
        return _minigpt_subject(MINIGPT, None)
    path = Path(spec).expanduser()
    expected = f"expected {MINIGPT!r} or a directory with a Mini-GPT or Hugging Face checkpoint"
    if not path.exists():
        raise ValueError(f"subject {str(spec)!r} not found ({expected})")
    if not path.is_dir():
        raise ValueError(f"subject {str(spec)!r} is not a directory ({expected})")
    path = path.resolve()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"subject {str(path)!r} has no config.json ({expected})")
    try:
        doc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(doc).__name__}")
    from sparselens.lm.checkpoint import FORMAT as MINIGPT_FORMAT

    if doc.get("format") == MINIGPT_FORMAT:
        try:
            return _minigpt_subject(str(path), path)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    return _hf_subject(path)


__all__ = ["ByteTokenizer", "HFTokenizer", "Subject", "TextTokenizer", "load_subject"]
