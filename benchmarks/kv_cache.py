"""KV-cache benchmark: greedy decoding with the Mini-GPT key/value cache vs recomputing the prefix.

For each model size, a random-weight Mini-GPT (``context_len`` 512) decodes ``--new`` tokens
greedily after a ``--prompt``-token prompt, (a) with :class:`sparselens.lm.model.KVCache`: one
prefill call, then one single-token call per step; (b) without: every step runs the whole prefix
again. The two alternate for ``--rounds`` rounds after a warm-up; the time per generated token
(median over rounds) and the ratio go to stdout as a markdown table, everything to ``--output``
(JSON). Both paths must produce the same tokens (reported).

    python benchmarks/kv_cache.py                 # default + teaching sizes, 256 tokens, 5 rounds
    python benchmarks/kv_cache.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparselens.lm.model import MiniGPT, MiniGPTConfig
from sparselens.train.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "kv_cache.json"
SIZES: dict[str, dict[str, int]] = {
    "default (4L, d128)": {},
    "teaching (2L, d64)": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.inference_mode()
def decode_cached(model: MiniGPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens: prefill the prompt into a cache, then one token per call."""
    cache = model.new_cache(batch_size=prompt.shape[0])
    logits = model(prompt, cache=cache)[:, -1]
    out = []
    for i in range(n):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        if i + 1 < n:
            logits = model(tok, cache=cache)[:, -1]
    return torch.cat(out, dim=1)


@torch.inference_mode()
def decode_recompute(model: MiniGPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens, each from a forward pass over the whole sequence so far."""
    seq = prompt
    for _ in range(n):
        tok = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
    return seq[:, prompt.shape[1] :]


def timed(fn: Any, *args: Any) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_size(name: str, dims: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    cfg = MiniGPTConfig(vocab_size=args.vocab, context_len=args.context, **dims)
    model = MiniGPT(cfg).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    decode_cached(model, prompt, 8)  # warm-up (lazy init, allocator)
    decode_recompute(model, prompt, 8)
    times: dict[str, list[float]] = {"cache": [], "recompute": []}
    same = True
    for r in range(args.rounds):
        t_c, tok_c = timed(decode_cached, model, prompt, args.new)
        t_r, tok_r = timed(decode_recompute, model, prompt, args.new)
        same = same and torch.equal(tok_c, tok_r)
        times["cache"].append(1e3 * t_c / args.new)
        times["recompute"].append(1e3 * t_r / args.new)
        log(
            f"{name} round {r + 1}: cache {times['cache'][-1]:.3f}, recompute "
            f"{times['recompute'][-1]:.3f} ms/token"
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "name": name,
        "config": cfg.model_dump(),
        "parameters": model.num_parameters(),
        "ms_per_token": times,
        "median_ms_per_token": med,
        "ratio": med["recompute"] / med["cache"],
        "same_tokens": same,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="generated tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--context", type=int, default=512, help="context_len of the models")
    p.add_argument("--vocab", type=int, default=65, help="vocab_size (65: character level)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 tokens, 2 rounds")
    p.add_argument("--output", type=Path, default=None, help="JSON results path")
    args = p.parse_args(argv)
    if args.quick:
        args.new, args.rounds = 64, 2
    if args.output is None:
        args.output = DEFAULT_OUTPUT.with_stem("kv_cache-quick") if args.quick else DEFAULT_OUTPUT
    if args.prompt + args.new > args.context:
        p.error(f"--prompt + --new must be <= --context ({args.context})")
    torch.set_num_threads(args.threads)

    results = [run_size(name, dims, args) for name, dims in SIZES.items()]

    print(
        f"Greedy decoding of {args.new} tokens after a {args.prompt}-token prompt "
        f"(context_len {args.context}, {args.threads} threads, median of {args.rounds} rounds)\n"
    )
    print(
        "| model | parameters | KV cache ms/token | recompute ms/token | speed-up | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        c, rc = r["ms_per_token"]["cache"], r["ms_per_token"]["recompute"]
        print(
            f"| {r['name']} | {r['parameters']:,} | {statistics.median(c):.3f} "
            f"({min(c):.3f}-{max(c):.3f}) | {statistics.median(rc):.3f} "
            f"({min(rc):.3f}-{max(rc):.3f}) | {r['ratio']:.1f}x | "
            f"{'yes' if r['same_tokens'] else 'no'} |"
        )
    doc = {
        "benchmark": "kv_cache",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    atomic_write_json(args.output, doc)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
