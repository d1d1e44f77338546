"""SAELens export/import: committed sae-lens outputs, mapping pins, round trips, errors."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparselens.sae import SparseCoder, SparseCoderConfig, save_sparse_coder
from sparselens.sae import saelens as sl
from sparselens.sae.saelens import (
    convert_to_saelens,
    export_saelens,
    import_saelens,
    saelens_config,
    saelens_tensors,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "saelens_tiny"
SAELENS_PY = ROOT / ".cache/bench-saelens-venv/bin/python"


def _load_script() -> ModuleType:
    path = ROOT / "scripts" / "verify_saelens_export.py"
    spec = importlib.util.spec_from_file_location("verify_saelens_export", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


V = _load_script()
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ---- an independent SAELens forward (TopKSAE / JumpReLUSAE, sae-lens 6.54 source) -----------


def saelens_forward(
    cfg: dict[str, Any], w: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' ``encode`` (dense) and forward: ``pre = (x - b_dec * apply) @ W_enc + b_enc``
    (times ``||W_dec rows||`` if rescaling); TopK then ReLU (JumpReLU: ``relu(pre) * (pre >
    threshold)``); ``out = (acts / ||W_dec rows|| if rescaling) @ W_dec + b_dec``."""
    dtype = getattr(torch, cfg["dtype"])
    w = {k: v.to(dtype) for k, v in w.items()}
    x = x.to(dtype)
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if cfg["architecture"] == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"]).to(dtype)
    else:
        if rescale:
            pre = pre * norms
        vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    dec_in = acts / norms if rescale else acts
    return acts, dec_in @ w["W_dec"] + w["b_dec"]


def _files(d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((d / "cfg.json").read_text()), load_file(d / "sae_weights.safetensors")


def _recorded(name: str, num_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    rec = load_file(FIXTURES / name / V.OUT_NAME)
    return V.dense_acts(rec, num_latents), rec["sae_out"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


# ---- the committed fixture: our export == committed files == SAELens' behaviour -------------


def test_fixture_recorded_by_saelens_6() -> None:
    for name in V.FIXTURE:
        with open(FIXTURES / name / V.OUT_NAME, "rb") as f:
            header = f.read(2000).decode("latin-1")
        assert '"sae_lens_version":"6.' in header.replace(" ", ""), name
    assert "sae-lens 6." in (FIXTURES / "README.md").read_text()
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 50 * 1024


@pytest.mark.parametrize("name", list(V.SPECS))
def test_export_writes_the_committed_files(tmp_path: Path, name: str) -> None:
    """Our export of the fixture's coder reproduces the files SAELens was run on: tensors bit
    for bit (catches a transposed ``W_dec``: shape (16, M) instead of (M, 16)) and the cfg
    (catches ``apply_b_dec_to_input`` False, SAELens' sparsify-converter choice)."""
    coder = V.make_coder(V.SPECS[name])
    export_saelens(coder, tmp_path, provenance=V.PROVENANCE)
    cfg, w = _files(tmp_path)
    ref_cfg, ref_w = _files(FIXTURES / name)
    assert w.keys() == ref_w.keys()
    for k in w:
        assert w[k].dtype == ref_w[k].dtype and torch.equal(w[k], ref_w[k]), k
    assert ref_w["W_dec"].shape == (coder.num_latents, 16)
    assert ref_cfg["apply_b_dec_to_input"] is True
    assert ref_cfg.get("rescale_acts_by_decoder_norm", False) is False
    # our config may gain fields over time: compare it as a parsed config
    ours, ref_ours = cfg["metadata"].pop("sparselens"), ref_cfg["metadata"].pop("sparselens")
    assert cfg == ref_cfg
    assert SparseCoderConfig(**ref_ours["config"]) == coder.cfg
    assert ours["provenance"] == ref_ours["provenance"] == V.PROVENANCE


@pytest.mark.parametrize("name", list(V.SPECS))
def test_saelens_recorded_outputs_equal_ours(name: str) -> None:
    """SAELens' ``encode`` and forward on our export equal our SparseCoder's activations and
    reconstruction (eval mode; BatchTopK through its JumpReLU threshold)."""
    coder = V.make_coder(V.SPECS[name])
    acts, out = V.our_outputs(coder, V.fixture_input())
    ref_acts, ref_out = _recorded(name, coder.num_latents)
    tol = TOL[coder.dtype]
    _close(acts, ref_acts, tol)
    _close(out, ref_out, tol)
    assert int((ref_acts > 0).sum(1).min()) >= 1  # non-trivial codes


@pytest.mark.parametrize("name", V.FIXTURE)
def test_reference_forward_reproduces_saelens(name: str) -> None:
    """The independent SAELens forward above matches the real library on every fixture, so
    the tests below may use it as SAELens' stand-in."""
    cfg, w = _files(FIXTURES / name)
    acts, out = saelens_forward(cfg, w, V.fixture_input())
    ref_acts, ref_out = _recorded(name, cfg["d_sae"])
    tol = TOL[getattr(torch, cfg["dtype"])]
    _close(acts, ref_acts, tol)
    _close(out, ref_out, tol)


def test_saelens_sparsify_converter_mapping_is_wrong() -> None:
    """Catches SAELens' sparsify converter mapping (reference sheet §5.4): ``W_dec``
    transposed does not even have SAELens' (d_sae, d_in) shape, and with the shape patched,
    ``apply_b_dec_to_input = not normalize_decoder`` (False) drops ``b_dec`` from the input and
    moves the reconstruction far from SAELens' output on our export."""
    cfg, w = _files(FIXTURES / "topk_f32")
    coder = V.make_coder(V.SPECS["topk_f32"])
    converter_w_dec = coder.W_dec.detach().T
    assert converter_w_dec.shape != w["W_dec"].shape
    bad_cfg = {**cfg, "apply_b_dec_to_input": not coder.cfg.normalize_decoder}
    assert bad_cfg["apply_b_dec_to_input"] is False
    _, bad_out = saelens_forward(bad_cfg, w, V.fixture_input())
    _, ref_out = _recorded("topk_f32", 64)
    rel = ((bad_out - ref_out).norm() / ref_out.norm()).item()
    assert rel > 0.1, rel
    # and what export writes is the right mapping
    assert torch.equal(saelens_tensors(coder)["W_dec"], coder.W_dec.detach())
    assert saelens_config(coder)["apply_b_dec_to_input"] is True


def test_import_saelens_native_checkpoint_matches_saelens() -> None:
    """A TopK SAE written by SAELens itself (decoder-norm rescaling, b_dec not subtracted)
    imports with SAELens' activations and outputs. The naive inverse mapping (W_enc^T, no
    folding of the rescale or of the b_dec shift) would be wrong: checked to differ."""
    name = V.NATIVE
    coder = import_saelens(FIXTURES / name)
    assert coder.cfg.k == 4 and coder.num_latents == 32 and coder.dtype == torch.float32
    assert coder.cfg.normalize_decoder  # rows are unit norm after folding
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(32))
    acts, out = V.our_outputs(coder, V.fixture_input())
    ref_acts, ref_out = _recorded(name, 32)
    _close(acts, ref_acts, 1e-5)
    _close(out, ref_out, 1e-5)

    _, w = _files(FIXTURES / name)
    naive = SparseCoder(16, SparseCoderConfig(num_latents=32, k=4)).eval()
    with torch.no_grad():
        naive.encoder.weight.copy_(w["W_enc"].T)
        naive.encoder.bias.copy_(w["b_enc"])
        naive.W_dec.copy_(w["W_dec"])
        naive.b_dec.copy_(w["b_dec"])
    _, naive_out = V.our_outputs(naive, V.fixture_input())
    assert (naive_out - ref_out).abs().max() > 0.1


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(1, 6),
    m=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    apply_b_dec=st.booleans(),
    rescale=st.booleans(),
)
def test_import_any_saelens_topk_matches_reference(
    seed: int, d_in: int, m: int, k_frac: float, apply_b_dec: bool, rescale: bool
) -> None:
    """Every combination of SAELens' TopK options imports with SAELens' outputs (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = 1 + int(k_frac * (m - 1))
    w = {
        "W_enc": torch.randn(d_in, m, generator=g, dtype=torch.float64),
        "b_enc": torch.randn(m, generator=g, dtype=torch.float64),
        "W_dec": torch.randn(m, d_in, generator=g, dtype=torch.float64) + 0.1,
        "b_dec": torch.randn(d_in, generator=g, dtype=torch.float64),
    }
    cfg = {
        "architecture": "topk", "d_in": d_in, "d_sae": m, "k": k, "dtype": "float64",
        "apply_b_dec_to_input": apply_b_dec, "rescale_acts_by_decoder_norm": rescale,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12"},
    }  # fmt: skip
    x = torch.randn(5, d_in, generator=g, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg))
        save_file(w, str(Path(tmp) / "sae_weights.safetensors"))
        coder = import_saelens(tmp)
    ref_acts, ref_out = saelens_forward(cfg, w, x)
    acts, out = V.our_outputs(coder, x)
    torch.testing.assert_close(acts, ref_acts, atol=1e-9, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=0)


# ---- round trips ----------------------------------------------------------------------------


def _random_coder(
    seed: int, d_in: int, m: int, k: int, dtype: torch.dtype, **kw: Any
) -> SparseCoder:
    torch.manual_seed(seed)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=m, k=k, **kw), dtype=dtype).eval()
    with torch.no_grad():
        coder.encoder.bias.uniform_(-0.2, 0.5)
        coder.b_dec.normal_()
        if kw.get("activation") == "batchtopk":
            coder.threshold.fill_(0.1)
    return coder


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(1, 8),
    m=st.integers(1, 16),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    activation=st.sampled_from(["topk", "batchtopk"]),
    zero_b_dec=st.booleans(),
)
def test_round_trip_is_exact(
    seed: int,
    d_in: int,
    m: int,
    k_frac: float,
    dtype: torch.dtype,
    activation: str,
    zero_b_dec: bool,
) -> None:
    k = 1 + int(k_frac * (m - 1))
    coder = _random_coder(seed, d_in, m, k, dtype, activation=activation, k_aux=2)
    if zero_b_dec:
        coder.b_dec.data.zero_()
    with tempfile.TemporaryDirectory() as tmp:
        export_saelens(coder, Path(tmp) / "sae", provenance={"hookpoint": "h"})
        back = import_saelens(Path(tmp) / "sae")
    assert back.cfg == coder.cfg and back.dtype == dtype and back.d_in == d_in
    sd, sd2 = coder.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for name in sd:
        assert sd2[name].dtype == sd[name].dtype and torch.equal(sd2[name], sd[name]), name
    x = torch.randn(6, d_in, generator=torch.Generator().manual_seed(seed))
    for a, b in zip(V.our_outputs(coder, x), V.our_outputs(back, x), strict=True):
        assert torch.equal(a, b)


def test_provenance_goes_into_saelens_metadata(tmp_path: Path) -> None:
    prov = {"subject": "mini-gpt", "hookpoint": "blocks.2", "corpus": "shakespeare",
            "context_len": 128, "exclude_special_tokens": True, "tokens_seen": 10}  # fmt: skip
    coder = _random_coder(0, 8, 16, 2, torch.float32)
    src = save_sparse_coder(coder, tmp_path / "run" / "blocks.2", provenance=prov)
    out = convert_to_saelens(src, tmp_path / "saelens")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert {k: meta[k] for k in sl._METADATA_FIELDS if k in meta} == {
        "model_name": "mini-gpt", "hook_name": "blocks.2", "dataset_path": "shakespeare",
        "context_size": 128, "exclude_special_tokens": True,
    }  # fmt: skip
    assert meta["sparselens"]["provenance"] == prov
    assert meta["sae_lens_version"].startswith("6.")
    bare = saelens_config(coder)["metadata"]
    assert "hook_name" not in bare and bare["sparselens"]["provenance"] is None


def test_import_drops_unknown_config_fields_and_trusts_saelens_fields(tmp_path: Path) -> None:
    coder = _random_coder(1, 8, 16, 3, torch.float32)
    export_saelens(coder, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["sparselens"]["config"].update(future_field=1, k=7, activation="batchtopk")
    cfg["k"] = 5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = import_saelens(tmp_path)
    assert back.cfg.k == 5 and back.cfg.activation == "topk"


# ---- bad input ------------------------------------------------------------------------------


def _one_line(info: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"transcode": True}, "transcoder.*plain ReLU"),
        ({"transcode": True, "skip_connection": True}, "transcoder"),
        ({"skip_connection": True}, "transcoder"),
    ],
)
def test_export_refuses_transcoders(tmp_path: Path, kw: dict, match: str) -> None:
    coder = _random_coder(0, 8, 16, 2, torch.float32, **kw)
    with pytest.raises(ValueError, match=match) as info:
        export_saelens(coder, tmp_path / "a" / "b")
    _one_line(info)
    assert not (tmp_path / "a").exists()


def test_export_bad_input_leaves_no_directory(tmp_path: Path) -> None:
    d = tmp_path / "new" / "sae"
    coder = _random_coder(0, 8, 16, 2, torch.float32, activation="batchtopk")
    del coder.threshold
    with pytest.raises(ValueError, match="no 0-d float 'threshold' buffer") as info:
        export_saelens(coder, d)
    _one_line(info)
    coder = _random_coder(0, 8, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="JSON-serialisable") as info:
        export_saelens(coder, d, provenance={"x": object()})
    _one_line(info)
    with pytest.raises(TypeError, match="provenance must be a dict"):
        export_saelens(coder, d, provenance=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coder must be a SparseCoder"):
        export_saelens(torch.nn.Linear(2, 2), d)  # type: ignore[arg-type]
    with torch.no_grad():
        coder.W_dec[3, 1] = float("nan")
    with pytest.raises(ValueError, match="coder W_dec must be finite") as info:
        export_saelens(coder, d)
    _one_line(info)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_saelens(_random_coder(0, 8, 16, 2, torch.float32), tmp_path / "file")


def test_failed_write_removes_only_what_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sl, "atomic_write_json", boom)
    coder = _random_coder(0, 8, 16, 2, torch.float32)
    with pytest.raises(OSError, match="disk full"):
        export_saelens(coder, tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        export_saelens(coder, keep)
    assert (keep / "notes.txt").read_text() == "mine"
    assert not list(keep.glob(".*.tmp"))


def _copy(name: str, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("cfg.json", "sae_weights.safetensors"):
        (dst / f).write_bytes((FIXTURES / name / f).read_bytes())
    return dst


def test_import_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such SAELens directory"):
        import_saelens(tmp_path / "nope")
    d = _copy("topk_f32", tmp_path / "a")
    (d / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json: no such file"):
        import_saelens(d)
    d = _copy("topk_f32", tmp_path / "b")
    (d / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors: no such file"):
        import_saelens(d)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architecture": "standard"}, r"architecture 'standard' cannot be represented"),
        ({"architecture": "gated"}, r"architecture 'gated'"),
        ({"architecture": "transcoder"}, r"architecture 'transcoder'"),
        ({"architecture": "skip_transcoder"}, r"architecture 'skip_transcoder'"),
        ({"architecture": None}, r"architecture None"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations must be 'none'"),
        ({"reshape_activations": "hook_z"}, r"reshape_activations must be 'none'"),
        ({"apply_b_dec_to_input": "yes"}, r"'apply_b_dec_to_input' must be true or false"),
        ({"finetuning_scaling_factor": True}, r"finetuning_scaling_factor"),
        ({"d_sae": 0}, r"'d_sae' must be an integer >= 1"),
        ({"d_in": "16"}, r"'d_in' must be an integer >= 1"),
        ({"k": 65}, r"'k' must be an integer in \[1, d_sae=64\]"),
        ({"k": None}, r"'k' must be an integer >= 1"),
        ({"dtype": "int8"}, r"'dtype' must be one of"),
        ({"d_sae": 32}, r"W_enc has shape \(16, 64\), but cfg\.json .* implies \(16, 32\)"),
    ],
)
def test_import_bad_cfg(tmp_path: Path, change: dict, match: str) -> None:
    d = _copy("topk_f32", tmp_path / "d")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(change)
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as info:
        import_saelens(d)
    _one_line(info)


def test_import_refuses_general_jumprelu(tmp_path: Path) -> None:
    """A JumpReLU SAE is TopK only when we exported it from a BatchTopK coder."""
    d = _copy("batchtopk_f32", tmp_path / "d")
    cfg = json.loads((d / "cfg.json").read_text())
    del cfg["metadata"]["sparselens"]
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'jumprelu' SAE imports only when") as info:
        import_saelens(d)
    _one_line(info)
    d = _copy("batchtopk_f32", tmp_path / "e")
    w = load_file(d / "sae_weights.safetensors")
    w["threshold"] = w["threshold"].clone()
    w["threshold"][3] += 0.5
    save_file(w, str(d / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="threshold differs across latents"):
        import_saelens(d)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"W_dec": torch.zeros(16, 64)}, r"W_dec has shape \(16, 64\), but .* \(64, 16\)"),
        ({"b_dec": None}, r"missing tensors b_dec"),
        ({"threshold": torch.zeros(64)}, r"unexpected tensors threshold for 'topk'"),
        ({"b_enc": torch.full((64,), float("inf"))}, r"b_enc holds NaN or infinite"),
        ({"b_dec": torch.zeros(16, dtype=torch.int32)}, r"b_dec has non-float dtype"),
        ({"scaling_factor": torch.full((64,), 2.0)}, r"a scaling_factor other than ones"),
    ],
)
def test_import_bad_tensors(tmp_path: Path, change: dict, match: str) -> None:
    d = _copy("topk_f32", tmp_path / "d")
    w = load_file(d / "sae_weights.safetensors")
    for k, v in change.items():
        if v is None:
            del w[k]
        else:
            w[k] = v
    save_file(w, str(d / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: " + match) as info:
        import_saelens(d)
    _one_line(info)


def test_import_all_ones_scaling_factor_dropped_and_corrupt_file(tmp_path: Path) -> None:
    d = _copy("topk_f32", tmp_path / "d")
    w = load_file(d / "sae_weights.safetensors")
    save_file({**w, "scaling_factor": torch.ones(64)}, str(d / "sae_weights.safetensors"))
    assert import_saelens(d).num_latents == 64
    data = (d / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a safetensors file") as info:
        import_saelens(d)
    _one_line(info)
    (d / "cfg.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"cfg\.json: invalid JSON"):
        import_saelens(d)


# ---- the real sae-lens, when its venv exists ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PY.exists(), reason="needs .cache/bench-saelens-venv")
def test_real_saelens_loads_our_exports(tmp_path: Path) -> None:
    """SAE.load_from_disk on fresh exports (f32/f64, b_dec zero or not, BatchTopK) and on a
    SAELens-written checkpoint we import: outputs equal to 1e-5 (sae-lens import takes ~7 s)."""
    specs = {**V.SPECS, **V.EXTRA_SPECS}
    dirs = []
    for name, spec in specs.items():
        export_saelens(V.make_coder(spec), tmp_path / name, provenance=V.PROVENANCE)
        dirs.append(tmp_path / name)
    native = tmp_path / V.NATIVE
    versions = V.run_saelens(SAELENS_PY, [*dirs, native], tmp_path / "work", native=native)
    assert versions["sae_lens"].startswith("6.")
    for name, spec in specs.items():
        da, do = V.compare(name, V.make_coder(spec), tmp_path / name)
        assert max(da, do) <= TOL[getattr(torch, spec["dtype"])] + 1e-6, name
    assert max(V.compare(V.NATIVE, import_saelens(native), native)) <= 1e-5
    # the native file is what SAELens wrote, and it is the committed one
    cfg, w = _files(native)
    ref_cfg, ref_w = _files(FIXTURES / V.NATIVE)
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w) and w.keys() == ref_w.keys()
    assert {k: v for k, v in cfg.items() if k != "metadata"} == {
        k: v for k, v in ref_cfg.items() if k != "metadata"
    }
    assert cfg["metadata"]["hook_name"] == "blocks.1.mlp"
