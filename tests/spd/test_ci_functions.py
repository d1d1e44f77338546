"""Causal-importance functions (sheet §2): each kind against explicit per-component MLPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sparselens.spd.ci_functions import (
    MLPCI,
    SharedMLPCI,
    VectorMLPCI,
    _OneHiddenMLP,
    ci_output,
    make_ci_function,
)

F64 = torch.float64


def _gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU written out; a tanh-approximation GELU differs by up to ~1e-3."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _is_bias(name: str) -> bool:
    return name.startswith(("b_", "biases")) or name.endswith("bias")


def _randomise_biases(module: torch.nn.Module, seed: int) -> None:
    """Biases start at zero; make them non-zero so that the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if _is_bias(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _explicit_mlp_ci(fn: MLPCI, acts: Tensor) -> Tensor:
    """C independent MLPs 1 -> hidden... -> 1, one Python loop iteration per component."""
    outs = []
    for c in range(fn.C):
        h = acts[..., c : c + 1]  # (..., 1)
        for w, b in zip(fn.weights, fn.biases, strict=True):
            h = _gelu(h @ w[c] + b[c])
        outs.append(h @ fn.w_out[c] + fn.b_out[c])
    return torch.stack(outs, dim=-1)


def _explicit_vector_ci(fn: VectorMLPCI, x: Tensor) -> Tensor:
    """C independent MLPs d_in -> hidden... -> 1 on the layer input."""
    h0 = fn.b_in.shape[1]
    outs = []
    for c in range(fn.C):
        h = _gelu(x @ fn.w_in[:, c * h0 : (c + 1) * h0] + fn.b_in[c])
        for w, b in zip(fn.weights, fn.biases, strict=True):
            h = _gelu(h @ w[c] + b[c])
        outs.append(h @ fn.w_out[c] + fn.b_out[c])
    return torch.stack(outs, dim=-1)


def _explicit_shared_ci(fn: SharedMLPCI, x: Tensor) -> Tensor:
    h = x
    for layer in fn.layers:
        h = _gelu(h @ layer.weight.T + layer.bias)
    return h @ fn.out.weight.T + fn.out.bias


def _assert_same_fn_and_grads(
    params: list[Tensor], inp: Tensor, got: Tensor, want: Tensor, seed: int = 0
) -> None:
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    leaves = [inp, *params]
    ga = torch.autograd.grad((got * up).sum(), leaves, retain_graph=True)
    ge = torch.autograd.grad((want * up).sum(), leaves, retain_graph=True)
    for a, e in zip(ga, ge, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=["2d", "3d"])
def test_fused_one_hidden_mlp_equals_reference_and_loop(lead: tuple[int, ...]) -> None:
    """The fused autograd Function (forward and hand-written backward) equals both
    ``reference_forward`` and a per-component loop with erf-GELU.

    Catches a tanh GELU, a backward that forgets the bias gradients or mixes components up."""
    _seeded(0)
    fn = MLPCI(C=4, hidden=[6]).to(F64)
    _randomise_biases(fn, 1)
    acts = torch.randn((*lead, 4), dtype=F64, requires_grad=True)
    got = fn(torch.empty(0), acts)
    assert got.shape == (*lead, 4)
    params = list(fn.parameters())
    _assert_same_fn_and_grads(params, acts, got, fn.reference_forward(acts))
    _assert_same_fn_and_grads(params, acts, got, _explicit_mlp_ci(fn, acts), seed=1)


@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_fused_one_hidden_mlp_gradcheck(lead: tuple[int, ...]) -> None:
    """Finite-difference check of the hand-written backward (float64, tiny size)."""
    g = torch.Generator().manual_seed(2)
    C, H = 3, 4

    def r(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g, dtype=F64, requires_grad=True)

    inputs = (r(*lead, C), r(C, H), r(C, H), r(C, H), r(C))
    assert torch.autograd.gradcheck(_OneHiddenMLP.apply, inputs, eps=1e-6, atol=1e-7)


def test_deeper_mlp_equals_loop() -> None:
    """Two hidden layers run the broadcast form; checked against the loop (forward, grads)."""
    _seeded(3)
    fn = MLPCI(C=3, hidden=[5, 4]).to(F64)
    _randomise_biases(fn, 4)
    acts = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    got = fn(torch.empty(0), acts)
    _assert_same_fn_and_grads(list(fn.parameters()), acts, got, _explicit_mlp_ci(fn, acts))


def test_mlp_empty_batch() -> None:
    fn = MLPCI(C=3, hidden=[4])
    out = fn(torch.empty(0), torch.empty(0, 3))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("hidden", [[5], [5, 3]])
@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["2d", "3d"])
def test_vector_mlp_equals_C_separate_mlps(hidden: list[int], lead: tuple[int, ...]) -> None:
    """Catches a first-layer column layout that does not group each component's hidden units
    (e.g. ``unflatten(-1, (h, C))``)."""
    _seeded(5)
    fn = VectorMLPCI(d_in=6, C=4, hidden=hidden).to(F64)
    _randomise_biases(fn, 6)
    x = torch.randn((*lead, 6), dtype=F64, requires_grad=True)
    got = fn(x)
    assert got.shape == (*lead, 4)
    _assert_same_fn_and_grads(list(fn.parameters()), x, got, _explicit_vector_ci(fn, x))


@pytest.mark.parametrize("hidden", [[5], [5, 3]])
def test_shared_mlp_equals_explicit(hidden: list[int]) -> None:
    _seeded(7)
    fn = SharedMLPCI(d_in=6, C=4, hidden=hidden).to(F64)
    _randomise_biases(fn, 8)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    got = fn(x)
    assert got.shape == (2, 3, 4)
    _assert_same_fn_and_grads(list(fn.parameters()), x, got, _explicit_shared_ci(fn, x))


def _std(t: Tensor) -> float:
    return float(t.detach().std())


def test_init_std() -> None:
    """Hidden layers Kaiming normal with ReLU gain (sqrt(2/fan_in)), the last layer linear gain
    (1/sqrt(fan_in)), biases zero. Sample sizes >= 4k entries, so the std estimate is within ~2%
    (s.e. 1/sqrt(2n)); the bounds below allow 10%."""
    _seeded(9)
    rel = 0.1
    mlp = MLPCI(C=500, hidden=[16, 8])
    assert _std(mlp.weights[0]) == pytest.approx(math.sqrt(2.0), rel=rel)  # fan_in 1
    assert _std(mlp.weights[1]) == pytest.approx(math.sqrt(2.0 / 16), rel=rel)
    assert _std(mlp.w_out) == pytest.approx(1 / math.sqrt(8), rel=rel)
    vec = VectorMLPCI(d_in=50, C=100, hidden=[16, 8])
    assert _std(vec.w_in) == pytest.approx(math.sqrt(2.0 / 50), rel=rel)
    assert _std(vec.weights[0]) == pytest.approx(math.sqrt(2.0 / 16), rel=rel)
    assert _std(vec.w_out) == pytest.approx(1 / math.sqrt(8), rel=rel)
    sh = SharedMLPCI(d_in=100, C=300, hidden=[200])
    assert _std(sh.layers[0].weight) == pytest.approx(math.sqrt(2.0 / 100), rel=rel)
    assert _std(sh.out.weight) == pytest.approx(1 / math.sqrt(200), rel=rel)
    for fn in (mlp, vec, sh):
        for name, p in fn.named_parameters():
            if _is_bias(name):
                assert not p.detach().any(), name


def test_make_ci_function_kinds() -> None:
    assert isinstance(make_ci_function("mlp", 4, 3, [8]), MLPCI)
    assert isinstance(make_ci_function("mlp", None, 3, [8]), MLPCI)  # embeddings: mlp only
    assert isinstance(make_ci_function("vector_mlp", 4, 3, [8]), VectorMLPCI)
    assert isinstance(make_ci_function("shared_mlp", 4, 3, [8]), SharedMLPCI)
    assert make_ci_function("mlp", 4, 3, [8]).uses_component_acts
    assert not make_ci_function("shared_mlp", 4, 3, [8]).uses_component_acts
    assert not make_ci_function("vector_mlp", 4, 3, [8]).uses_component_acts


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (("vector_mlp", None, 3, [8]), ValueError, "ci_fn 'vector_mlp' needs a layer input"),
        (("shared_mlp", None, 3, [8]), ValueError, "embedding layers support only 'mlp'"),
        (("transformer", 4, 3, [8]), ValueError, "^ci_fn must be one of 'mlp', 'vector_mlp'"),
        (("mlp", 4, 3, [0]), ValueError, "^ci_hidden must be an integer >= 1, got 0"),
        (("vector_mlp", 4, 3, [8, -1]), ValueError, "^ci_hidden must be an integer >= 1"),
        (("vector_mlp", 4, 3, []), ValueError, "^ci_hidden must list at least one width"),
        (("mlp", 4, 0, [8]), ValueError, "^C must be an integer >= 1, got 0"),
    ],
)
def test_make_ci_function_errors(args: tuple, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match) as e:
        make_ci_function(*args)
    assert "\n" not in str(e.value)


def test_ci_output() -> None:
    z = torch.tensor([[-1.0, 0.5, 2.0]])
    out = ci_output(z)
    assert torch.equal(out.lower, torch.tensor([[0.0, 0.5, 1.0]]))
    torch.testing.assert_close(out.upper, torch.tensor([[0.0, 0.5, 1.01]]))
    assert out.pre_sigmoid is z
