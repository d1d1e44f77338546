"""Token streams and batches of fixed-length windows for training and evaluating sparse coders.

* :func:`load_tokens`: a corpus tokenised by a subject's tokenizer, as one 1-D stream, split into
  disjoint train / val parts (val = the last ``val_fraction`` of the text). The verbs corpus
  (the bundled Mini-GPT's) is read as the model was trained on it: one sentence per line, each
  followed by ``<eos>``, and split at a line boundary.
* :func:`token_batches`: an endless, seeded stream of ``(B, T)`` windows. The stream is cut into
  ``W = n // T`` non-overlapping windows; epoch ``e`` visits them in the order of a permutation
  drawn from ``(seed, e)``, and the epochs are concatenated into one sequence of window indices.
  Global batch ``g`` is positions ``[g G, (g + 1) G)`` of that sequence (``G = batch_size *
  world_size``) and rank ``r`` takes its ``r``-th slice of ``batch_size`` windows. So a batch
  depends only on ``(seed, g, rank, world_size)``: ``start_batch`` resumes exactly, the ranks'
  batches are disjoint and together equal the one-process batch of ``G`` windows.
* :func:`exclusion_mask`: positions holding special tokens (BOS/EOS/PAD), to drop before
  training (sparsify #113: unmasked BOS activations destabilise training and flatter FVU).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from sparselens.core.checks import check_choice, check_int, check_number

if TYPE_CHECKING:
    from sparselens.sae.subject import Subject

DEFAULT = "default"
LINE_CORPORA = ("verbs",)
"""Corpora read one line per sequence with ``<eos>`` after each (as the bundled model saw them)."""


def resolve_corpus(subject: Subject, corpus: str | os.PathLike[str] = DEFAULT) -> str:
    """The corpus ``"default"`` stands for: ``"verbs"`` for Mini-GPT subjects, else the
    committed Shakespeare slice; built-in names stay, a path becomes absolute."""
    name = str(corpus)
    if name == DEFAULT:
        return "verbs" if subject.kind == "minigpt" else "shakespeare-slice"
    from sparselens.lm.corpora import CORPUS_NAMES

    if name in CORPUS_NAMES:
        return name
    return str(Path(name).expanduser().resolve())


def _eos_id(tokenizer: object) -> int | None:
    for owner in (tokenizer, getattr(tokenizer, "backend", None)):
        for attr in ("eos_id", "eos_token_id"):
            v = getattr(owner, attr, None)
            if isinstance(v, int):
                return v
    return None


def _encode_lines(subject: Subject, lines: Sequence[str]) -> list[int]:
    """Each line followed by ``<eos>`` (by a newline when the tokenizer has no EOS)."""
    enc, eos = subject.tokenizer.encode, _eos_id(subject.tokenizer)
    out: list[int] = []
    for ln in lines:
        if eos is None:
            out += enc(ln + "\n")
        else:
            out += enc(ln)
            out.append(eos)
    return out


def load_tokens(
    subject: Subject,
    corpus: str | os.PathLike[str] = DEFAULT,
    *,
    split: Literal["train", "val"] = "train",
    val_fraction: float = 0.05,
) -> Tensor:
    """The ``split`` of ``corpus`` tokenised by ``subject.tokenizer``: a LongTensor ``(n,)``.

    ``corpus``: ``"default"`` (see :func:`resolve_corpus`), ``"verbs"``, ``"shakespeare"``,
    ``"shakespeare-slice"`` or the path of a UTF-8 ``.txt`` file. ``val`` is the last
    ``val_fraction`` of the text (whole lines for the verbs corpus), ``train`` the rest; they are
    disjoint. Raises a one-line ValueError / FileNotFoundError for a bad corpus, fraction or an
    empty split.
    """
    check_choice("split", split, ("train", "val"))
    vf = check_number("val_fraction", val_fraction, gt=0.0, lt=1.0)
    name = resolve_corpus(subject, corpus)
    path = Path(name)
    stat = path.stat() if path.is_file() else None
    key = (name, split, vf, stat.st_mtime_ns if stat else None, stat.st_size if stat else None)
    try:
        memo = _MEMO.setdefault(subject.tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no memo
        memo = {}
    if key not in memo:
        while len(memo) >= 4:
            del memo[next(iter(memo))]
        memo[key] = _tokenize(subject, name, split, vf)
    return memo[key].clone()


_MEMO: weakref.WeakKeyDictionary[object, dict[tuple, Tensor]] = weakref.WeakKeyDictionary()
"""Per tokenizer, the last few splits tokenised (the trainer, the evaluator and the cache
writer ask for the same ones)."""


def _tokenize(subject: Subject, name: str, split: str, vf: float) -> Tensor:
    from sparselens.lm.corpora import load_corpus

    text = load_corpus(name, seed=0)
    if Path(name).name == name and name in LINE_CORPORA:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) < 2:
            raise ValueError(f"corpus {name} has {len(lines)} line(s); need 2 to split it")
        n_val = min(max(1, round(len(lines) * vf)), len(lines) - 1)
        part = lines[-n_val:] if split == "val" else lines[:-n_val]
        ids = _encode_lines(subject, part)
    else:
        cut = int(len(text) * (1.0 - vf))
        ids = subject.tokenizer.encode(text[cut:] if split == "val" else text[:cut])
    if not ids:
        raise ValueError(
            f"the {split} split of corpus {name} is empty (val_fraction={vf:g}); use a larger "
            "corpus or another val_fraction"
        )
    out = torch.tensor(ids, dtype=torch.long)
    vocab = subject.vocab_size
    lo, hi = int(out.min()), int(out.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"the tokenizer of subject {subject.name} produced id {hi if hi >= vocab else lo}, "
            f"outside the model's vocabulary [0, {vocab - 1}]"
        )
    return out


def num_windows(n_tokens: int, context_len: int) -> int:
    """Non-overlapping windows of ``context_len`` tokens in a stream of ``n_tokens``."""
    return n_tokens // context_len


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of ``epoch``: a permutation of ``range(num)`` drawn from ``(seed,
    epoch)`` (NumPy's PCG64 seeded by a SeedSequence; platform-independent)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num)


def token_batches(
    tokens: Tensor,
    *,
    context_len: int,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tensor]:
    """Endless ``(batch_size, context_len)`` LongTensor batches of ``tokens`` (module doc).

    The first batch yielded is global batch ``start_batch``. Raises ValueError (at the call)
    when ``tokens`` holds fewer than one window or an argument is out of range.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    t = check_int("context_len", context_len, ge=1)
    b = check_int("batch_size", batch_size, ge=1)
    check_int("seed", seed, ge=0)
    start = check_int("start_batch", start_batch, ge=0)
    ws = check_int("world_size", world_size, ge=1)
    r = check_int("rank", rank, ge=0, le=ws - 1)
    w = num_windows(tokens.numel(), t)
    if w == 0:
        raise ValueError(
            f"tokens holds {tokens.numel()} tokens, fewer than one window of context_len {t}"
        )
    windows = tokens[: w * t].reshape(w, t)
    idx = batch_indices(w, batch_size=b, seed=seed, start_batch=start, rank=r, world_size=ws)
    return (windows.index_select(0, i) for i in idx)


def batch_indices(
    num: int,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    order: Callable[[int, int, int], np.ndarray] = epoch_order,
) -> Iterator[Tensor]:
    """Endless int64 index batches into ``range(num)``: the epochs' orders ``order(num, seed,
    e)`` concatenated, global batch ``g`` = positions ``[g G, (g + 1) G)``, this rank's slice of
    ``batch_size`` (``G = batch_size * world_size``). Shared by token windows and cached rows."""
    g = batch_size * world_size
    cached: dict[int, Tensor] = {}
    batch = start_batch
    while True:
        lo = batch * g + rank * batch_size
        first = lo // num
        for old in [e for e in cached if e < first]:  # epochs before this batch are done
            del cached[old]
        pos, parts = lo, []
        while pos < lo + batch_size:  # a batch may span several epochs (always when num < b)
            epoch, off = divmod(pos, num)
            if epoch not in cached:
                cached[epoch] = torch.from_numpy(np.asarray(order(num, seed, epoch), np.int64))
            take = min(lo + batch_size - pos, num - off)
            parts.append(cached[epoch][off : off + take])
            pos += take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)
        batch += 1


def exclusion_mask(tokens: Tensor, special_token_ids: Sequence[int]) -> Tensor:
    """Bool tensor shaped like ``tokens``: True where the token is kept (not a special id)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    ids = [int(i) for i in special_token_ids]
    if not ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))


__all__ = [
    "DEFAULT",
    "batch_indices",
    "epoch_order",
    "exclusion_mask",
    "load_tokens",
    "num_windows",
    "resolve_corpus",
    "token_batches",
]
