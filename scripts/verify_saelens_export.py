"""Check our SAELens export against the real sae-lens; write tests/sae/fixtures/saelens_tiny/.

Run with the project's Python: ``.venv/bin/python scripts/verify_saelens_export.py``. It creates
(once) ``.cache/bench-saelens-venv`` with ``pip install torch==2.13.0 sae-lens`` (torch pinned in
the same command so pip keeps the CPU wheel), then

1. exports deterministic coders (weights from numpy's frozen ``RandomState`` stream, see
   :data:`SPECS`) with :func:`~sparselens.sae.saelens.export_saelens`, and writes SAELens'
   own TopK SAE (``rescale_acts_by_decoder_norm=True``, ``apply_b_dec_to_input=False``,
   non-unit decoder rows) with ``TopKSAE.save_model`` inside the sae-lens venv;
2. loads every directory there with ``SAE.load_from_disk`` and records SAELens' ``encode``
   activations and forward output on :func:`fixture_input` as ``saelens_out.safetensors``;
3. compares them with our SparseCoder (exported coders) or with
   :func:`~sparselens.sae.saelens.import_saelens` (SAELens' own file) and fails above 1e-5.

The committed fixture holds the :data:`FIXTURE` subset (kept under 50 KB); ``--extra`` also
checks :data:`EXTRA_SPECS` in a temporary directory. ``tests/sae/test_saelens.py`` imports
:func:`make_coder`, :func:`fixture_input` and :func:`run_saelens` from this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparselens.sae import SparseCoder, SparseCoderConfig
from sparselens.sae.saelens import export_saelens, import_saelens

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests/sae/fixtures/saelens_tiny"
DEFAULT_VENV = ROOT / ".cache/bench-saelens-venv"
OUT_NAME = "saelens_out.safetensors"
INPUT_NAME = "input.safetensors"
D_IN, N_TOKENS = 16, 8
PROVENANCE = {
    "made_by": "scripts/verify_saelens_export.py",
    "subject": "mini-gpt",
    "hookpoint": "blocks.1.mlp",
    "corpus": "tiny-shakespeare",
    "context_len": 64,
    "tokens_seen": 4096,
}


def _spec(m: int, dtype: str, b_dec: bool, seed: int, **kw: Any) -> dict[str, Any]:
    return {"num_latents": m, "k": 4, "dtype": dtype, "b_dec": b_dec, "seed": seed, **kw}


#: Coders exported into the committed fixture: name -> spec for :func:`make_coder`.
SPECS: dict[str, dict[str, Any]] = {
    "topk_f32": _spec(64, "float32", True, 0),
    "topk_f64_zero_b_dec": _spec(64, "float64", False, 1),
    "batchtopk_f32": _spec(32, "float32", True, 2, activation="batchtopk", threshold=0.75),
}
#: Checked with ``--extra`` (not committed).
EXTRA_SPECS: dict[str, dict[str, Any]] = {
    "topk_f32_zero_b_dec": _spec(64, "float32", False, 3),
    "topk_f64": _spec(64, "float64", True, 4),
    "batchtopk_f64": _spec(64, "float64", True, 11, activation="batchtopk", threshold=0.5),
}
#: A checkpoint written by SAELens itself (weights from :func:`native_weights`).
NATIVE = "saelens_native_topk"
NATIVE_CFG = {
    "d_in": D_IN, "d_sae": 32, "k": 4, "dtype": "float32", "apply_b_dec_to_input": False,
    "rescale_acts_by_decoder_norm": True,
}  # fmt: skip
FIXTURE = [*SPECS, NATIVE]


def fixture_input() -> torch.Tensor:
    """The fixed (N_TOKENS, D_IN) float64 input every fixture is run on."""
    return torch.from_numpy(np.random.RandomState(1234).standard_normal((N_TOKENS, D_IN)))


def _check_gaps(pre: torch.Tensor, spec: dict[str, Any]) -> None:
    """Fail unless every top-k (or threshold) decision has a margin, so float32 and float64
    agree on the selected latents."""
    if spec.get("activation") == "batchtopk":
        margin = (pre - spec["threshold"]).abs().min().item()
    else:
        top = pre.topk(spec["k"] + 1, dim=1).values
        margin = min(top[:, spec["k"] - 1].min().item(), (top[:, -2] - top[:, -1]).min().item())
    if margin <= 1e-3:
        raise SystemExit(f"ambiguous selection for {spec} (margin {margin:.2e}): change the seed")


def make_coder(spec: dict[str, Any]) -> SparseCoder:
    """A deterministic SparseCoder (eval mode) for ``spec``: numpy ``RandomState(seed)`` draws
    W_enc, b_enc, b_dec (zero unless ``b_dec``); W_dec = unit-norm rows of W_enc."""
    rs = np.random.RandomState(spec["seed"])
    m, dtype = spec["num_latents"], getattr(torch, spec["dtype"])
    w_enc = torch.from_numpy(rs.standard_normal((m, D_IN))) / D_IN**0.5
    b_enc = torch.from_numpy(rs.uniform(0.2, 0.6, m))
    b_dec = torch.from_numpy(0.3 * rs.standard_normal(D_IN))
    if not spec["b_dec"]:
        b_dec.zero_()
    cfg = SparseCoderConfig(num_latents=m, k=spec["k"], activation=spec.get("activation", "topk"))
    coder = SparseCoder(D_IN, cfg, dtype=dtype).eval()
    with torch.no_grad():
        coder.encoder.weight.copy_(w_enc)
        coder.encoder.bias.copy_(b_enc)
        coder.W_dec.copy_(w_enc / w_enc.norm(dim=1, keepdim=True))
        coder.b_dec.copy_(b_dec)
        if "threshold" in spec:
            coder.threshold.fill_(spec["threshold"])
    _check_gaps(torch.relu((fixture_input() - b_dec) @ w_enc.T + b_enc), spec)
    return coder


def native_weights() -> dict[str, torch.Tensor]:
    """SAELens-layout float32 weights of :data:`NATIVE` (decoder rows of norm 0.5 to 2)."""
    rs = np.random.RandomState(7)
    d, m = NATIVE_CFG["d_in"], NATIVE_CFG["d_sae"]
    w_dec = rs.standard_normal((m, d))
    w_dec *= rs.uniform(0.5, 2.0, (m, 1)) / np.linalg.norm(w_dec, axis=1, keepdims=True)
    arrays = {
        "W_enc": rs.standard_normal((d, m)) / d**0.5,
        "b_enc": rs.uniform(0.2, 0.6, m),
        "W_dec": w_dec,
        "b_dec": 0.3 * rs.standard_normal(d),
    }
    w = {k: torch.from_numpy(v).float() for k, v in arrays.items()}
    pre = (fixture_input().float() @ w["W_enc"] + w["b_enc"]) * w["W_dec"].norm(dim=1)
    _check_gaps(pre.relu().double(), {"k": NATIVE_CFG["k"]})
    return w


_WORKER = textwrap.dedent(
    """
    import importlib.metadata, json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    job = json.load(open(sys.argv[1]))
    version = importlib.metadata.version("sae-lens")
    if job.get("native"):
        nat = job["native"]
        cfg = TopKSAEConfig(**nat["cfg"], metadata=SAEMetadata(
            model_name="mini-gpt", hook_name="blocks.1.mlp", context_size=64))
        sae = TopKSAE(cfg)
        sae.load_state_dict(load_file(nat["weights"]))
        sae.save_model(nat["dir"])
    x = load_file(job["input"])["x"]
    for d in job["dirs"]:
        sae = SAE.load_from_disk(d)
        with torch.no_grad():
            xi = x.to(sae.dtype)
            acts = sae.encode(xi)
            out = sae(xi)
        nz = acts.nonzero()
        save_file(
            {"acts_index": nz.contiguous(), "acts_value": acts[nz[:, 0], nz[:, 1]].contiguous(),
             "sae_out": out.contiguous()},
            f"{d}/saelens_out.safetensors",
            metadata={"sae_lens_version": version, "torch_version": torch.__version__,
                      "class": type(sae).__name__},
        )
    print(json.dumps({"sae_lens": version, "torch": torch.__version__}))
    """
)


def run_saelens(
    python: Path, dirs: list[Path], work: Path, *, native: Path | None = None
) -> dict[str, str]:
    """In the sae-lens venv: optionally write :data:`NATIVE` into ``native`` with SAELens'
    ``save_model``, then load each of ``dirs`` with ``SAE.load_from_disk`` and write its
    outputs on :func:`fixture_input` to ``<dir>/saelens_out.safetensors``. Returns versions."""
    work.mkdir(parents=True, exist_ok=True)
    save_file({"x": fixture_input()}, str(work / INPUT_NAME))
    job: dict[str, Any] = {"input": str(work / INPUT_NAME), "dirs": [str(d) for d in dirs]}
    if native is not None:
        save_file(native_weights(), str(work / "native_init.safetensors"))
        job["native"] = {
            "cfg": NATIVE_CFG, "weights": str(work / "native_init.safetensors"), "dir": str(native)
        }  # fmt: skip
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [str(python), "-c", _WORKER, str(work / "job.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sae-lens worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_acts(rec: dict[str, torch.Tensor], num_latents: int) -> torch.Tensor:
    """SAELens' recorded activations as a dense (N, num_latents) tensor."""
    acts = torch.zeros(N_TOKENS, num_latents, dtype=rec["acts_value"].dtype)
    idx = rec["acts_index"]
    acts[idx[:, 0], idx[:, 1]] = rec["acts_value"]
    return acts


def our_outputs(coder: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, M) activations and reconstruction of ``coder`` (eval mode) on ``x``."""
    coder.eval()
    with torch.no_grad():
        res = coder(x.to(coder.dtype))
    acts = torch.zeros(x.shape[0], coder.num_latents, dtype=coder.dtype)
    acts.scatter_add_(1, res.latent_indices, res.latent_acts)  # padding adds zeros
    return acts, res.sae_out


def compare(name: str, coder: SparseCoder, directory: Path) -> tuple[float, float]:
    """Max |difference| of activations and outputs between ``coder`` and SAELens' record."""
    rec = load_file(directory / OUT_NAME)
    acts, out = our_outputs(coder, fixture_input())
    ref_acts = dense_acts(rec, coder.num_latents)
    if ref_acts.dtype != acts.dtype or rec["sae_out"].dtype != out.dtype:
        raise SystemExit(f"{name}: dtype mismatch {ref_acts.dtype} vs ours {acts.dtype}")
    return (acts - ref_acts).abs().max().item(), (out - rec["sae_out"]).abs().max().item()


def _write_readme(out: Path, versions: dict[str, str]) -> None:
    (out / "README.md").write_text(
        "Made by `.venv/bin/python scripts/verify_saelens_export.py` with sae-lens "
        f"{versions['sae_lens']} (torch {versions['torch']}): `<name>/` = our `export_saelens` "
        f"(`{NATIVE}/` = SAELens' own `save_model`), `<name>/{OUT_NAME}` = SAELens' "
        "`encode` (nonzeros) and forward on the script's fixed input.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="sae-lens venv")
    ap.add_argument("--extra", action="store_true", help="also check EXTRA_SPECS")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _peers import TORCH_PIN, ensure_venv, log, probe

    code = (
        "import json, importlib.metadata as m; import sae_lens, torch; "
        "print(json.dumps({'sae_lens': m.version('sae-lens'), 'torch': torch.__version__}))"
    )
    python, found = ensure_venv(
        args.venv, "sae-lens", [[TORCH_PIN, "sae-lens"]], lambda p: probe(p, code)
    )
    log(f"sae-lens {found['sae_lens']}, torch {found['torch']} in {args.venv}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        specs = {name: (spec, args.out / name) for name, spec in SPECS.items()}
        if args.extra:
            specs.update({n: (s, work / n) for n, s in EXTRA_SPECS.items()})
        coders = {name: make_coder(spec) for name, (spec, _) in specs.items()}
        for name, (_, d) in specs.items():
            export_saelens(coders[name], d, provenance=PROVENANCE)
        native = args.out / NATIVE
        versions = run_saelens(
            python, [d for _, d in specs.values()] + [native], work, native=native
        )
        coders[NATIVE] = import_saelens(native)
        worst = 0.0
        print(f"{'fixture':24} {'max |d acts|':>13} {'max |d out|':>13}")
        for name, d in [*((n, d) for n, (_, d) in specs.items()), (NATIVE, native)]:
            da, do = compare(name, coders[name], d)
            worst = max(worst, da, do)
            print(f"{name:24} {da:13.3e} {do:13.3e}")
    _write_readme(args.out, versions)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log(f"fixture {args.out}: {size / 1024:.1f} KB")
    if worst > 1e-5:
        raise SystemExit(f"outputs differ from SAELens by {worst:.3e} > 1e-5")
    print(f"OK: SAELens {versions['sae_lens']} reproduces our outputs (worst {worst:.1e})")


if __name__ == "__main__":
    main()
