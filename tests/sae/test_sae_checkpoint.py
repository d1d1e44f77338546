"""sparsify-layout checkpoints: load sparsify's files, round trip, sparsify loads ours, errors."""

from __future__ import annotations

import json
import logging
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparselens.sae import SparseCoder, SparseCoderConfig
from sparselens.sae.checkpoint import load_sparse_coder, read_provenance, save_sparse_coder

FIXTURES = Path(__file__).parent / "fixtures" / "sparsify_tiny"
SPARSIFY_PY = Path(__file__).resolve().parents[2] / ".cache/bench-sparsify-venv/bin/python"


def _by_index(acts: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by latent index, so unsorted top-k outputs compare as sets."""
    order = idx.argsort(dim=1)
    return acts.gather(1, order), idx.gather(1, order)


def _assert_same_outputs(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(out["sae_out"], ref["sae_out"], atol=1e-6, rtol=0)
    acts, idx = _by_index(out["latent_acts"], out["latent_indices"])
    ref_acts, ref_idx = _by_index(ref["latent_acts"], ref["latent_indices"])
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(acts, ref_acts, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["fvu"].reshape(()), ref["fvu"].reshape(()), atol=1e-6, rtol=0)


def _forward(sae: SparseCoder, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        res = sae(x, y)
    return {
        "sae_out": res.sae_out,
        "latent_acts": res.latent_acts,
        "latent_indices": res.latent_indices,
        "fvu": res.fvu,
    }


def _sae(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: object) -> SparseCoder:
    torch.manual_seed(seed)
    sae = SparseCoder(8, SparseCoderConfig(num_latents=32, k=4, **kw), dtype=dtype)
    with torch.no_grad():  # non-zero everything, so a dropped tensor would show
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.encoder.bias.add_(0.5)
    return sae


# ---- sparsify's files -> our loader ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sae", "transcoder"])
def test_sparsify_fixture_matches_recorded_outputs(name: str) -> None:
    ref = load_file(FIXTURES / name / "reference.safetensors")
    sae = load_sparse_coder(FIXTURES / name)
    assert sae.dtype == torch.float32 and sae.d_in == 8 and sae.num_latents == 32
    assert sae.cfg.k == 4 and sae.cfg.transcode == (name == "transcoder")
    assert (sae.W_skip is not None) == (name == "transcoder")
    assert sae.b_dec.abs().min() > 0 and sae.b_enc.abs().min() > 0
    y = ref["y"] if name == "transcoder" else None
    _assert_same_outputs(_forward(sae, ref["x"], y), ref)


def test_decoder_false_loads_encoder_only(tmp_path: Path) -> None:
    ref = load_file(FIXTURES / "sae" / "reference.safetensors")
    full = load_sparse_coder(FIXTURES / "sae")
    enc = load_sparse_coder(FIXTURES / "sae", decoder=False)
    a, b = full.encode(ref["x"]), enc.encode(ref["x"])
    assert torch.equal(a.top_indices, b.top_indices) and torch.equal(a.top_acts, b.top_acts)
    # a file without decoder tensors loads encoder-only, but not with decoder=True
    tensors = load_file(FIXTURES / "sae" / "sae.safetensors")
    del tensors["W_dec"]
    d = tmp_path / "enc"
    d.mkdir()
    (d / "cfg.json").write_text((FIXTURES / "sae" / "cfg.json").read_text())
    save_file(tensors, str(d / "sae.safetensors"))
    load_sparse_coder(d, decoder=False)
    with pytest.raises(ValueError, match=r"sae\.safetensors: missing tensors W_dec"):
        load_sparse_coder(d)


# ---- our save -> our load / sparsify's load -------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "kw"),
    [
        (torch.float32, {}),
        (torch.float64, {"transcode": True, "skip_connection": True, "k_aux": 2}),
        (torch.bfloat16, {"multi_topk": True, "auxk_normalization": "target"}),
    ],
)
def test_round_trip_bit_identical(tmp_path: Path, dtype: torch.dtype, kw: dict) -> None:
    sae = _sae(dtype=dtype, **kw)
    prov = {"hookpoint": "layers.3", "tokens_seen": 12345, "model": "tiny"}
    out = save_sparse_coder(sae, tmp_path / "layers.3", provenance=prov)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    back = load_sparse_coder(out)
    assert back.cfg == sae.cfg and back.d_in == sae.d_in and back.dtype == dtype
    sd, sd2 = sae.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd2[k], sd[k]), k
    assert read_provenance(out) == prov
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["k"] == 4 and "auxk_alpha" in cfg


def test_save_overwrites_and_rejects_bad_provenance(tmp_path: Path) -> None:
    save_sparse_coder(_sae(seed=0), tmp_path)
    save_sparse_coder(_sae(seed=1), tmp_path)
    assert torch.equal(load_sparse_coder(tmp_path).W_dec, _sae(seed=1).W_dec)
    assert read_provenance(tmp_path) is None
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_sparse_coder(_sae(), tmp_path / "new", provenance={"x": object()})
    assert not (tmp_path / "new").exists()
    with pytest.raises(TypeError, match="SparseCoder"):
        save_sparse_coder(torch.nn.Linear(2, 2), tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".*.tmp"))


_SPARSIFY_SNIPPET = textwrap.dedent(
    """
    import sys
    from safetensors.torch import load_file, save_file
    from sparsify import SparseCoder
    root = sys.argv[1]
    for name in sys.argv[2:]:
        sae = SparseCoder.load_from_disk(f"{root}/{name}")
        io = load_file(f"{root}/{name}.io.safetensors")
        r = sae(io["x"], io["y"] if sae.cfg.transcode else None)
        save_file({"sae_out": r.sae_out.detach().contiguous(),
                   "latent_acts": r.latent_acts.detach().contiguous(),
                   "latent_indices": r.latent_indices.contiguous(),
                   "fvu": r.fvu.detach().reshape(())}, f"{root}/{name}.out.safetensors")
    """
)


@pytest.mark.skipif(not SPARSIFY_PY.exists(), reason="needs the sparsify bench venv")
def test_sparsify_loads_our_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(3)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    saes = {
        "sae": _sae(seed=4, k_aux=2, auxk_alpha=0.5),
        "skip_transcoder": _sae(seed=5, transcode=True, skip_connection=True),
    }
    for name, sae in saes.items():
        save_sparse_coder(sae, tmp_path / name, provenance={"hookpoint": name})
        save_file({"x": x, "y": y}, str(tmp_path / f"{name}.io.safetensors"))
    proc = subprocess.run(
        [str(SPARSIFY_PY), "-c", _SPARSIFY_SNIPPET, str(tmp_path), *saes],
        capture_output=True,
        text=True,
        timeout=120,
        env={"SPARSIFY_DISABLE_TRITON": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, sae in saes.items():
        ref = load_file(tmp_path / f"{name}.out.safetensors")
        _assert_same_outputs(_forward(sae, x, y if sae.cfg.transcode else None), ref)


# ---- errors ---------------------------------------------------------------------------------


def _copy_fixture(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("cfg.json", "sae.safetensors"):
        (dst / f).write_bytes((FIXTURES / "sae" / f).read_bytes())
    return dst


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such sparse coder directory"):
        load_sparse_coder(tmp_path / "nope")
    d = _copy_fixture(tmp_path / "a")
    (d / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json: no such file"):
        load_sparse_coder(d)
    d = _copy_fixture(tmp_path / "b")
    (d / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae\.safetensors: no such file"):
        load_sparse_coder(d)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"cfg\.json: invalid JSON"),
        ("[1, 2]", r"cfg\.json: expected a JSON object"),
        ('{"k": 4, "num_latents": 32}', r"cfg\.json: missing field 'd_in'"),
        ('{"d_in": 0, "num_latents": 32}', r"cfg\.json: 'd_in' must be an integer >= 1"),
        ('{"d_in": 8, "num_latents": 32, "k": 64}', r"cfg\.json: invalid config \(.*k must be"),
        ('{"d_in": 8, "activation": "groupmax"}', r"cfg\.json: invalid config \(activation"),
    ],
)
def test_bad_cfg(tmp_path: Path, text: str, match: str) -> None:
    d = _copy_fixture(tmp_path / "d")
    (d / "cfg.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_sparse_coder(d)
    assert "\n" not in str(info.value)


def test_unknown_cfg_fields_dropped_with_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _copy_fixture(tmp_path / "d")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(signed=True, provenance={"a": 1})
    (d / "cfg.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="sparselens.sae.checkpoint"):
        sae = load_sparse_coder(d)
    assert sae.cfg.k == 4
    assert "ignoring unknown config fields signed" in caplog.text
    assert "provenance" not in caplog.text


def _write_tensors(d: Path, **changes: torch.Tensor | None) -> None:
    tensors = load_file(FIXTURES / "sae" / "sae.safetensors")
    for k, v in changes.items():
        if v is None:
            tensors.pop(k.replace("__", "."))
        else:
            tensors[k.replace("__", ".")] = v
    save_file(tensors, str(d / "sae.safetensors"))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"W_dec": torch.zeros(32, 9)}, r"W_dec has shape \(32, 9\), but cfg\.json .* \(32, 8\)"),
        ({"encoder__bias": torch.zeros(31)}, r"encoder\.bias has shape \(31,\)"),
        ({"b_dec": None}, r"missing tensors b_dec"),
        ({"W_skip": torch.zeros(8, 8)}, r"unexpected tensors W_skip"),
        ({"b_dec": torch.full((8,), float("nan"))}, r"b_dec holds NaN"),
        ({"b_dec": torch.zeros(8, dtype=torch.int64)}, r"b_dec has non-float dtype"),
    ],
)
def test_bad_tensors(tmp_path: Path, changes: dict, match: str) -> None:
    d = _copy_fixture(tmp_path / "d")
    _write_tensors(d, **changes)
    with pytest.raises(ValueError, match=r"sae\.safetensors: " + match):
        load_sparse_coder(d)


def test_corrupt_and_pickle_weights_rejected(tmp_path: Path) -> None:
    d = _copy_fixture(tmp_path / "d")
    data = (d / "sae.safetensors").read_bytes()
    (d / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"sae\.safetensors: not a readable safetensors file"):
        load_sparse_coder(d)
    # a torch.save pickle under the safetensors name is rejected, never unpickled
    torch.save(load_file(FIXTURES / "sae" / "sae.safetensors"), d / "sae.safetensors")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_sparse_coder(d)
    # and a pickle beside it is ignored
    (d / "sae.safetensors").write_bytes((FIXTURES / "sae" / "sae.safetensors").read_bytes())
    torch.save({"evil": 1}, d / "sae.pt")
    load_sparse_coder(d)
    save_file({}, str(d / "sae.safetensors"))
    with pytest.raises(ValueError, match="holds no tensors"):
        load_sparse_coder(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchtopk_threshold_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    """The JumpReLU threshold is saved and loaded (float32, whatever the weights' dtype), so the
    loaded coder's eval outputs are identical; a plain TopK file keeps sparsify's tensor set."""
    sae = _sae(dtype=dtype, activation="batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.37)
    out = save_sparse_coder(sae, tmp_path / "btk")
    tensors = load_file(out / "sae.safetensors")
    assert tensors["threshold"].shape == () and tensors["threshold"].dtype == torch.float32
    back = load_sparse_coder(out)
    assert back.dtype == dtype and back.threshold.item() == pytest.approx(0.37)
    x = torch.randn(5, 8).to(dtype)
    sae.eval()
    back.eval()
    assert torch.equal(back(x).sae_out, sae(x).sae_out)
    enc_only = load_sparse_coder(out, decoder=False)
    assert enc_only.threshold.item() == pytest.approx(0.37)
    plain = save_sparse_coder(_sae(), tmp_path / "plain")
    assert set(load_file(plain / "sae.safetensors")) == {
        "encoder.weight",
        "encoder.bias",
        "W_dec",
        "b_dec",
    }


def test_batchtopk_file_without_threshold_rejected(tmp_path: Path) -> None:
    out = save_sparse_coder(_sae(activation="batchtopk"), tmp_path / "btk")
    tensors = load_file(out / "sae.safetensors")
    del tensors["threshold"]
    save_file(tensors, str(out / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae\.safetensors: missing tensors threshold$"):
        load_sparse_coder(out)
