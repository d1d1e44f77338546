"""``sparselens.sae.data``: corpus token streams, train/val split, deterministic resumable
window batches split across ranks, and special-token exclusion."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.lm.corpora import load_corpus
from sparselens.sae.data import epoch_order, exclusion_mask, load_tokens, token_batches
from sparselens.sae.subject import ByteTokenizer, Subject, load_subject


@pytest.fixture(scope="module")
def minigpt() -> Subject:
    return load_subject()


@pytest.fixture(scope="module")
def verbs(minigpt: Subject) -> dict[str, torch.Tensor]:
    return {s: load_tokens(minigpt, split=s) for s in ("train", "val")}


def byte_subject(vocab: int = 256) -> Subject:
    """A stand-in HF subject with the byte tokenizer (the data functions read only these)."""
    model = torch.nn.Module()
    model.config = type("C", (), {"vocab_size": vocab})()  # type: ignore[assignment]
    return Subject("bytes", model, ByteTokenizer(), 16, (), "hf")


def reference_batch(
    n_windows: int, batch_size: int, seed: int, g: int, rank: int, world: int
) -> list[int]:
    """Window indices of global batch ``g`` on ``rank``, from an explicit concatenation of
    epoch permutations (independent of the generator's epoch arithmetic)."""
    need = (g + 1) * batch_size * world
    seq: list[int] = []
    epoch = 0
    while len(seq) < need:
        seq += np.random.default_rng([seed, epoch]).permutation(n_windows).tolist()
        epoch += 1
    lo = g * batch_size * world + rank * batch_size
    return seq[lo : lo + batch_size]


# -- load_tokens --------------------------------------------------------------------------------
def test_verbs_default_is_lines_with_eos(minigpt: Subject, verbs) -> None:
    """The default corpus of the Mini-GPT is the verbs corpus, one line + <eos> per sentence,
    split at a line: train + val is exactly every line encoded in order.

    Wrong variants caught: encoding the whole text without <eos> (the model's training format
    has one after each line); a val split overlapping or dropping lines."""
    lines = [ln for ln in load_corpus("verbs").splitlines() if ln.strip()]
    eos = minigpt.tokenizer.eos_id
    n_val = round(len(lines) * 0.05)
    ref_val = [i for ln in lines[-n_val:] for i in [*minigpt.tokenizer.encode(ln), eos]]
    assert verbs["val"].tolist() == ref_val
    assert int((verbs["train"] == eos).sum()) == len(lines) - n_val
    assert verbs["train"].numel() + verbs["val"].numel() == sum(
        len(minigpt.tokenizer.encode(ln)) + 1 for ln in lines
    )
    assert verbs["train"][-1].item() == eos and verbs["train"].dtype == torch.long
    assert verbs["train"][: len(minigpt.tokenizer.encode(lines[0]))].tolist() == (
        minigpt.tokenizer.encode(lines[0])
    )


def test_text_file_split_is_last_fraction(tmp_path: Path) -> None:
    """A .txt corpus: val is the text's last fraction (by characters), train the rest."""
    text = "".join(f"line {i}: some words here\n" for i in range(100))
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    s = byte_subject()
    tr = load_tokens(s, str(path), split="train", val_fraction=0.25)
    va = load_tokens(s, path, split="val", val_fraction=0.25)
    cut = int(len(text) * 0.75)
    assert tr.tolist() == list(text[:cut].encode()) and va.tolist() == list(text[cut:].encode())


def test_default_for_hf_is_shakespeare_slice() -> None:
    from sparselens.lm.corpora import shakespeare_slice

    text = shakespeare_slice()
    va = load_tokens(byte_subject(), split="val", val_fraction=0.1)
    assert va.tolist() == list(text[int(len(text) * 0.9) :].encode())


def test_load_tokens_errors(tmp_path: Path) -> None:
    s = byte_subject()
    with pytest.raises(ValueError, match="val_fraction must be"):
        load_tokens(s, val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction must be"):
        load_tokens(s, val_fraction=1.0)
    with pytest.raises(ValueError, match="split must be one of"):
        load_tokens(s, split="test")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokens(s, str(tmp_path / "nope.txt"))
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(ValueError, match=r"train split .* is empty"):
        load_tokens(s, str(tmp_path / "one.txt"), split="train", val_fraction=0.1)
    (tmp_path / "u.txt").write_text("aéa", encoding="utf-8")  # bytes 195, 169 >= vocab 128
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 127\]"):
        load_tokens(byte_subject(128), str(tmp_path / "u.txt"), split="val", val_fraction=0.5)


# -- token_batches ------------------------------------------------------------------------------
def test_windows_are_disjoint_and_one_epoch_covers_each_once() -> None:
    """Within an epoch every non-overlapping window appears exactly once.

    Wrong variant caught: drawing windows with replacement (as ``lm.train.get_batch`` does),
    which repeats some windows and misses others within an epoch."""
    tokens = torch.arange(10 * 7 + 3)  # 10 windows of 7, 3 leftover tokens
    it = token_batches(tokens, context_len=7, batch_size=5, seed=3)
    rows = torch.cat([next(it), next(it)])
    starts = rows[:, 0]
    assert sorted(starts.tolist()) == list(range(0, 70, 7))
    assert torch.equal(rows, starts[:, None] + torch.arange(7))


def test_epochs_reshuffle() -> None:
    """Epoch 2 visits the windows in another order than epoch 1 (same seed).

    Wrong variant caught: one permutation reused for every epoch."""
    tokens = torch.arange(64 * 4)
    it = token_batches(tokens, context_len=4, batch_size=64, seed=0)
    e0, e1 = next(it)[:, 0], next(it)[:, 0]
    assert sorted(e0.tolist()) == sorted(e1.tolist())
    assert not torch.equal(e0, e1)
    other = next(token_batches(tokens, context_len=4, batch_size=64, seed=1))[:, 0]
    assert not torch.equal(e0, other)


@settings(max_examples=60, deadline=None)
@given(
    n_windows=st.integers(1, 30),
    ctx=st.integers(1, 5),
    extra=st.integers(0, 4),
    batch=st.integers(1, 9),
    world=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    start=st.integers(0, 12),
)
def test_batches_match_reference_and_resume(
    n_windows: int, ctx: int, extra: int, batch: int, world: int, seed: int, start: int
) -> None:
    """Every rank's batch g equals the reference slice of the concatenated epoch permutations;
    starting at ``start_batch`` reproduces the uninterrupted stream from there; the ranks'
    batches concatenated equal the one-process batch of ``batch * world`` windows.

    Wrong variants caught: resuming by re-seeding without skipping consumed batches; ranks that
    each draw the full batch from the same seed (identical, not disjoint, data); epochs that
    restart at a batch boundary instead of continuing the window sequence."""
    tokens = torch.arange(n_windows * ctx + min(extra, ctx - 1)) * 3 + 1
    windows = tokens[: n_windows * ctx].view(n_windows, ctx)
    n_batches = 4
    per_rank = [
        list(
            islice(
                token_batches(
                    tokens, context_len=ctx, batch_size=batch, seed=seed, rank=r, world_size=world
                ),
                start + n_batches,
            )
        )
        for r in range(world)
    ]
    single = list(
        islice(token_batches(tokens, context_len=ctx, batch_size=batch * world, seed=seed), 1)
    )
    assert torch.equal(torch.cat([per_rank[r][0] for r in range(world)]), single[0])
    for r in range(world):
        resumed = list(
            islice(
                token_batches(
                    tokens,
                    context_len=ctx,
                    batch_size=batch,
                    seed=seed,
                    start_batch=start,
                    rank=r,
                    world_size=world,
                ),
                n_batches,
            )
        )
        for j in range(n_batches):
            g = start + j
            ref = windows[reference_batch(n_windows, batch, seed, g, r, world)]
            assert torch.equal(resumed[j], ref)
            assert torch.equal(per_rank[r][g], ref)


def test_epoch_order_is_a_permutation_and_deterministic() -> None:
    a = epoch_order(50, 7, 3)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, 7, 3))
    assert not np.array_equal(a, epoch_order(50, 7, 4))


def test_token_batches_errors() -> None:
    t = torch.arange(10)
    with pytest.raises(ValueError, match="fewer than one window of context_len 11"):
        token_batches(t, context_len=11, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rank must be an integer >= 0 and <= 1"):
        token_batches(t, context_len=2, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        token_batches(t, context_len=2, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="1-D tensor"):
        token_batches(t.view(2, 5), context_len=2, batch_size=1, seed=0)
    with pytest.raises(TypeError, match="integer dtype"):
        token_batches(t.float(), context_len=2, batch_size=1, seed=0)


# -- exclusion_mask -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    toks=st.lists(st.integers(0, 9), min_size=1, max_size=40),
    specials=st.lists(st.integers(0, 9), max_size=4),
)
def test_exclusion_mask_matches_reference(toks: list[int], specials: list[int]) -> None:
    """True exactly where the token is not a special id (a mask of the wrong polarity, True =
    drop, fails here)."""
    t = torch.tensor(toks).view(1, -1)
    mask = exclusion_mask(t, specials)
    assert mask.dtype == torch.bool and mask.shape == t.shape
    assert mask.view(-1).tolist() == [x not in specials for x in toks]


def test_exclusion_mask_on_verbs(minigpt: Subject, verbs) -> None:
    """On the verbs corpus exactly the <eos> positions (one per sentence) are dropped."""
    t = verbs["val"]
    mask = exclusion_mask(t, minigpt.special_token_ids)
    assert int((~mask).sum()) == int((t == minigpt.tokenizer.eos_id).sum()) > 0


def test_memo_follows_file_changes_and_returns_copies(tmp_path: Path) -> None:
    """Repeated loads are served from a per-tokenizer memo, but a rewritten corpus file is read
    again, and callers get their own tensor (in-place edits do not leak)."""
    s = byte_subject()
    path = tmp_path / "c.txt"
    path.write_text("abcdefghij" * 10)
    a = load_tokens(s, path, val_fraction=0.5)
    a[0] = 99
    assert load_tokens(s, path, val_fraction=0.5)[0].item() == ord("a")
    path.write_text("zyxwvutsrq" * 11)
    assert load_tokens(s, path, val_fraction=0.5)[0].item() == ord("z")
