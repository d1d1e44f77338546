"""TopK SAE training-step benchmark: sparselens.sae vs EleutherAI sparsify 1.3.3, side by side.

The workload (reference topk-sae.md §3.2): d_in 512, 8192 latents, k 32, 4096 tokens per step,
fp32, 2 torch threads, 10 % of the latents dead (a fixed mask), Adam. One step = forward, FVU
(+ AuxK, alpha 1/32, k_aux 256 = sparsify's d_in // 2) loss, backward, removal of the decoder
gradient parallel to the decoder rows, Adam step, decoder renormalisation. Two modes: AuxK on
(``dead_mask`` passed; sparsify's default ``auxk_alpha`` is 0, i.e. off, so it is set to 1/32
as in the reference measurements) and AuxK off (``dead_mask=None``).

Each (library, mode) runs in its own subprocess (``benchmarks/_sae_worker.py``): sparsify with a
separate venv (created once under ``.cache/bench-sparsify-venv``, or ``--sparsify-venv``),
sparselens with this interpreter; runs alternate sparsify, sparselens, ... for ``--rounds``
rounds. Warm-up steps are excluded; tokens/s is 4096 / the median step time of a run, and the
table reports the median over rounds (min–max over rounds). Peak memory is the process RSS
high-water mark over the steps minus the RSS after setup (see the worker's docstring).
A markdown table goes to stdout, progress to stderr, everything to ``--output`` (JSON), with the
1-minute load average before every run (the machine is shared: compare ratios, not absolute
numbers). Both sides use torch's defaults for their own code: sparsify's encoder GEMM is
``F.linear`` (MKL sgemm), sparselens' goes through oneDNN on CPU (``sparselens_onednn`` in the
JSON); ``SPARSELENS_ONEDNN=0 python benchmarks/sae_step.py --output ...`` measures without it.

    python benchmarks/sae_step.py                      # the full benchmark (a few minutes)
    python benchmarks/sae_step.py --quick              # 1 round, 3 steps: a smoke run
    python benchmarks/sae_step.py --libraries sparsify # one side only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _peers import TORCH_PIN, ensure_venv, log, probe, run_worker

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("_sae_worker.py")
DEFAULT_VENV = REPO / ".cache" / "bench-sparsify-venv"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "sae_step.json"
SPARSIFY_PIN = "eai-sparsify==1.3.3"
LIBRARIES = ("sparsify", "sparselens")
MODES = (("auxk", True), ("no-auxk", False))
# Goals (issue): sparselens / sparsify tokens/s ratio per mode; peak memory no higher.
GOALS = {"auxk": 2.5, "no-auxk": 1.5}


def _check(python: Path, library: str = "sparsify") -> dict[str, str] | None:
    """torch and library versions in ``python``'s environment, or None if it cannot import."""
    mod, dist = (
        ("sparsify", "eai-sparsify") if library == "sparsify" else ("sparselens.sae", "sparselens")
    )
    return probe(
        python,
        f"import json, importlib.metadata as m, torch; from {mod} import SparseCoder;"
        f"print(json.dumps({{'torch': torch.__version__, 'lib': m.version('{dist}')}}))",
    )


def ensure_sparsify_venv(venv: Path) -> Path:
    """Reuse or create the sparsify venv (torch pinned to 2.13.0); return its interpreter."""
    # the torch pin in the same resolve, so that eai-sparsify's deps cannot swap it
    python, found = ensure_venv(venv, "sparsify", [[TORCH_PIN, SPARSIFY_PIN]], _check)
    if not found["torch"].startswith("2.13.0") or found["lib"] != "1.3.3":
        raise RuntimeError(f"{venv}: need torch 2.13.0 and eai-sparsify 1.3.3, found {found}")
    return python


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def onednn_probe(python: Path) -> bool | None:
    """Whether sparselens' encoder GEMMs go through oneDNN in ``python``'s environment."""
    found = probe(
        python,
        "import json; from sparselens.sae import kernels;"
        "print(json.dumps({'onednn': kernels.use_onednn(None)}))",
    )
    return None if found is None else bool(found["onednn"])


def source_fingerprint() -> str | None:
    """sha256 over ``src/sparselens/sae/*.py`` (to tie results to one version of the code)."""
    files = sorted((REPO / "src" / "sparselens" / "sae").glob("*.py"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], libs: list[str]) -> dict[str, Any]:
    """Per (mode, library): tokens/s and peak-RSS statistics over rounds; the speed ratios."""
    out: dict[str, Any] = {}
    for mode, _ in MODES:
        m: dict[str, Any] = {}
        for lib in libs:
            mine = [r for r in runs if r["library"] == lib and r["mode"] == mode]
            if not mine:
                continue
            m[lib] = {
                "version": mine[-1]["version"],
                "tokens_per_s": _stats([r["tokens_per_s"] for r in mine]),
                "median_step_s": statistics.median(r["median_step_s"] for r in mine),
                "median_cpu_step_s": statistics.median(r["median_cpu_step_s"] for r in mine),
                "peak_rss_delta_mb": _stats([r["peak_rss_delta_mb"] for r in mine]),
                "peak_rss_mb": _stats([r["peak_rss_mb"] for r in mine]),
                "step0": mine[0]["step0"],
                "fvu_last": mine[-1]["fvu_per_step"][-1],
            }
        if "sparsify" in m and "sparselens" in m:
            sf, sl = m["sparsify"], m["sparselens"]
            ratio = sl["tokens_per_s"]["median"] / sf["tokens_per_s"]["median"]
            mem_ratio = sl["peak_rss_delta_mb"]["median"] / sf["peak_rss_delta_mb"]["median"]
            m["ratio_tokens_per_s"] = ratio
            m["ratio_peak_rss_delta"] = mem_ratio
            m["goal_ratio"] = GOALS[mode]
            m["goal_speed_met"] = ratio >= GOALS[mode]
            m["goal_memory_met"] = mem_ratio <= 1.0
        out[mode] = m
    return out


def _auxk_cell(s0: dict[str, Any]) -> str:
    """``auxk (its normalisation) / the other normalisation's value``."""
    other = s0.get("auxk_loss_as_residual_norm", s0.get("auxk_loss_target_mode"))
    other_s = f"{other:.4f}" if isinstance(other, float) else "—"
    norm = s0["auxk_normalization"]
    other_norm = "residual" if norm == "target" else "target"
    return f"{s0['auxk_loss']:.4f} ({norm}) / {other_s} ({other_norm})"


def step0_note(summary: dict[str, Any]) -> str | None:
    """Whether both sides compute the same step-0 FVU (same seed => same nn.Linear init)."""
    m = summary["auxk"]
    if "sparsify" not in m or "sparselens" not in m:
        return None
    a, b = m["sparsify"]["step0"], m["sparselens"]["step0"]
    tgt = b.get("auxk_loss_target_mode")
    aux = (
        f"; AuxK in Var(y) mode {tgt:.4f} vs sparsify {a['auxk_loss']:.4f}"
        if isinstance(tgt, float)
        else ""
    )
    return (
        f"step-0 check: FVU sparsify {a['fvu']:.5f} vs sparselens {b['fvu']:.5f} "
        f"(recomputed from sae_out: {a['fvu_from_sae_out']:.5f} / {b['fvu_from_sae_out']:.5f}){aux}"
    )


def table(
    summary: dict[str, Any], libs: list[str], rounds: int, load: list[float] | None = None
) -> str:
    """The markdown comparison table."""
    head = (
        "| library | mode | tokens/s, median (min–max) | ratio sparselens / sparsify "
        "| CPU s/step | peak RSS Δ MB, median (max) | step-0 FVU "
        "| step-0 AuxK: own norm. / other norm. |"
    )
    lines = [head, "|" + "---|" * 8]
    for mode, _ in MODES:
        m = summary[mode]
        for lib in libs:
            if lib not in m:
                continue
            s = m[lib]
            t = s["tokens_per_s"]
            tps = f"{t['median']:,.0f} ({t['min']:,.0f}–{t['max']:,.0f})"
            if lib == "sparselens" and "ratio_tokens_per_s" in m:
                ratio = f"**{m['ratio_tokens_per_s']:.2f}×** (goal ≥ {m['goal_ratio']}×)"
            else:
                ratio = "1×" if "ratio_tokens_per_s" in m else "—"
            mem = s["peak_rss_delta_mb"]
            s0 = s["step0"]
            lines.append(
                f"| {lib} {s['version']} | {mode} | {tps} | {ratio} "
                f"| {s['median_cpu_step_s']:.2f} | {mem['median']:,.0f} ({mem['max']:,.0f}) "
                f"| {s0['fvu']:.4f} "
                f"| {_auxk_cell(s0)} |"
            )
    notes = []
    for mode, _ in MODES:
        m = summary[mode]
        if "ratio_tokens_per_s" in m:
            speed = "met" if m["goal_speed_met"] else "NOT met"
            memory = "met" if m["goal_memory_met"] else "NOT met"
            cpu = m["sparsify"]["median_cpu_step_s"] / m["sparselens"]["median_cpu_step_s"]
            notes.append(
                f"{mode}: speed goal ≥ {m['goal_ratio']}× {speed} (CPU-time ratio {cpu:.2f}×), "
                f"peak-RSS Δ ratio "
                f"{m['ratio_peak_rss_delta']:.2f} (goal ≤ 1) {memory}"
            )
    if (note := step0_note(summary)) is not None:
        notes.append(note)
    if load is not None:
        notes.append(
            "1-minute load average before the runs: median "
            f"{statistics.median(load):.2f} (min {min(load):.2f}, max {max(load):.2f})"
        )
    notes.append(
        f"{rounds} alternating round(s); tokens/s per run = 4096 / median timed step, then "
        "median (min–max) over rounds; peak RSS Δ = VmHWM over warm-up + timed steps − RSS "
        "after setup (includes the Adam moments, ~67 MB, on both sides)"
    )
    return "\n".join(lines) + "\n\n" + ";\n".join(notes) + "."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sparselens.sae vs sparsify 1.3.3, one TopK SAE step.")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (3; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (10; --quick: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="1 round of 3 timed steps")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--num-latents", type=int, default=8192)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--dead-frac", type=float, default=0.10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in both workers")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    p.add_argument("--sparsify-venv", type=Path, default=DEFAULT_VENV, help="reuse/create here")
    p.add_argument("--python", type=Path, default=Path(sys.executable), help="sparselens python")
    p.add_argument("--output", type=Path, default=None, help=f"JSON (default {DEFAULT_OUTPUT})")
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    a.steps = a.steps if a.steps is not None else (3 if a.quick else 10)
    if a.output is None:
        a.output = DEFAULT_OUTPUT.with_stem("sae_step-quick") if a.quick else DEFAULT_OUTPUT
    if a.rounds < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--rounds, --steps and --threads must be >= 1, --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    libs = [lib for lib in LIBRARIES if lib in a.libraries]
    pythons: dict[str, Path] = {}
    if "sparsify" in libs:
        pythons["sparsify"] = ensure_sparsify_venv(a.sparsify_venv.resolve())
    if "sparselens" in libs:
        if _check(a.python, "sparselens") is None:
            log(
                "sparselens.sae.SparseCoder is not importable: running the sparsify side only "
                "(no ratios); fix sparselens.sae and rerun for the comparison"
            )
            libs.remove("sparselens")
        else:
            pythons["sparselens"] = a.python
    if not libs:
        raise SystemExit("no library to benchmark")
    base = {
        "d_in": a.d_in,
        "num_latents": a.num_latents,
        "k": a.k,
        "tokens": a.tokens,
        "dead_frac": a.dead_frac,
        "auxk_alpha": 1 / 32,
        "k_aux": a.d_in // 2,  # sparsify's fixed k_aux
        "lr": None,  # sparsify's Adam default 2e-4 / sqrt(M / 2**14), both sides
        "seed": a.seed,
        "pool": 4,
        "threads": a.threads,
        "warmup": a.warmup,
        "steps": a.steps,
    }
    fp_start = source_fingerprint()
    load_start = _loadavg()
    onednn = onednn_probe(pythons["sparselens"]) if "sparselens" in pythons else None
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sparselens-sae-bench-") as d:
        tmp = Path(d)
        for r in range(a.rounds):
            for mode, auxk in MODES:
                for lib in libs:
                    settings = {**base, "auxk": auxk}
                    load_before = _loadavg()
                    res = run_worker(
                        pythons[lib],
                        WORKER,
                        lib,
                        ["--settings", json.dumps(settings)],
                        settings["threads"],
                        tmp / f"{lib}-{mode}-{r}.json",
                    )
                    res["round"], res["mode"] = r, mode
                    res["loadavg_before"] = load_before
                    runs.append(res)
                    log(
                        f"round {r + 1}/{a.rounds} {mode:7s} {lib:10s}: "
                        f"{res['tokens_per_s']:,.0f} tokens/s "
                        f"(median step {res['median_step_s'] * 1000:.0f} ms, "
                        f"CPU {res['median_cpu_step_s'] * 1000:.0f} ms), "
                        f"peak RSS Δ {res['peak_rss_delta_mb']:,.0f} MB, "
                        f"step-0 fvu {res['step0']['fvu']:.4f} auxk {res['step0']['auxk_loss']:.4f}"
                    )
    fp_end = source_fingerprint()
    summary = summarise(runs, libs)
    loads = [r["loadavg_before"][0] for r in runs if r.get("loadavg_before")]
    md = table(summary, libs, a.rounds, loads or None)
    if "sparselens" in libs and fp_start != fp_end:
        md += (
            "\n\nWARNING: src/sparselens/sae changed during the run "
            f"({fp_start} -> {fp_end}); the sparselens rows mix code versions."
        )
    if "sparselens" not in libs and "sparselens" in a.libraries:
        md += "\n\nsparselens.sae was not importable: sparsify side only, no ratios."
    result = {
        "benchmark": "TopK SAE training step, topk-sae.md §3.2 workload",
        "command": " ".join(["python", "benchmarks/sae_step.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        },
        "sparselens_onednn": onednn,
        "settings": base,
        "libraries": libs,
        "sparselens_sae_sha256_16": {"start": fp_start, "end": fp_end},
        "summary": summary,
        "runs": runs,
        "table": md,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1) + "\n")
    print(md)
    log(f"results: {a.output}")


if __name__ == "__main__":
    main()
