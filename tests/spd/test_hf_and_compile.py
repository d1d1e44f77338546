"""SPD on a Hugging Face model (GPT-2's Conv1D layers) and the torch.compile CI path."""

from __future__ import annotations

import pytest
import torch

from sparselens.spd.ci_functions import MLPCI, _Compiled
from sparselens.spd.component_model import ComponentModel
from sparselens.spd.losses import ImportanceMinimalityConfig, LossConfig, compute_losses


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_decompose_exactly():
    """GPT-2 stores Conv1D weights as (d_in, d_out): with masks 1 and delta mask 1 the replaced
    model must reproduce the logits exactly (fails if the weight were not transposed), and the
    implied weight must have the nn.Linear layout (d_out, d_in)."""
    target = _tiny_gpt2()
    x = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        ref = target(x).logits
    model = ComponentModel(
        target, [{"pattern": "transformer.h.*.mlp.c_fc", "C": 5}], ci_fn="shared_mlp",
        ci_hidden=[8], output_index="logits",
    )  # fmt: skip
    assert model.names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    comp = model.component("transformer.h.0.mlp.c_fc")
    assert comp.weight().shape == (64, 16) == comp.target_weight.shape
    out, inputs = model.target_output(x, cache_inputs=True)
    torch.testing.assert_close(out, ref)
    assert inputs["transformer.h.1.mlp.c_fc"].shape == (3, 8, 16)
    ones = {n: torch.ones(3, 8, 5) for n in model.names}
    deltas = {n: torch.ones(3, 8) for n in model.names}
    with torch.no_grad():
        torch.testing.assert_close(model(x, masks=ones, delta_masks=deltas), ref)
        # without the delta component the components alone (random init) change the output
        assert not torch.allclose(model(x, masks=ones), ref, atol=1e-3)
    cfg = LossConfig(output_loss="kl", importance_minimality=ImportanceMinimalityConfig(coeff=1e-3))
    total, terms = compute_losses(model, x, cfg, progress=0.0, generator=torch.Generator())
    total.backward()
    assert set(terms) == {"stochastic_recon", "layerwise_recon", "importance_minimality"}
    assert comp.U.grad is not None and comp.U.grad.abs().sum() > 0


def test_torch_compiled_mlp_ci_matches_eager():
    """The torch.compile path (used off CPU, or where the C++ kernels cannot build) computes the
    same function and gradients as the eager fused op (skipped where compiling is impossible)."""
    torch.manual_seed(0)
    fn = MLPCI(C=6, hidden=[4])
    h = torch.randn(32, 6, requires_grad=True)
    args = (h, fn.weights[0][:, 0, :], fn.biases[0], fn.w_out, fn.b_out)
    z_eager = fn(None, h)
    g_eager = torch.autograd.grad(z_eager.sum(), [h, *fn.parameters()])
    z = _Compiled.run(*args)
    if z is None:
        pytest.skip("torch.compile is not available here")
    assert "CompiledFunction" in type(z.grad_fn).__name__
    g = torch.autograd.grad(z.sum(), [h, *fn.parameters()])
    torch.testing.assert_close(z, z_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
