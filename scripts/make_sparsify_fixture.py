"""Create the tiny sparsify checkpoints under ``tests/sae/fixtures/sparsify_tiny/``.

Run with a Python that has EleutherAI sparsify (``eai-sparsify``, tested with 1.3.3) installed,
e.g. ``.cache/bench-sparsify-venv/bin/python scripts/make_sparsify_fixture.py``. For each fixture
``<name>`` it writes ``<name>/cfg.json`` and ``<name>/sae.safetensors`` with sparsify's own
``save_to_disk`` and ``<name>/reference.safetensors`` holding an input batch ``x`` (16 x 8), the
target ``y`` and sparsify's forward outputs (``sae_out``, ``latent_acts``, ``latent_indices``,
``fvu``) on the CPU, so that ``tests/sae/test_sae_checkpoint.py`` can check
``sparselens.sae.checkpoint.load_sparse_coder`` against sparsify without sparsify installed.

Fixtures: ``sae`` (d_in 8, 32 latents, k 4) and ``transcoder`` (same sizes, ``transcode`` and
``skip_connection``). Biases are randomised so that they are non-zero, and the script checks
that every row's k-th and (k+1)-th pre-activations are positive and well separated, so the
top-k sets are unambiguous.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

D_IN, NUM_LATENTS, K, N_TOKENS = 8, 32, 4, 16
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests/sae/fixtures/sparsify_tiny"


def _check_unambiguous(sae: SparseCoder, x: torch.Tensor) -> None:
    x_in = x if sae.cfg.transcode else x - sae.b_dec
    pre = torch.relu(x_in @ sae.encoder.weight.T + sae.encoder.bias)
    top = pre.topk(K + 1, dim=1).values
    gap = (top[:, K - 1] - top[:, K]).min().item()
    if top[:, K - 1].min().item() <= 1e-3 or gap <= 1e-4:
        raise SystemExit(f"ambiguous top-k (min k-th act {top[:, K - 1].min():.2e}, gap {gap:.2e})")


def make(name: str, out: Path, seed: int, transcode: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = SparseCoderConfig(
        num_latents=NUM_LATENTS, k=K, transcode=transcode, skip_connection=transcode
    )
    sae = SparseCoder(D_IN, cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sae.encoder.bias.copy_(0.5 + 0.5 * torch.rand(NUM_LATENTS, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        if transcode:  # sparsify zero-initialises W_dec and W_skip of transcoders
            sae.W_dec.copy_(torch.randn(NUM_LATENTS, D_IN, generator=g) / D_IN**0.5)
            sae.W_skip.copy_(0.1 * torch.randn(D_IN, D_IN, generator=g))
    x = torch.randn(N_TOKENS, D_IN, generator=g)
    y = torch.randn(N_TOKENS, D_IN, generator=g) if transcode else x.clone()
    with torch.no_grad():
        _check_unambiguous(sae, x)
        res = sae(x, y if transcode else None)
    target = out / name
    sae.save_to_disk(target)
    save_file(
        {
            "x": x.contiguous(),
            "y": y.contiguous(),
            "sae_out": res.sae_out.float().contiguous(),
            "latent_acts": res.latent_acts.float().contiguous(),
            "latent_indices": res.latent_indices.long().contiguous(),
            "fvu": res.fvu.float().reshape(()).contiguous(),
        },
        str(target / "reference.safetensors"),
        metadata={
            "sparsify_version": importlib.metadata.version("eai-sparsify"),
            "torch_version": torch.__version__,
            "seed": str(seed),
        },
    )
    print(f"wrote {target} (fvu {res.fvu.item():.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root directory")
    args = ap.parse_args()
    make("sae", args.out, seed=0, transcode=False)
    make("transcoder", args.out, seed=1, transcode=True)


if __name__ == "__main__":
    main()
