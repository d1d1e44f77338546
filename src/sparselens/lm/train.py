"""Train a Mini-GPT on a text corpus: the ``sparselens lm train`` job.

Data
----
The corpus (``verbs``, ``shakespeare`` or a UTF-8 text file, :func:`~sparselens.lm.corpora.
load_corpus`) is tokenised with a character or byte-level BPE tokenizer trained on the whole
corpus. With ``eos_per_line`` (the default for ``verbs``, one sentence per line) every non-empty
line becomes ``tokens + <eos>``, the last ``val_split`` of the lines are the validation split, and
every training window starts at a line start, so a prompt such as "Tomorrow she" at position 0 is
in distribution. Otherwise the text is cut at ``(1 - val_split) * len(text)`` characters and
windows start anywhere. A batch is ``batch_size`` windows of ``context_len + 1`` tokens drawn with
replacement by one seeded ``torch.Generator`` (its state is the data position).

Optimisation
------------
AdamW (decay on matrices and embeddings, none on LayerNorm parameters and biases), learning rate
``lr * step / warmup_steps`` during warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last
step (:class:`~sparselens.core.schedules.Schedule`), gradient-norm clipping, next-token
cross-entropy in nats (:func:`~sparselens.core.softmax.cross_entropy`). Evaluation every
``eval_interval`` steps and at the end: mean loss over ``eval_batches`` fixed batches of each
split (the same batches every time, drawn from their own generators).

Run directory (:class:`~sparselens.train.rundir.RunDir`)
--------------------------------------------------------
``config.yaml``, ``manifest.json`` (seed, versions, git, hardware, corpus hash),
``metrics.jsonl`` (``{"phase": "train", "step", "loss", "lr"}`` every ``log_every`` steps, the
mean over those steps; ``{"phase": "eval", "step", "train_loss", "val_loss"}`` per evaluation),
``checkpoints/`` (model, optimiser, RNG states, step, loss accumulator; safetensors + json,
atomic; plus the tokenizer), then, once complete, ``final/`` (:func:`~sparselens.lm.checkpoint.
save_checkpoint`: ``model.safetensors``, ``config.json``, ``tokenizer.json``),
``plots/loss.png``, ``summary.json`` and ``report.md``.

Exact resume: ``resume=True`` reloads the newest checkpoint (weights, AdamW moments, the global
torch RNG and the data generator) and the run continues bit for bit as if never interrupted, given
the same ``threads`` and machine.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from sparselens.core.schedules import Schedule
from sparselens.core.softmax import cross_entropy
from sparselens.lm.corpora import CORPUS_NAMES, corpus_hash, load_corpus
from sparselens.lm.model import MiniGPT, MiniGPTConfig
from sparselens.train.atomic import atomic_write_json, atomic_write_text
from sparselens.train.config import (
    format_validation_error,
)
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir, check_resumable, save_figure
from sparselens.train.seeding import seed_everything

logger = logging.getLogger(__name__)

BUILTIN_CORPORA = CORPUS_NAMES
REPORT_PROMPTS = ("Tomorrow she", "Yesterday I", "He")
MODEL_FIELDS = (
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "context_len",
    "rope_base",
    "dropout",
    "layer_norm_eps",
)
CHECKPOINT_PREFIX = "train"
TOKENIZER_FILE = "tokenizer.json"
_RESUMABLE_CHANGES = frozenset({"progress"})
_BIGRAM_ALPHA = 0.1
_TIED = "head.weight"  # the tied head: stored once, as embed.weight


def _model_field(name: str) -> Any:
    """The :class:`MiniGPTConfig` field ``name`` (default, bounds, description), reused here."""
    info: FieldInfo = copy.deepcopy(MiniGPTConfig.model_fields[name])
    return info


class TrainConfig(BaseModel):
    """Settings of one training run; YAML files and CLI flags map onto these fields.

    Model dimensions default to :class:`~sparselens.lm.model.MiniGPTConfig`'s defaults.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    # data
    corpus: str = Field(
        "verbs",
        min_length=1,
        description="'verbs' (generated verb-grammar sentences), 'shakespeare' (needs the "
        "shakespeare package), 'shakespeare-slice' (7.5 KB, bundled) or a UTF-8 .txt file",
    )
    corpus_seed: int = Field(0, ge=0, lt=2**32, description="seed of the generated verbs corpus")
    eos_per_line: bool | None = Field(
        None,
        description="treat every line as one sequence ending in <eos> (default: on for verbs, "
        "off otherwise)",
    )
    val_split: float = Field(0.1, gt=0, lt=1, description="share of the corpus held out")
    tokenizer: Literal["char", "bpe"] = Field(
        "bpe", description="char: one id per character; bpe: byte-level BPE"
    )
    bpe_vocab_size: int = Field(
        512, ge=260, le=2**20, description="BPE vocabulary bound (4 specials + 256 bytes + merges)"
    )
    lowercase: bool = Field(False, description="lowercase the text (char tokenizer only)")
    # model
    d_model: int = _model_field("d_model")
    n_heads: int = _model_field("n_heads")
    n_layers: int = _model_field("n_layers")
    d_ff: int = _model_field("d_ff")
    context_len: int = _model_field("context_len")
    rope_base: float = _model_field("rope_base")
    dropout: float = _model_field("dropout")
    layer_norm_eps: float = _model_field("layer_norm_eps")
    # optimisation
    batch_size: int = Field(64, ge=1, le=2**16, description="sequences per step")
    steps: int = Field(2000, ge=1, description="optimiser steps")
    lr: float = Field(3e-3, gt=0, le=10, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final learning rate of the cosine decay, as a share of lr"
    )
    warmup_steps: int = Field(100, ge=0, description="steps of linear warm-up (<= steps)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = Field(200, ge=1, description="steps between evaluations")
    eval_batches: int = Field(20, ge=1, description="batches per split and evaluation")
    log_every: int = Field(10, ge=1, description="steps between train-loss records")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of initialisation and batches")
    threads: int = Field(1, ge=1, le=1024, description="torch CPU threads")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps}"
            )
        if self.lowercase and self.tokenizer != "char":
            raise ValueError("lowercase applies only to the char tokenizer")
        if self.tokenizer != "bpe" and "bpe_vocab_size" in self.model_fields_set:
            default = type(self).model_fields["bpe_vocab_size"].default
            if self.bpe_vocab_size != default:
                raise ValueError("bpe_vocab_size applies only to the bpe tokenizer")
        try:
            self.model_config_for(vocab_size=1)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, MiniGPTConfig)) from None
        return self

    @property
    def line_mode(self) -> bool:
        """Whether lines are separate sequences (``eos_per_line``, resolved)."""
        return self.corpus == "verbs" if self.eos_per_line is None else self.eos_per_line

    def model_config_for(self, vocab_size: int) -> MiniGPTConfig:
        """The :class:`MiniGPTConfig` of this run for a tokenizer of ``vocab_size`` ids."""
        return MiniGPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in MODEL_FIELDS})


# -- data ---------------------------------------------------------------------------------------
@dataclass
class CorpusData:
    """A tokenised corpus: 1-D int64 streams and the positions where windows may start."""

    tokenizer: Any
    train: torch.Tensor
    val: torch.Tensor
    train_starts: torch.Tensor
    val_starts: torch.Tensor
    corpus_hash: str
    n_chars: int
    n_lines: int | None


def resolve_corpus(config: TrainConfig) -> TrainConfig:
    """``config`` with a corpus path made absolute (built-in names stay)."""
    if config.corpus in BUILTIN_CORPORA:
        return config
    path = Path(config.corpus).expanduser().resolve()
    return config.model_copy(update={"corpus": str(path)})


def load_text(config: TrainConfig) -> str:
    """The corpus text; one-line errors for a missing or unreadable file."""
    text = load_corpus(config.corpus, seed=config.corpus_seed)
    if not text.strip():
        raise ValueError(f"corpus {config.corpus} is empty")
    return text


def train_tokenizer(config: TrainConfig, text: str) -> Any:
    """A tokenizer of the configured kind trained on the whole corpus ``text``."""
    from sparselens.lm.tokenizers import BPETokenizer, CharTokenizer

    if config.tokenizer == "char":
        return CharTokenizer.train(text, lowercase=config.lowercase)
    return BPETokenizer.train(text, vocab_size=config.bpe_vocab_size)


def _stream(pieces: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token lists; return the stream and the start offset of each piece."""
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    flat = [i for p in pieces for i in p]
    return torch.tensor(flat, dtype=torch.long), offsets


def _window_starts(candidates: torch.Tensor, n_tokens: int, context_len: int) -> torch.Tensor:
    return candidates[candidates + context_len + 1 <= n_tokens]


def prepare_data(config: TrainConfig, text: str, tokenizer: Any) -> CorpusData:
    """Split and tokenise ``text`` (see the module docstring)."""
    ctx = config.context_len
    n_lines = None
    if config.line_mode:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        n_lines = len(lines)
        if n_lines < 2:
            raise ValueError(
                f"corpus {config.corpus} has {n_lines} non-empty line(s); eos_per_line needs at "
                "least 2 (one for each split)"
            )
        n_val = min(max(1, round(n_lines * config.val_split)), n_lines - 1)
        enc = [tokenizer.encode(ln, add_eos=True) for ln in lines]
        train, train_cand = _stream(enc[:-n_val])
        val, val_cand = _stream(enc[-n_val:])
    else:
        cut = int(len(text) * (1 - config.val_split))
        train = torch.tensor(tokenizer.encode(text[:cut]), dtype=torch.long)
        val = torch.tensor(tokenizer.encode(text[cut:]), dtype=torch.long)
        train_cand = torch.arange(train.numel())
        val_cand = torch.arange(val.numel())
    data = CorpusData(
        tokenizer=tokenizer,
        train=train,
        val=val,
        train_starts=_window_starts(train_cand, train.numel(), ctx),
        val_starts=_window_starts(val_cand, val.numel(), ctx),
        corpus_hash=corpus_hash(text),
        n_chars=len(text),
        n_lines=n_lines,
    )
    for split in ("train", "val"):
        if getattr(data, f"{split}_starts").numel() == 0:
            n = getattr(data, split).numel()
            raise ValueError(
                f"the {split} split has {n} tokens, too few for one window of context_len + 1 = "
                f"{ctx + 1} tokens; use a larger corpus, a smaller context_len or another "
                "val_split"
            )
    return data


def get_batch(
    stream: torch.Tensor,
    starts: torch.Tensor,
    batch_size: int,
    context_len: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``(batch_size, context_len)``, from random window starts."""
    pick = torch.randint(starts.numel(), (batch_size,), generator=generator)
    idx = starts[pick][:, None] + torch.arange(context_len + 1)
    windows = stream[idx]
    return windows[:, :-1], windows[:, 1:]


# -- schedule, optimiser, evaluation ------------------------------------------------------------
def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """``lr(i)`` for the i-th step (1-based): linear warm-up, then cosine decay."""
    total, warm = config.steps, config.warmup_steps
    warmup = Schedule(kind="linear", start=0.0, end=config.lr, end_frac=warm / total)
    decay = Schedule(
        kind="cosine",
        start=config.lr,
        end=config.lr * config.min_lr_ratio,
        start_frac=warm / total,
    )

    def lr(i: int) -> float:
        return warmup.at_step(i, total) if i <= warm else decay.at_step(i, total)

    return lr


def make_optimizer(model: MiniGPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of >= 2 dimensions only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


@torch.no_grad()
def evaluate(
    model: MiniGPT,
    stream: torch.Tensor,
    starts: torch.Tensor,
    config: TrainConfig,
    seed: int,
) -> float:
    """Mean cross-entropy (nats/token) over ``eval_batches`` batches fixed by ``seed``."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        for _ in range(config.eval_batches):
            x, y = get_batch(stream, starts, config.batch_size, config.context_len, g)
            total += float(cross_entropy(model(x), y))
    finally:
        model.train(was_training)
    return total / config.eval_batches


def ngram_baselines(data: CorpusData, vocab_size: int) -> dict[str, float]:
    """Validation cross-entropy (nats/token) of a unigram (add-one) and a bigram (add-0.1)
    model counted on the training stream: the bar a transformer should clear."""
    v = vocab_size
    train, val = data.train.numpy(), data.val.numpy()
    uni = np.bincount(train, minlength=v).astype(np.float64) + 1.0
    uni_lp = np.log(uni / uni.sum())
    unigram = float(-uni_lp[val].mean())
    pairs = np.bincount(train[:-1] * v + train[1:], minlength=v * v).astype(np.float64)
    counts = pairs.reshape(v, v)
    prev, nxt = val[:-1], val[1:]
    num = counts[prev, nxt] + _BIGRAM_ALPHA
    den = counts.sum(axis=1)[prev] + _BIGRAM_ALPHA * v
    bigram = float(-np.log(num / den).mean()) if prev.size else math.nan
    return {"unigram": unigram, "bigram": bigram}


# -- the run ------------------------------------------------------------------------------------
def train_lm(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    *,
    command: list[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume=True``, continue) a Mini-GPT in ``run_dir``; return the summary.

    ``on_checkpoint(step)`` is called after each checkpoint is on disk (tests stop runs there).
    Bad settings or inputs raise ValueError / FileNotFoundError before the run directory is
    created.
    """
    t_start = time.perf_counter()
    config = resolve_corpus(config)
    run_path = Path(run_dir)
    if resume and (done := check_resumable(run_path, config, _RESUMABLE_CHANGES)) is not None:
        return done
    text = load_text(config)
    from sparselens.lm.tokenizers import load_tokenizer

    tok_path = run_path / "checkpoints" / TOKENIZER_FILE
    tokenizer = (
        load_tokenizer(tok_path) if resume and tok_path.is_file() else train_tokenizer(config, text)
    )
    data = prepare_data(config, text, tokenizer)
    model_cfg = config.model_config_for(tokenizer.vocab_size)
    info = {
        "corpus": config.corpus,
        "corpus_hash": data.corpus_hash,
        "chars": data.n_chars,
        "lines": data.n_lines,
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(data.train.numel()),
        "val_tokens": int(data.val.numel()),
    }
    run = RunDir(run_path, resume=resume)
    if resume:
        old = run.read_manifest().get("data", {})
        if old.get("corpus_hash") not in (None, data.corpus_hash):
            raise ValueError(f"corpus {config.corpus} changed since the run started")
    else:
        run.write_config(config)
    if not tok_path.is_file():
        tokenizer.save(tok_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # before the manifest records the hardware
    try:
        run.start(kind="lm-train", seed=config.seed, command=command, extra={"data": info})
        try:
            summary = _train(config, model_cfg, data, run, on_checkpoint, t_start)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                run.finish(status, error=str(e) or type(e).__name__)
            except Exception:  # the manifest is best-effort here; keep the original error
                logger.debug("could not record status %s", status, exc_info=True)
            raise
    finally:
        torch.set_num_threads(threads)
    run.finish("completed", seconds_this_session=time.perf_counter() - t_start)
    return summary


def _train(
    config: TrainConfig,
    model_cfg: MiniGPTConfig,
    data: CorpusData,
    run: RunDir,
    on_checkpoint: Callable[[int], None] | None,
    t_start: float,
) -> dict[str, Any]:
    seed_everything(config.seed)
    model = MiniGPT(model_cfg)
    model.train()
    opt = make_optimizer(model, config)
    data_gen = torch.Generator().manual_seed(config.seed)
    lr_at = lr_schedule(config)
    done, acc_sum, acc_n, train_seconds = 0, 0.0, 0, 0.0

    latest = run.latest_checkpoint(CHECKPOINT_PREFIX) if run.resumed else None
    if latest is not None:
        state, done, meta = run.load_checkpoint(latest)
        weights = state["model"]
        model.load_state_dict({**weights, _TIED: weights["embed.weight"]})
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        data_gen.set_state(state["rng"]["data"])
        acc_sum, acc_n = float(state["acc"]["sum"]), int(state["acc"]["n"])
        train_seconds = float(meta.get("train_seconds", 0.0))
        logger.info("resuming %s from step %d (%s)", run.path, done, latest.name)
    run.rewrite_metrics([r for r in run.read_metrics() if r.get("step", 0) <= done])

    def checkpoint(step: int) -> None:
        state = {
            "model": {k: v for k, v in model.state_dict().items() if k != _TIED},
            "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state()},
            "acc": {"sum": acc_sum, "n": acc_n},
        }
        meta = {"train_seconds": train_seconds}
        run.save_checkpoint(state, step, meta=meta, prefix=CHECKPOINT_PREFIX)
        if on_checkpoint is not None:
            on_checkpoint(step)

    last_eval: dict[str, Any] = {}
    bar = progress_bar(config.steps, "train", enabled=config.progress, initial=done)
    t0 = time.perf_counter()
    try:
        for step in range(done + 1, config.steps + 1):
            lr = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch(
                data.train, data.train_starts, config.batch_size, config.context_len, data_gen
            )
            loss = cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            acc_sum += float(loss.detach())
            acc_n += 1
            records: list[dict[str, Any]] = []
            if step % config.log_every == 0 or step == config.steps:
                records.append({"phase": "train", "step": step, "loss": acc_sum / acc_n, "lr": lr})
                bar.set_postfix(loss=f"{acc_sum / acc_n:.3f}", refresh=False)
                acc_sum, acc_n = 0.0, 0
            if step % config.eval_interval == 0 or step == config.steps:
                last_eval = {
                    "phase": "eval",
                    "step": step,
                    "train_loss": evaluate(
                        model, data.train, data.train_starts, config, config.seed + 2
                    ),
                    "val_loss": evaluate(model, data.val, data.val_starts, config, config.seed + 1),
                }
                records.append(last_eval)
                logger.info(
                    "step %d/%d: train loss %.4f, val loss %.4f (nats/token)",
                    step,
                    config.steps,
                    last_eval["train_loss"],
                    last_eval["val_loss"],
                )
            run.append_metrics(records)
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == config.steps:
                train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(step)
    finally:
        bar.close()
    train_seconds += time.perf_counter() - t0

    model.eval()
    if not last_eval:  # resumed after the last checkpoint: evaluate the final weights again
        last_eval = {
            "step": config.steps,
            "train_loss": evaluate(model, data.train, data.train_starts, config, config.seed + 2),
            "val_loss": evaluate(model, data.val, data.val_starts, config, config.seed + 1),
        }
    baselines = ngram_baselines(data, model_cfg.vocab_size)
    completions = sample_completions(model, data.tokenizer, config)
    first = first_step(model, data.tokenizer, REPORT_PROMPTS[0])
    summary = {
        "run_dir": str(run.path),
        "final_dir": str(run.path / "final"),
        "parameters": model.num_parameters(),
        "model": model_cfg.model_dump(mode="json"),
        "data": {
            "corpus": config.corpus,
            "corpus_hash": data.corpus_hash,
            "tokenizer": config.tokenizer,
            "vocab_size": model_cfg.vocab_size,
            "train_tokens": int(data.train.numel()),
            "val_tokens": int(data.val.numel()),
        },
        "steps": config.steps,
        "tokens_seen": config.steps * config.batch_size * config.context_len,
        "train_loss": last_eval["train_loss"],
        "val_loss": last_eval["val_loss"],
        "val_perplexity": math.exp(last_eval["val_loss"]),
        "baselines": baselines,
        "first_step": first,
        "completions": completions,
        "train_seconds": train_seconds,
        "seconds_total": time.perf_counter() - t_start,
    }
    extra = {
        "made_by": "sparselens lm train",
        "step": config.steps,
        "seed": config.seed,
        "corpus": Path(config.corpus).name
        if config.corpus not in BUILTIN_CORPORA
        else config.corpus,
        "corpus_hash": data.corpus_hash,
        "train_loss": last_eval["train_loss"],
        "val_loss": last_eval["val_loss"],
        "eos_per_line": config.line_mode,
    }
    from sparselens.lm.checkpoint import save_checkpoint as save_model

    metrics = run.read_metrics()
    with run.staging() as stage:
        save_model(stage / "final", model, data.tokenizer, extra=extra)
        _plot_loss(stage / "plots" / "loss.png", metrics, baselines, config)
        atomic_write_json(stage / "summary.json", summary)
        atomic_write_text(stage / RunDir.REPORT, _report(config, summary))
    logger.info("wrote %s", run.path)
    return summary


# -- completions and report ---------------------------------------------------------------------
def first_step(model: MiniGPT, tokenizer: Any, prompt: str, top: int = 8) -> dict[str, Any]:
    """The next-token distribution after ``prompt``: entropy (bits) and the ``top`` tokens."""
    from sparselens.core.softmax import entropy, softmax
    from sparselens.lm.generate import next_token_logits

    ids = tokenizer.encode(prompt)[-model.config.context_len :]
    logits = next_token_logits(model, ids)
    q = softmax(logits)
    vals, idx = torch.topk(q, min(top, q.numel()))
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "entropy_bits": float(entropy(logits)),
        "top": [
            {"token": tokenizer.id_to_token(int(i)), "id": int(i), "p": float(v)}
            for v, i in zip(vals, idx, strict=True)
        ],
    }


def sample_completions(
    model: MiniGPT, tokenizer: Any, config: TrainConfig, n_sampled: int = 3
) -> list[dict[str, Any]]:
    """Greedy and temperature-1 completions (seeds ``0 .. n_sampled - 1``) of the report
    prompts; a line-mode model stops at ``<eos>``."""
    from sparselens.lm.generate import generate
    from sparselens.lm.sampling import Greedy, Temperature

    max_tokens = 12 if config.tokenizer == "bpe" else 48
    eos = tokenizer.eos_id if config.line_mode else ()
    out = []
    for prompt in REPORT_PROMPTS:
        ids = tokenizer.encode(prompt)
        runs = [("greedy", 0, Greedy())] + [
            ("tau=1", s, Temperature(1.0)) for s in range(n_sampled)
        ]
        for name, seed, strategy in runs:
            new = generate(model, ids, max_tokens, seed, strategy, eos_id=eos)
            out.append(
                {
                    "prompt": prompt,
                    "strategy": name,
                    "seed": seed,
                    "completion": tokenizer.decode(new),
                }
            )
    return out


def _plot_loss(
    path: Path, metrics: list[dict[str, Any]], baselines: dict[str, float], config: TrainConfig
) -> None:
    from matplotlib.figure import Figure

    train = [r for r in metrics if r.get("phase") == "train"]
    evals = [r for r in metrics if r.get("phase") == "eval"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    if train:
        label = f"train (mean of {config.log_every} steps)"
        ax.plot(
            [r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.6, label=label
        )
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["train_loss"] for r in evals], "o-", ms=3, label="train (eval)")
        ax.plot(steps, [r["val_loss"] for r in evals], "s-", ms=3, label="validation")
    styles = {"unigram": ":", "bigram": "--"}
    for name, value in baselines.items():
        if math.isfinite(value):
            label = f"{name} baseline (val) {value:.3f}"
            ax.axhline(value, color="grey", ls=styles[name], lw=1, label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Mini-GPT training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


def _md(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"


def _report(config: TrainConfig, s: dict[str, Any]) -> str:
    d, m, b = s["data"], s["model"], s["baselines"]
    fs = s["first_step"]
    lines = [
        "# Mini-GPT training run",
        "",
        f"Run directory: `{s['run_dir']}`; final checkpoint: `final/` "
        "(model.safetensors, config.json, tokenizer.json).",
        "",
        "## Setup",
        "",
        f"- corpus `{d['corpus']}` (sha256 {d['corpus_hash'][:16]}…), "
        f"{'one sequence per line, ending in <eos>' if config.line_mode else 'one text stream'}; "
        f"{d['train_tokens']:,} train / {d['val_tokens']:,} validation tokens",
        f"- tokenizer `{d['tokenizer']}`, vocabulary {d['vocab_size']}",
        f"- model: d_model {m['d_model']}, {m['n_heads']} heads, {m['n_layers']} layers, d_ff "
        f"{m['d_ff']}, context {m['context_len']}, RoPE, tied head: **{s['parameters']:,} "
        "parameters**",
        f"- AdamW lr {config.lr:g} (warm-up {config.warmup_steps}, cosine to "
        f"{config.lr * config.min_lr_ratio:g}), weight decay {config.weight_decay:g}, clip "
        f"{config.grad_clip:g}, batch {config.batch_size} x {config.context_len}, "
        f"{s['steps']} steps ({s['tokens_seen']:,} tokens), seed {config.seed}, "
        f"{config.threads} thread(s)",
        "",
        "## Result",
        "",
        "| | train | validation |",
        "|---|---|---|",
        f"| loss (nats/token) | {s['train_loss']:.4f} | {s['val_loss']:.4f} |",
        f"| perplexity | {math.exp(s['train_loss']):.3f} | {s['val_perplexity']:.3f} |",
        "",
        f"Baselines on the validation split: unigram {b['unigram']:.4f}, bigram (add-0.1) "
        f"{b['bigram']:.4f} nats/token.",
        "",
        f"Next token after {_md(fs['prompt'])} (τ = 1): entropy {fs['entropy_bits']:.3f} bits; "
        + ", ".join(f"{_md(t['token'])} {t['p']:.3f}" for t in fs["top"][:6]),
        "",
        "## Completions",
        "",
        "| prompt | strategy | seed | completion |",
        "|---|---|---|---|",
    ]
    for c in s["completions"]:
        lines.append(
            f"| {_md(c['prompt'])} | {c['strategy']} | {c['seed']} | {_md(c['completion'])} |"
        )
    lines += [
        "",
        f"Training time {s['train_seconds']:.1f} s (this session: {s['seconds_total']:.1f} s).",
        "",
        "![loss](plots/loss.png)",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "BUILTIN_CORPORA",
    "CorpusData",
    "TrainConfig",
    "evaluate",
    "first_step",
    "get_batch",
    "lr_schedule",
    "ngram_baselines",
    "prepare_data",
    "sample_completions",
    "train_lm",
    "train_tokenizer",
]
