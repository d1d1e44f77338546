"""Benchmark worker: time full TopK SAE training steps of one library and write a JSON report.

Started by ``benchmarks/sae_step.py`` once per (library, mode) run, with the sparsify venv's
interpreter for ``--library sparsify`` and the sparselens venv's for ``--library sparselens``,
so that both libraries pay the same process start, import and thread conditions and the peak
RSS of one run is not polluted by another. It needs only torch and the library under test.

One step, as each library's trainer does it (sparsify 1.3.3 ``Trainer``; sparselens' order):

- sparsify: ``set_decoder_norm_to_unit_norm()`` (its trainer renormalises before every
  forward) -> ``forward(x, dead_mask=..., total_variance=...)`` -> ``fvu + auxk_alpha * auxk``
  -> backward -> ``remove_gradient_parallel_to_decoder_directions()`` -> Adam step -> zero grad.
- sparselens: ``forward(x, dead_mask=...)`` -> ``fvu + auxk_alpha * auxk`` -> backward ->
  ``remove_gradient_parallel_to_decoder_directions()`` -> Adam step -> zero grad ->
  ``set_decoder_norm_to_unit_norm()`` (after the step, so saved weights are unit-norm).

Both use ``torch.optim.Adam`` at sparsify's Adam default LR 2e-4 / sqrt(M / 2**14) (sparsify's
trainer uses torch Adam when bitsandbytes is absent). ``b_dec`` is set to the mean of the first
batch (sparsify's trainer does this at step 0). AuxK "off" passes ``dead_mask=None``.

Data: a pool of ``--settings.pool`` batches of Gaussian activations with structure (a rank-64
component, isotropic noise, a non-zero mean), generated from ``seed`` with a private
``torch.Generator``, cycled; the dead mask is a fixed seeded 10 % of the latents. Identical
on both sides.

Memory: Linux ``/proc/self/status``. After setup (model, data, optimiser, the step-0 loss
check) the worker records the current RSS (``VmRSS``) as the baseline and resets the
high-water mark (``echo 5 > /proc/self/clear_refs``); after warm-up + timed steps it reads
``VmHWM``. ``peak_rss_delta_mb`` = VmHWM - baseline: the step's working memory plus the Adam
moments allocated on the first step (equal on both sides, ~67 MB here). If clear_refs is not
writable the fallback is ``ru_maxrss`` after - ``ru_maxrss`` before (reported as the method).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("sparsify", "sparselens")
DIST = {"sparsify": "eai-sparsify", "sparselens": "sparselens"}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_data(s: dict[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(batches, dead_mask)``: structured Gaussian activations and a fixed 10 % dead mask."""
    g = torch.Generator().manual_seed(int(s["seed"]))
    d, n, m, rank = int(s["d_in"]), int(s["tokens"]), int(s["num_latents"]), 64
    basis = torch.randn(rank, d, generator=g) / math.sqrt(rank)
    scales = torch.linspace(3.0, 0.3, rank)  # a decaying spectrum
    mean = 0.5 * torch.randn(d, generator=g)
    batches = []
    for _ in range(int(s["pool"])):
        z = torch.randn(n, rank, generator=g) * scales
        x = z @ basis + 0.5 * torch.randn(n, d, generator=g) + mean
        batches.append(x.contiguous())
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=g)[: round(float(s["dead_frac"]) * m)]] = True
    return batches, dead


def build(library: str, s: dict[str, Any]) -> Any:
    d, m, k = int(s["d_in"]), int(s["num_latents"]), int(s["k"])
    if library == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        return SparseCoder(d, SparseCoderConfig(num_latents=m, k=k))
    from sparselens.sae import SparseCoder, SparseCoderConfig

    cfg = SparseCoderConfig(
        num_latents=m, k=k, auxk_alpha=float(s["auxk_alpha"]), k_aux=int(s["k_aux"])
    )
    return SparseCoder(d, cfg)


def make_step(library: str, sae: Any, opt: torch.optim.Optimizer, s: dict[str, Any]) -> Any:
    """The training step as a closure ``step(x, dead_mask) -> (fvu, auxk)`` (detached)."""
    alpha = float(s["auxk_alpha"])

    if library == "sparsify":

        def step(x: torch.Tensor, dead_mask: torch.Tensor | None) -> tuple[Any, Any]:
            sae.set_decoder_norm_to_unit_norm()
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x, dead_mask=dead_mask, total_variance=total_variance)
            loss = out.fvu + alpha * out.auxk_loss if dead_mask is not None else out.fvu
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.fvu.detach(), out.auxk_loss.detach()

    else:

        def step(x: torch.Tensor, dead_mask: torch.Tensor | None) -> tuple[Any, Any]:
            out = sae(x, dead_mask=dead_mask)
            fvu, auxk = out[3], out[4]
            loss = fvu + alpha * auxk if dead_mask is not None else fvu
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()
            return fvu.detach(), auxk.detach()

    return step


@torch.no_grad()
def loss_check(library: str, sae: Any, x: torch.Tensor, dead: torch.Tensor) -> dict[str, Any]:
    """Step-0 losses: the library's fvu/auxk, an independent FVU from ``sae_out``, and the AuxK
    under the other normalisation (sparsify: Var(y); sparselens default: Var(e)) for comparison."""
    if library == "sparsify":
        sae.set_decoder_norm_to_unit_norm()
    out = sae(x, dead_mask=dead)
    y_hat = out[0]
    sst = (x - x.mean(0)).pow(2).sum()
    sse = (x - y_hat).pow(2).sum()
    e = x - y_hat
    sse_c = (e - e.mean(0)).pow(2).sum()  # Var(e) as a sum: the residual normalisation
    res: dict[str, Any] = {
        "fvu": float(out[3]),
        "auxk_loss": float(out[4]),
        "fvu_from_sae_out": float(sse / sst),
        "l0_per_token": float((out[1] > 0).sum(-1).float().mean()),
    }
    if library == "sparsify":
        # sparsify divides the AuxK SSE by sum ||y - mean y||^2; rescaled to sum ||e - mean e||^2
        res["auxk_normalization"] = "target"
        res["auxk_loss_as_residual_norm"] = float(out[4] * sst / sse_c)
    else:
        cfg = sae.cfg
        res["auxk_normalization"] = getattr(cfg, "auxk_normalization", "?")
        if res["auxk_normalization"] == "residual":
            try:  # the same forward in sparselens' sparsify-compatibility mode
                cfg.auxk_normalization = "target"
                res["auxk_loss_target_mode"] = float(sae(x, dead_mask=dead)[4])
            except Exception as exc:  # a report, not a failure
                res["auxk_loss_target_mode"] = f"unavailable: {exc}"
            finally:
                cfg.auxk_normalization = "residual"
    return res


def run(library: str, s: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(int(s["seed"]))
    t_import = time.perf_counter()
    sae = build(library, s)
    build_s = time.perf_counter() - t_import
    batches, dead = make_data(s)
    with torch.no_grad():
        sae.b_dec.data = batches[0].mean(0).to(sae.b_dec.dtype)  # sparsify trainer, step 0
    check = loss_check(library, sae, batches[0], dead)
    lr = float(s["lr"]) if s.get("lr") else 2e-4 / (int(s["num_latents"]) / 2**14) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    step = make_step(library, sae, opt, s)
    mask = dead if s["auxk"] else None

    rss_base_kb = _status_kb("VmRSS")
    maxrss_before = _maxrss_kb()
    hwm_reset = _reset_hwm() and rss_base_kb is not None

    warmup, steps = int(s["warmup"]), int(s["steps"])
    wall, cpu, fvus, auxks = [], [], [], []
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        t, c = time.perf_counter(), time.process_time()
        fvu, auxk = step(x, mask)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        fvus.append(float(fvu))  # host sync after timing
        auxks.append(float(auxk))
        if i >= warmup:
            wall.append(dt)
            cpu.append(dc)

    if hwm_reset:
        peak_kb = _status_kb("VmHWM") or 0
        delta_kb, method = peak_kb - (rss_base_kb or 0), "VmHWM - VmRSS(baseline), clear_refs=5"
    else:
        peak_kb = _maxrss_kb()
        delta_kb, method = peak_kb - maxrss_before, "ru_maxrss after - before"
    med = statistics.median(wall)
    tokens = int(s["tokens"])
    dec_norm = sae.W_dec.detach().norm(dim=1)
    return {
        "library": library,
        "version": importlib.metadata.version(DIST[library]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "auxk": bool(s["auxk"]),
        "lr": lr,
        "build_s": build_s,
        "step_s": wall,
        "cpu_step_s": cpu,
        "median_step_s": med,
        "median_cpu_step_s": statistics.median(cpu),
        "tokens_per_s": tokens / med,
        "tokens_per_s_each": [tokens / w for w in wall],
        "fvu_per_step": fvus,
        "auxk_per_step": auxks,
        "step0": check,
        "decoder_row_norm_after": [float(dec_norm.min()), float(dec_norm.max())],
        "rss_baseline_mb": (rss_base_kb or 0) / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_rss_delta_mb": delta_kb / 1024,
        "memory_method": method,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=LIBRARIES, required=True)
    p.add_argument("--settings", required=True, help="JSON object of workload settings")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    result = run(a.library, json.loads(a.settings))
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
