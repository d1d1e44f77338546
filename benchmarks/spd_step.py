"""SPD training-step benchmark (TMS 5-2, ResidMLP-1L): sparselens.spd vs the reference's algorithm.

The workload (issue 5 §4, reference spd.md §12): the bundled TMS 5-2 target, batch 4096, C = 20
for ``linear1`` and its tied transpose ``linear2``, ``mlp`` CI functions [16], losses stochastic
recon 1 + layerwise recon 1 + L_p importance minimality (p = 1, coeff 3e-3), delta component on,
fp32, Adam. One step = learning rate, batch, losses, backward, optimiser step.

Goodfire's ``spd`` is not on PyPI (``param-decomp`` there is an empty placeholder), so the
comparison side is **a re-implementation of the reference's step, written in this file**
(:class:`RefComponentModel`, labelled "reference algorithm (re-implemented)" in the output). It
follows ``spd`` main's structure: forward hooks installed and removed on every forward (the target
module still computes its own output, which the hook then replaces); 1 + S + S·L sequential
forward passes per step (target with input caching, S = 1 fully masked pass, S·L = 2 layerwise
passes); the weight delta recomputed each step and applied as an extra dense matmul; the
per-component CI MLP as one einsum; the tied TMS weights as two Parameters sharing storage, each
with its own Adam state (sheet §13 #6); ``.item()`` on every loss term each step (sheet §13 #13).
The sheet's measured numbers for the real reference code on a 2-core CPU, 55–70 ms per step
(61 ms with 1 thread, 56 ms with 2), are printed beside it for scale.

``--target resid_mlp1`` times the ResidMLP-1L step instead (the bundled config: batch 2048, C = 100
per matrix, ``mlp`` CI [16], stochastic 1 + layerwise 1 + L_p p = 2, coeff 1e-5; the sheet's
reference: 416 ms with 1 thread, 242 ms with 2; no recovery run); ``--target tms_40-10`` the
TMS 40-10 step (batch 4096, C = 200, L_p p = 2, coeff 1e-4; the sheet: 1237 / 596 ms).

Each (implementation, threads) measurement runs in a fresh subprocess (``--worker``); runs
alternate reference, sparselens, ... for ``--rounds`` rounds; the table reports the median step
time over rounds (min–max). Then, unless ``--no-recovery``, the time to recovery: a full
``sparselens spd run tms_5-2`` (and ``tms_5-2_id``) with its final metrics.

    python benchmarks/spd_step.py                   # 3 rounds, 1 and 2 threads, recovery
    python benchmarks/spd_step.py --quick           # 1 round, 1 thread, no recovery
    python benchmarks/spd_step.py --target resid_mlp1 --rounds 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "spd_step.json"
IMPLS = ("reference", "sparselens")
GOAL_RATIO = 3.0
GOAL_RECOVERY_S = 120.0
# per target: batch, C, CI hidden width, L_p coeff and p, decomposed layers, the sheet's ms/step
WORKLOADS: dict[str, dict[str, Any]] = {
    "tms_5-2": {
        "batch": 4096, "C": 20, "hidden": 16, "imp_coeff": 3e-3, "p": 1.0,
        "layers": ["linear1", "linear2"], "sheet_ms": {"1": 61.0, "2": 56.0},
    },
    "tms_40-10": {
        "batch": 4096, "C": 200, "hidden": 16, "imp_coeff": 1e-4, "p": 2.0,
        "layers": ["linear1", "linear2"], "sheet_ms": {"1": 1237.0, "2": 596.0},
    },
    "resid_mlp1": {
        "batch": 2048, "C": 100, "hidden": 16, "imp_coeff": 1e-5, "p": 2.0,
        "layers": ["layers.0.mlp_in", "layers.0.mlp_out"], "sheet_ms": {"1": 416.0, "2": 242.0},
    },
}  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the reference algorithm, re-implemented ----------------------------------------------------
def _reference_classes() -> dict[str, Any]:
    """Build the reference-style classes lazily (torch imported only in workers)."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    class LowerLeakyHard(torch.autograd.Function):
        """spd main's lower_leaky_hard_sigmoid: clamp forward, one-sided 0.01 leak backward."""

        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            ctx.save_for_backward(x)
            return x.clamp(0.0, 1.0)

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> Tensor:
            (x,) = ctx.saved_tensors
            inside = (x > 0) & (x <= 1)
            below = (x <= 0) & (g < 0)
            return torch.where(inside, g, torch.where(below, 0.01 * g, torch.zeros_like(g)))

    def upper_leaky_hard(x: Tensor) -> Tensor:
        return torch.where(x > 1, 1 + 0.01 * (x - 1), x.clamp(0.0, 1.0))

    class LinearComponents(nn.Module):
        def __init__(self, C: int, d_in: int, d_out: int, bias: Tensor | None) -> None:
            super().__init__()
            self.V = nn.Parameter(torch.empty(d_in, C))
            self.U = nn.Parameter(torch.empty(C, d_out))
            nn.init.kaiming_normal_(self.V, nonlinearity="linear", mode="fan_in")
            nn.init.normal_(self.U, std=1.0 / C**0.5)
            self.register_buffer("bias", bias)

        @property
        def weight(self) -> Tensor:
            return (self.V @ self.U).T

        def forward(
            self, x: Tensor, mask: Tensor | None, delta: tuple[Tensor, Tensor] | None
        ) -> Tensor:
            acts = x @ self.V
            out = (acts * mask if mask is not None else acts) @ self.U
            if delta is not None:
                w_delta, d_mask = delta
                out = out + torch.einsum("...i,oi->...o", x, w_delta) * d_mask[..., None]
            return out + self.bias if self.bias is not None else out

    class MLPCiFn(nn.Module):
        """C independent 1 -> h -> 1 GELU MLPs on the component acts, as einsums."""

        def __init__(self, C: int, hidden: int) -> None:
            super().__init__()
            self.W1 = nn.Parameter(torch.empty(C, 1, hidden))
            self.b1 = nn.Parameter(torch.zeros(C, hidden))
            self.W2 = nn.Parameter(torch.empty(C, hidden, 1))
            self.b2 = nn.Parameter(torch.zeros(C, 1))
            nn.init.kaiming_normal_(self.W1, nonlinearity="relu")
            nn.init.kaiming_normal_(self.W2, nonlinearity="linear")

        def forward(self, acts: Tensor) -> Tensor:
            h = torch.einsum("...ci,cih->...ch", acts[..., None], self.W1) + self.b1
            h = F.gelu(h)
            return (torch.einsum("...ch,cho->...co", h, self.W2) + self.b2)[..., 0]

    def k(name: str) -> str:  # ModuleDict keys cannot contain dots
        return name.replace(".", "-")

    class RefComponentModel(nn.Module):
        """Hooks installed per forward; target modules run and get their output replaced."""

        def __init__(self, target: nn.Module, names: list[str], C: int, hidden: int) -> None:
            super().__init__()
            self.target = target
            self.names = names
            self.components = nn.ModuleDict()
            self.ci_fns = nn.ModuleDict()
            for n in names:
                m = target.get_submodule(n)
                d_out, d_in = m.weight.shape
                b = m.bias.detach().clone() if m.bias is not None else None
                self.components[k(n)] = LinearComponents(C, d_in, d_out, b)
                self.ci_fns[k(n)] = MLPCiFn(C, hidden)

        def target_weight(self, n: str) -> Tensor:
            return self.target.get_submodule(n).weight

        def weight_deltas(self) -> dict[str, Tensor]:
            return {n: self.target_weight(n) - self.components[k(n)].weight for n in self.names}

        def forward(
            self,
            x: Tensor,
            masks: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] | None = None,
            cache: dict[str, Tensor] | None = None,
        ) -> Tensor:
            handles = []
            names = list(masks) if masks else self.names
            for n in names:
                module = self.target.get_submodule(n)

                def hook(mod: nn.Module, args: Any, output: Tensor, n: str = n) -> Any:
                    if cache is not None:
                        cache[n] = args[0]
                    if masks is None:
                        return None
                    mask, delta = masks[n]
                    return self.components[k(n)](args[0], mask, delta)

                handles.append(module.register_forward_hook(hook))
            try:
                return self.target(x)
            finally:
                for h in handles:
                    h.remove()

        def causal_importance(self, cache: dict[str, Tensor]) -> tuple[dict, dict]:
            lower, upper = {}, {}
            for n in self.names:
                acts = cache[n] @ self.components[k(n)].V
                z = self.ci_fns[k(n)](acts)
                lower[n] = LowerLeakyHard.apply(z)
                upper[n] = upper_leaky_hard(z)
            return lower, upper

    class TMSTarget(nn.Module):
        """``ReLU(linear2(linear1(x)))``, linear2.weight a copy of linear1.weight.T."""

        def __init__(self, w1: Tensor, b2: Tensor) -> None:
            super().__init__()
            n_h, n_f = w1.shape
            self.linear1 = nn.Linear(n_f, n_h, bias=False)
            self.linear2 = nn.Linear(n_h, n_f, bias=True)
            with torch.no_grad():
                self.linear1.weight.copy_(w1)
                self.linear2.weight.copy_(w1.T)
                self.linear2.bias.copy_(b2)
            for p in self.parameters():
                p.requires_grad_(False)

        def forward(self, x: Tensor) -> Tensor:
            return F.relu(self.linear2(self.linear1(x)))

    def ref_step(
        model: RefComponentModel, opt: Any, x: Tensor, imp_coeff: float, p: float
    ) -> dict[str, float]:
        """One step of spd main's optimize loop (no eval, fp32)."""
        deltas = model.weight_deltas()
        cache: dict[str, Tensor] = {}
        with torch.no_grad():
            target_out = model(x, masks=None, cache=cache)
        lower, upper = model.causal_importance(cache)
        losses: dict[str, Tensor] = {}
        # stochastic recon: all layers masked, delta component with its own U(0,1) mask
        masks = {}
        for n in model.names:
            g = lower[n]
            m = g + (1 - g) * torch.rand_like(g)
            masks[n] = (m, (deltas[n], torch.rand(g.shape[:-1])))
        out = model(x, masks=masks)
        losses["stochastic_recon"] = ((out - target_out) ** 2).mean()
        # layerwise: one layer replaced at a time, one pass each
        total_lw = torch.zeros(())
        for n in model.names:
            g = lower[n]
            m = g + (1 - g) * torch.rand_like(g)
            out = model(x, masks={n: (m, (deltas[n], torch.rand(g.shape[:-1])))})
            total_lw = total_lw + ((out - target_out) ** 2).mean()
        losses["layerwise_recon"] = total_lw / len(model.names)
        imp = torch.zeros(())
        for n in model.names:
            n_pos = upper[n].shape[0]
            imp = imp + ((upper[n] + 1e-12) ** p).sum(dim=0).div(n_pos).sum()
        losses["importance_minimality"] = imp
        total = losses["stochastic_recon"] + losses["layerwise_recon"] + imp_coeff * imp
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return {k: v.item() for k, v in losses.items()}  # the reference logs every term

    return {"RefComponentModel": RefComponentModel, "TMSTarget": TMSTarget, "ref_step": ref_step}


def _reference_setup(seed: int, target: str) -> Any:
    """Reference-style model and optimiser on the bundled target; returns a step closure."""
    import torch

    from sparselens.spd.tasks import load_task

    w = WORKLOADS[target]
    task = load_task(target)
    cls = _reference_classes()
    torch.manual_seed(seed)
    if target.startswith("tms"):
        tgt = task.target
        module = cls["TMSTarget"](tgt.linear1.weight.detach(), tgt.linear2.bias.detach())
    else:
        module = task.target  # frozen ResidMLP, plain nn.Linear layers
    model = cls["RefComponentModel"](module, w["layers"], w["C"], w["hidden"])
    if target.startswith("tms"):  # the tie: linear2's U/V .data become views of linear1's
        c1, c2 = model.components["linear1"], model.components["linear2"]
        c2.V.data = c1.U.data.T
        c2.U.data = c1.V.data.T
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        x = task.sample(w["batch"], gen)
        cls["ref_step"](model, opt, x, w["imp_coeff"], w["p"])

    return step


def _sparselens_setup(seed: int, target: str) -> Any:
    from sparselens.spd.config import load_config
    from sparselens.spd.tasks import load_task
    from sparselens.spd.trainer import SPDTrainer

    w = WORKLOADS[target]
    config = load_config(
        target, seed=seed, batch_size=w["batch"], steps=10_000, ci_hidden=[w["hidden"]]
    )
    trainer = SPDTrainer(config, load_task(target))

    def step() -> None:
        trainer.train_step()
        if trainer.step % 100 == 0:
            trainer.pop_log()

    return step


def worker(
    impl: str, target: str, threads: int, warmup: int, steps: int, seed: int, out: Path
) -> None:
    import torch

    torch.set_num_threads(threads)
    setup = _reference_setup if impl == "reference" else _sparselens_setup
    step = setup(seed, target)
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out.write_text(
        json.dumps(
            {
                "impl": impl,
                "threads": threads,
                "median_step_ms": 1000 * statistics.median(times),
                "min_step_ms": 1000 * min(times),
                "median_cpu_step_ms": 1000 * statistics.median(cpu),
                "steps": steps,
            }
        )
    )


def run_worker(impl: str, threads: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{impl}-{threads}-{time.perf_counter_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, __file__, "--worker", impl, "--target", args.target,
        "--threads", str(threads),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
        "--worker-out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def recovery(name: str, threads: int, tmp: Path) -> dict[str, Any]:
    """A full bundled run; wall time and the final metrics that judge recovery."""
    from sparselens.spd.config import load_config
    from sparselens.spd.run import run_spd

    config = load_config(name, threads=threads, progress=False)
    t0 = time.perf_counter()
    s = run_spd(config, tmp / f"run-{name}")
    wall = time.perf_counter() - t0
    keys = ("mmcs", "ml2r", "identity_ci_error", "dense_ci_error", "ci_error_total",
            "identity_ci_error_0p2", "non_negligible", "ci_l0", "recon", "step_ms",
            "train_seconds", "wall_seconds")  # fmt: skip
    return {"config": name, "steps": config.steps, "process_wall_s": wall} | {
        k: s[k] for k in keys if k in s
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| implementation | threads | ms/step, median (min–max) | speed-up vs reference |",
        "|---|---|---|---|",
    ]
    for t, per in results["steps"].items():
        ref = per.get("reference")
        for impl in IMPLS:
            if impl not in per:
                continue
            s = per[impl]["step_ms"]
            label = "reference algorithm (re-implemented)" if impl == "reference" else impl
            ratio = f"**{ref['step_ms']['median'] / s['median']:.2f}×**" if ref else "—"
            if impl == "reference":
                ratio = "1×"
            lines.append(
                f"| {label} | {t} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | {ratio} |"
            )
        sheet = results["reference_sheet_ms"].get(t)
        if sheet is not None and "sparselens" in per:
            r = sheet / per["sparselens"]["step_ms"]["median"]
            lines.append(
                f"| reference `spd` main (sheet §12, measured there) | {t} | {sheet:.0f} | "
                f"sparselens {r:.2f}× faster (goal ≥ {GOAL_RATIO:g}×) |"
            )
    out = "\n".join(lines)
    for r in results.get("recovery", []):
        out += (
            f"\n\nrecovery {r['config']} ({r['steps']} steps): {r['wall_seconds']:.1f} s run wall "
            f"(goal < {GOAL_RECOVERY_S:.0f} s), {r['step_ms']:.1f} ms/step; MMCS "
            f"{r['mmcs']:.5f}, ML2R {r['ml2r']:.4f}, non-negligible {r['non_negligible']}, "
            f"one-hot CI errors {r['identity_ci_error']} {r.get('dense_ci_error', {})}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (3; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (30; quick 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (1,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=sorted(WORKLOADS), default="tms_5-2")
    p.add_argument("--quick", action="store_true", help="1 round, 10 steps, 1 thread, no recovery")
    p.add_argument("--no-recovery", action="store_true", help="skip the time-to-recovery runs")
    p.add_argument("--recovery-configs", default="tms_5-2,tms_5-2_id")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(
            args.worker, args.target, int(args.threads), args.warmup, args.steps, args.seed,
            args.worker_out,
        )  # fmt: skip
        return 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (10 if args.quick else 30)
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    stem = "spd_step" if args.target == "tms_5-2" else f"spd_step-{args.target}"
    output = args.output or DEFAULT_OUTPUT.with_name(f"{stem}{'-quick' if args.quick else ''}.json")
    w = WORKLOADS[args.target]
    sheet_ms = w["sheet_ms"]
    results: dict[str, Any] = {
        "workload": {
            "target": f"{args.target} (bundled)", "batch_size": w["batch"], "C": w["C"],
            "ci": f"mlp [{w['hidden']}]",
            "losses": f"stochastic 1 + layerwise 1 + L_p (p={w['p']:g}, coeff {w['imp_coeff']:g}),"
            " delta on",
            "dtype": "float32",
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "reference_sheet_ms": sheet_ms,
        "rounds": args.rounds, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "steps": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="spd-bench-") as td:
        tmp = Path(td)
        for t in threads:
            runs: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            for r in range(args.rounds):
                for impl in IMPLS:
                    res = run_worker(impl, t, args, tmp)
                    runs[impl].append(res["median_step_ms"])
                    log(f"threads {t} round {r + 1}: {impl} {res['median_step_ms']:.1f} ms/step")
            results["steps"][str(t)] = {
                impl: {"step_ms": _stats(v), "runs_ms": v} for impl, v in runs.items()
            }
            ref, mine = (statistics.median(runs[i]) for i in IMPLS)
            results["steps"][str(t)]["speedup_vs_reimplementation"] = ref / mine
            if str(t) in sheet_ms:
                results["steps"][str(t)]["speedup_vs_sheet"] = sheet_ms[str(t)] / mine
        if not (args.quick or args.no_recovery or args.target != "tms_5-2"):
            import torch

            torch.set_num_threads(1)
            results["recovery"] = []
            for name in args.recovery_configs.split(","):
                log(f"recovery run {name} ...")
                results["recovery"].append(recovery(name, 1, tmp))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
