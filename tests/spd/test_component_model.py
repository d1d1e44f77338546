"""ComponentModel (sheet §1): slots in place of decomposed layers, checked against explicit
references on the bundled TMS target, a small Linear + Embedding module and a tiny Mini-GPT."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from sparselens.lm.model import MiniGPT, MiniGPTConfig
from sparselens.spd import component_model as component_model_mod
from sparselens.spd.component_model import BaseInput, ComponentModel, DecomposedModule
from sparselens.spd.components import EmbeddingComponents, TiedLinearComponents
from sparselens.spd.targets.io import load_bundled_target
from sparselens.spd.targets.tms import tms_decomposition
from sparselens.train.config import format_validation_error

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _replaced(x: Tensor, V: Tensor, U: Tensor, W: Tensor, b, m: Tensor, r) -> Tensor:
    """Explicit replaced linear layer ``(xV * m) U + r x (W - (VU)^T)^T + b``."""
    out = ((x @ V) * m) @ U
    if r is not None:
        out = out + r.unsqueeze(-1) * (x @ (W - (V @ U).T).T)
    return out if b is None else out + b


# -- targets ------------------------------------------------------------------------------------
def _tms():
    return load_bundled_target("tms_5-2")


class Toy(nn.Module):
    """Embedding -> residual Linear-ReLU-Linear MLP -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6, bias=False)
        self.head = nn.Linear(6, 10)

    def forward(self, tok: Tensor) -> Tensor:
        h = self.embed(tok)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


TOY_MODULES = [{"pattern": "embed", "C": 4}, {"pattern": "fc*", "C": 3}]


def _toy_tokens(seed: int = 0) -> Tensor:
    return torch.randint(0, 10, (3, 5), generator=_gen(seed))


def _gpt() -> MiniGPT:
    torch.manual_seed(0)
    cfg = MiniGPTConfig(vocab_size=16, d_model=8, n_heads=2, n_layers=2, d_ff=12, context_len=8)
    return MiniGPT(cfg)


GPT_MODULES = [
    {"pattern": "blocks.*.mlp.fc_in", "C": 5},
    {"pattern": "blocks.*.mlp.fc_out", "C": 4},
]


def _gpt_tokens(seed: int = 0) -> Tensor:
    return torch.randint(0, 16, (2, 6), generator=_gen(seed))


def _all_masks(model: ComponentModel, inputs: dict[str, Tensor], seed: int, fill=None):
    """Random (or constant) masks and delta masks of the right shape for every layer."""
    g = _gen(seed)
    masks, deltas = {}, {}
    for n in model.names:
        comp = model.component(n)
        x = inputs[n]
        batch = tuple(x.shape) if isinstance(comp, EmbeddingComponents) else tuple(x.shape[:-1])
        dt = comp.V.dtype
        if fill is None:
            masks[n] = torch.rand((*batch, comp.C), generator=g, dtype=dt)
            deltas[n] = torch.rand(batch, generator=g, dtype=dt)
        else:
            masks[n] = torch.full((*batch, comp.C), fill, dtype=dt)
            deltas[n] = torch.full(batch, fill, dtype=dt)
    return masks, deltas


CASES = {
    "tms": (
        _tms,
        lambda: tms_decomposition(_tms().cfg, 20),
        lambda s: torch.rand(7, 5, generator=_gen(s)),
    ),
    "toy": (Toy, lambda: TOY_MODULES, _toy_tokens),
    "gpt": (_gpt, lambda: GPT_MODULES, _gpt_tokens),
}


def _build(case: str, dtype: torch.dtype = torch.float32):
    make_target, modules, inputs = CASES[case]
    target = make_target().to(dtype)
    x = inputs(0)
    if x.is_floating_point():
        x = x.to(dtype)
    with torch.no_grad():
        before = target(x)
    model = ComponentModel(target, modules()).to(dtype)
    return model, target, x, before


@pytest.fixture(params=["rows", "select"])
def route_path(request, monkeypatch) -> str:
    """Run a test with routes applied as row selections (CPU, 2-d inputs) and as a select on the
    masks (the path taken elsewhere), so that both stay covered on CPU."""
    if request.param == "select":
        monkeypatch.setattr(component_model_mod, "_route_as_rows", lambda *a: False)
    return request.param


# -- the target is preserved ----------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_target_output_equals_target_before_wrapping(case: str) -> None:
    model, target, x, before = _build(case)
    out, cache = model.target_output(x)
    assert torch.equal(out, before) and cache == {}
    out2, cache = model.target_output(x, cache_inputs=True)
    assert torch.equal(out2, before) and list(cache) == model.names
    assert not out2.requires_grad
    # no masks at all: the plain forward is the target too
    assert torch.equal(model(x), before)
    assert model.target is target and not target.training
    assert not any(p.requires_grad for p in target.parameters() if not _is_component(model, p))


def _is_component(model: ComponentModel, p: Tensor) -> bool:
    return any(p is q for q in model.components.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_all_ones_masks_with_unit_delta_give_the_target(case: str) -> None:
    """m = 1 and r = 1 on every layer: the components plus the delta sum to W exactly."""
    model, _, x, before = _build(case, F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 0, fill=1.0)
    torch.testing.assert_close(model(x, masks, deltas), before, rtol=1e-11, atol=1e-11)
    # without the delta the output differs (random U, V are far from W)
    assert not torch.allclose(model(x, masks), before, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_delta", [True, False])
def test_routes_false_give_the_target(case: str, with_delta: bool, route_path: str) -> None:
    """Routed-off positions give the target exactly, routed-on ones the replaced forward, with
    or without delta masks. Catches routing implemented as the mask ``m = 1`` alone, which
    without the delta would output ``x (VU)^T + b``."""
    model, _, x, before = _build(case, F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 1 if with_delta else 5)
    d = deltas if with_delta else None
    routes = {n: torch.zeros(m.shape[:-1], dtype=torch.bool) for n, m in masks.items()}
    torch.testing.assert_close(model(x, masks, d, routes), before, rtol=1e-12, atol=1e-12)
    routes_on = {n: ~r for n, r in routes.items()}
    torch.testing.assert_close(
        model(x, masks, d, routes_on), model(x, masks, d), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_delta", [True, False])
def test_routed_off_positions_send_no_gradient(
    case: str, with_delta: bool, route_path: str
) -> None:
    """Every position routed to the original layers: the gradient into U, V and the masks is
    exactly zero (the original layer is frozen). Catches a routed-off output that still depends on
    the components (e.g. ``x (VU)^T + x (W - (VU)^T)^T``, equal only up to rounding)."""
    model, _, x, _ = _build(case, F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 6)
    masks = {n: m.clone().requires_grad_(True) for n, m in masks.items()}
    off = {n: torch.zeros(m.shape[:-1], dtype=torch.bool) for n, m in masks.items()}
    model(x, masks, deltas if with_delta else None, off).square().sum().backward()
    for n, m in masks.items():
        assert m.grad is None or not m.grad.any(), n
    for name, p in model.components.named_parameters():
        assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_delta", [True, False])
def test_rows_equal_routes_on_whole_rows(case: str, with_delta: bool) -> None:
    """``rows`` (each layer replaced on its own subset of the first axis, masks given only
    there) equals routes that are True on exactly those rows: same output, same gradients into
    U, V and the masks. Catches rows mapped to the wrong positions (or the unselected rows
    running on components)."""
    model, _, x, _ = _build(case, F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 7)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(8)
    rows, routes = {}, {}
    for name, m in masks.items():
        idx = torch.randperm(n, generator=gen)[: max(1, n // 2)].sort().values
        rows[name] = idx
        r = torch.zeros(m.shape[:-1], dtype=torch.bool)
        r[idx] = True
        routes[name] = r

    def grads(out: Tensor, leaves: list[Tensor]) -> list[Tensor]:
        params = list(model.components.parameters())
        gs = torch.autograd.grad(out.square().sum(), leaves + params, allow_unused=True)
        return [torch.zeros(()) if g is None else g for g in gs]

    full = {k: v.clone().requires_grad_(True) for k, v in masks.items()}
    d_full = deltas if with_delta else None
    want = model(x, full, d_full, routes)
    g_want = grads(want, list(full.values()))
    sub = {k: v[rows[k]].detach().clone().requires_grad_(True) for k, v in masks.items()}
    d_sub = {k: v[rows[k]] for k, v in deltas.items()} if with_delta else None
    got = model(x, sub, d_sub, rows=rows)
    g_got = grads(got, list(sub.values()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    nm = len(full)
    for i, k in enumerate(full):  # mask gradients: the selected rows of the routed ones
        torch.testing.assert_close(g_got[i], g_want[i][rows[k]], rtol=1e-10, atol=1e-12)
    for gw, gg in zip(g_want[nm:], g_got[nm:], strict=True):  # U, V, CI parameters
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="the selected rows"):
        model(x, masks, d_full, rows=rows)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_rows", [False, True])
def test_base_input_reuses_one_copy(case: str, with_rows: bool) -> None:
    """On a 3-fold repeated batch, ``base`` (the first layer's input for one copy, plus its
    component activations) gives the same output and gradients as recomputing on every copy,
    with and without ``rows``. Catches row i of copy k mapped to a row other than i."""
    model, _, x, _ = _build(case, F64)
    _, cache = model.target_output(x, cache_inputs=True)
    first = next(iter(cache))
    x3 = x.repeat(3, *([1] * (x.dim() - 1)))
    _, cache3 = model.target_output(x3, cache_inputs=True)
    masks, deltas = _all_masks(model, cache3, 9)
    rows = None
    if with_rows:
        n = x3.shape[0]
        rows = {k: torch.arange(n)[torch.arange(n) % 3 != 1] for k in masks}
        masks = {k: m[rows[k]] for k, m in masks.items()}
        deltas = {k: d[rows[k]] for k, d in deltas.items()}
    params = list(model.components.parameters())
    want = model(x3, masks, deltas, rows=rows)
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    acts = model.component(first).acts(cache[first])
    for base in (BaseInput(first, cache[first]), BaseInput(first, cache[first], acts)):
        got = model(x3, masks, deltas, rows=rows, base=base)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
        for a, b in zip(g_got, g_want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bad = BaseInput(first, cache[first][..., :-1])  # not what the layer sees, repeated
    with pytest.raises(ValueError, match=f"base input of '{first}' has shape"):
        model(x3, masks, deltas, rows=rows, base=bad)


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("kind", ["random", "off", "on", "first"])
def test_routes_as_rows_equal_routes_as_a_select(
    with_rows: bool, with_delta: bool, kind: str, monkeypatch
) -> None:
    """TMS (2-d layer inputs: the case the row path takes) on a 3-fold repeated batch with
    ``base``, per-position routes random / all off / all on / only the first row, with and
    without variant ``rows`` and delta masks: running only the routed-on rows on the components
    gives the output and gradients (U, V, masks) of the select on the masks. Catches masks or
    delta masks not reduced to the routed-on rows (misaligned with them), routed-on rows not
    composed with the variant rows, and routed-off rows left out of the output."""
    model, _, x, _ = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    first = next(iter(cache))
    x3 = x.repeat(3, 1)
    _, cache3 = model.target_output(x3, cache_inputs=True)
    masks, deltas = _all_masks(model, cache3, 10)
    rows = None
    if with_rows:
        n = x3.shape[0]
        rows = {k: torch.arange(n)[torch.arange(n) % 3 != 1] for k in masks}
        masks = {k: m[rows[k]] for k, m in masks.items()}
        deltas = {k: d[rows[k]] for k, d in deltas.items()}
    gen = _gen(11)
    routes = {}
    for k, m in masks.items():
        r = torch.rand(m.shape[:-1], generator=gen) < 0.6
        if kind != "random":
            r = torch.zeros_like(r) if kind in ("off", "first") else torch.ones_like(r)
            r[0] = kind != "off"
        routes[k] = r
    params = list(model.components.parameters())

    def run() -> tuple[Tensor, list[Tensor]]:
        leaves = {k: m.clone().requires_grad_(True) for k, m in masks.items()}
        d = deltas if with_delta else None
        out = model(x3, leaves, d, routes, rows=rows, base=BaseInput(first, cache[first]))
        gs = torch.autograd.grad(
            out.square().sum(), list(leaves.values()) + params, allow_unused=True
        )
        return out, [torch.zeros(()) if g is None else g for g in gs]

    got, g_got = run()
    monkeypatch.setattr(component_model_mod, "_route_as_rows", lambda *a: False)
    want, g_want = run()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_route_of_the_wrong_shape_is_an_error(route_path: str) -> None:
    """A route must have the masks' batch shape on both paths (a (1,) route would broadcast on
    one and select row 0 on the other)."""
    model, _, x, _ = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 12)
    for bad in (torch.ones(1, dtype=torch.bool), torch.ones(5, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"^routes\['linear1'\] must have shape \(7,\)"):
            model(x, masks, deltas, {"linear1": bad})


def test_route_as_rows_only_where_it_applies() -> None:
    """The row path is taken for CPU linear layers on one batch axis, not for token / sequence
    inputs (their routes cover two axes) or embeddings."""
    model, _, x, _ = _build("tms", F64)
    comp = model.component("linear1")
    route = torch.ones(x.shape[0], dtype=torch.bool)
    assert component_model_mod._route_as_rows(x, route, comp)
    x3 = x.unsqueeze(0)
    assert not component_model_mod._route_as_rows(x3, route.unsqueeze(0), comp)
    toy = _build("toy", F64)[0]
    emb = next(c for c in toy.components.values() if isinstance(c, EmbeddingComponents))
    assert not component_model_mod._route_as_rows(x, route, emb)


def test_tms_replaced_forward_equals_explicit() -> None:
    """Both layers on components: ``relu(layer2(layer1(x)))`` with explicit replaced layers,
    ``linear2`` using ``V = U_1^T``, ``U = V_1^T``, ``W = W_1^T`` and its own bias."""
    model, target, x, _ = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 2)
    got = model(x, masks, deltas)
    c1 = model.component("linear1")
    W1 = target.linear1.weight
    b2 = target.linear2.bias
    h = _replaced(x, c1.V, c1.U, W1, None, masks["linear1"], deltas["linear1"])
    out = _replaced(h, c1.U.T, c1.V.T, W1.T, b2, masks["linear2"], deltas["linear2"])
    torch.testing.assert_close(got, torch.relu(out), rtol=1e-12, atol=1e-12)
    assert isinstance(model.component("linear2"), TiedLinearComponents)


def test_tms_per_position_routes_select_rows(route_path: str) -> None:
    """Routes choose per position between the replaced and the original output of a layer."""
    model, _, x, before = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 3)
    m1, d1 = {"linear1": masks["linear1"]}, {"linear1": deltas["linear1"]}
    route = torch.tensor([True, False, True, True, False, False, True])
    got = model(x, m1, d1, {"linear1": route})
    full = model(x, m1, d1)
    want = torch.where(route.unsqueeze(-1), full, before)  # linear1 -> linear2 row by row
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layers_not_in_masks_keep_target_weights_toy() -> None:
    """Only ``fc1`` masked: an explicit forward of Toy with the target's own weights elsewhere.

    Catches other layers running on their (unmasked) components instead of the target."""
    model, target, tok, _ = _build("toy", F64)
    _, cache = model.target_output(tok, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 4)
    c = model.component("fc1")
    got = model(tok, {"fc1": masks["fc1"]}, {"fc1": deltas["fc1"]})
    E = target.embed.weight
    fc1, fc2, head = target.fc1.original, target.fc2.original, target.head
    h = E[tok]
    a = _replaced(h, c.V, c.U, fc1.weight, fc1.bias, masks["fc1"], deltas["fc1"])
    h = h + torch.relu(a) @ fc2.weight.T
    want = h @ head.weight.T + head.bias
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the embedding alone, no delta
    ce = model.component("embed")
    got = model(tok, {"embed": masks["embed"]})
    h = ((ce.V[tok]) * masks["embed"]) @ ce.U
    h = h + fc2(torch.relu(fc1(h)))
    torch.testing.assert_close(got, head(h), rtol=1e-12, atol=1e-12)


def test_gpt_equals_hooked_reference() -> None:
    """Mini-GPT with every MLP layer replaced equals a deep copy of the target whose layers'
    outputs are overwritten by forward hooks with the explicit formula (the reference's way)."""
    torch.manual_seed(0)
    target = _gpt().double()
    ref = copy.deepcopy(target)
    model = ComponentModel(target, GPT_MODULES).double()
    tok = _gpt_tokens(1)
    _, cache = model.target_output(tok, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 5)
    assert masks["blocks.0.mlp.fc_in"].shape == (2, 6, 5)
    got = model(tok, masks, deltas)

    def hook(name: str):
        comp = model.component(name)

        def fn(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return _replaced(
                args[0], comp.V, comp.U, mod.weight, mod.bias, masks[name], deltas[name]
            )

        return fn

    handles = [ref.get_submodule(n).register_forward_hook(hook(n)) for n in model.names]
    try:
        want = ref(tok)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert model.names == [
        "blocks.0.mlp.fc_in",
        "blocks.0.mlp.fc_out",
        "blocks.1.mlp.fc_in",
        "blocks.1.mlp.fc_out",
    ]


def test_gpt_embedding_decomposed_and_tied_head_still_reads_it() -> None:
    """Decomposing ``embed`` (tied to ``head`` in Mini-GPT) leaves the head on the target weight."""
    target = _gpt().double()
    tok = _gpt_tokens(2)
    with torch.no_grad():
        before = target(tok)
    model = ComponentModel(target, [{"pattern": "embed", "C": 6}]).double()
    _, cache = model.target_output(tok, cache_inputs=True)
    assert torch.equal(cache["embed"], tok)
    masks, deltas = _all_masks(model, cache, 6, fill=1.0)
    assert masks["embed"].shape == (2, 6, 6)
    torch.testing.assert_close(model(tok, masks, deltas), before, rtol=1e-11, atol=1e-11)
    assert target.embed.weight is target.head.weight  # the slot exposes the original's weight


def test_cached_inputs_are_the_layer_inputs() -> None:
    model, target, x, _ = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    assert torch.equal(cache["linear1"], x)
    torch.testing.assert_close(cache["linear2"], x @ target.linear1.weight.T, rtol=0, atol=1e-14)


# -- CI and weight deltas -----------------------------------------------------------------------
def test_causal_importance_and_weight_deltas() -> None:
    model, _, tok, _ = _build("toy", F64)
    _, cache = model.target_output(tok, cache_inputs=True)
    ci = model.causal_importance(cache)
    assert list(ci) == model.names
    for n in model.names:
        comp, fn = model.component(n), model.ci_fn(n)
        z = fn(cache[n], comp.acts(cache[n]))
        torch.testing.assert_close(ci[n].pre_sigmoid, z, rtol=0, atol=0)
        assert ci[n].lower.shape == (*tok.shape, comp.C)
        assert (ci[n].lower >= 0).all() and (ci[n].lower <= 1).all()
    # CI inputs are not detached: with mlp CI fns the penalty reaches V through h = x V
    sum(c.upper.sum() for c in ci.values()).backward()
    for n in model.names:
        assert model.component(n).V.grad.abs().sum() > 0
    deltas = model.weight_deltas()
    assert list(deltas) == model.names
    for n, d in deltas.items():
        torch.testing.assert_close(d, model.component(n).weight_delta(), rtol=0, atol=0)
        assert d.requires_grad
    with pytest.raises(KeyError, match="causal_importance needs the input of 'fc1'"):
        model.causal_importance({"embed": tok})


# -- parameters, tying, ownership ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_parameters_are_components_and_ci_fns_only(case: str) -> None:
    model, _, _, _ = _build(case)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(n.startswith(("components.", "ci_fns.")) for n, _ in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith("target.") for n in frozen)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert len({p.data_ptr() for p in params}) == len(params)  # no storage shared either


def test_tms_tied_pair_is_one_parameter_set() -> None:
    """linear2's components are views of linear1's, so one Adam step moves the tied weights by
    lr, not 2 lr. Catches the reference's two storage-sharing Parameters (sheet §13 #6)."""
    model, _, _, _ = _build("tms")
    comp_params = sorted(n for n, _ in model.components.named_parameters())
    assert comp_params == ["linear1.U", "linear1.V"]
    tied = model.component("linear2")
    before_v, before_u = tied.V.detach().clone(), tied.U.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-3
    opt = torch.optim.Adam(params, lr=lr)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(tied.V.detach() - before_v, torch.full_like(before_v, -lr))
    torch.testing.assert_close(tied.U.detach() - before_u, torch.full_like(before_u, -lr))


def test_tms_tied_gradient_sums_both_uses() -> None:
    """The gradient of a loss through both layers lands once, summed, on linear1's U and V."""
    model, target, x, _ = _build("tms", F64)
    _, cache = model.target_output(x, cache_inputs=True)
    masks, deltas = _all_masks(model, cache, 7)
    model(x, masks, deltas).square().sum().backward()
    c1 = model.component("linear1")
    gV, gU = c1.V.grad.clone(), c1.U.grad.clone()
    # reference: separate leaf copies for the two uses, gradients summed by hand
    V1 = c1.V.detach().clone().requires_grad_(True)
    U1 = c1.U.detach().clone().requires_grad_(True)
    V2 = c1.U.detach().T.clone().requires_grad_(True)
    U2 = c1.V.detach().T.clone().requires_grad_(True)
    W1 = target.linear1.weight
    h = _replaced(x, V1, U1, W1, None, masks["linear1"], deltas["linear1"])
    out = _replaced(h, V2, U2, W1.T, target.linear2.bias, masks["linear2"], deltas["linear2"])
    torch.relu(out).square().sum().backward()
    torch.testing.assert_close(gV, V1.grad + U2.grad.T, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gU, U1.grad + V2.grad.T, rtol=1e-11, atol=1e-12)


def test_model_takes_its_target_over() -> None:
    """The matched submodules are replaced in place: build one component model per target."""
    target = Toy()
    fc1 = target.fc1
    model = ComponentModel(target, TOY_MODULES)
    assert target.fc1 is not fc1 and target.fc1.original is fc1
    assert torch.equal(target.fc1.weight, fc1.weight)  # still readable
    with pytest.raises(ValueError, match=r"^target is already decomposed \(module 'embed'"):
        ComponentModel(target, TOY_MODULES)  # the layers are slots now
    # a fresh target gives an independent model
    other = ComponentModel(Toy(), TOY_MODULES)
    assert other.target is not model.target


# -- errors -------------------------------------------------------------------------------------
def test_mask_shape_error_names_the_layer() -> None:
    model, _, tok, _ = _build("toy")
    with pytest.raises(ValueError, match=r"^masks\['fc1'\] must have shape \(3, 5, 3\)") as e:
        model(tok, {"fc1": torch.ones(3, 5, 4)})
    assert "got (3, 5, 4)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^masks\['embed'\] must have shape \(3, 5, 4\)"):
        model(tok, {"embed": torch.ones(3, 4)})
    model_t, _, x, _ = _build("tms")
    with pytest.raises(ValueError, match=r"masks\['linear2'\] must have shape \(7, 20\)"):
        model_t(x, {"linear2": torch.ones(20)})


@pytest.mark.parametrize("what", ["masks", "delta_masks", "routes"])
def test_unknown_layer_in_masks(what: str) -> None:
    model, _, tok, _ = _build("toy")
    with pytest.raises(ValueError, match=rf"^{what}: 'head' is not a decomposed module"):
        model(tok, **{what: {"head": torch.ones(1)}})


def _one_line_error(exc: type[Exception], match: str, target: nn.Module, modules) -> None:
    with pytest.raises(exc, match=match) as e:
        ComponentModel(target, modules)
    assert "\n" not in str(e.value)


def test_construction_errors() -> None:
    _one_line_error(
        ValueError,
        r"^decomposition: 'nope\*' matches no module",
        Toy(),
        [{"pattern": "nope*", "C": 2}],
    )
    _one_line_error(
        ValueError,
        r"^decomposition: module 'fc1' matches both 'fc\*' and 'fc1'",
        Toy(),
        [{"pattern": "fc*", "C": 2}, {"pattern": "fc1", "C": 3}],
    )
    _one_line_error(
        TypeError,
        r"^decomposition: ln_f: cannot decompose a LayerNorm",
        _gpt(),
        [{"pattern": "ln_f", "C": 2}],
    )
    _one_line_error(ValueError, "at least one module", Toy(), [])
    with pytest.raises(ValueError, match=r"^decomposition: embed: ci_fn 'vector_mlp'"):
        ComponentModel(Toy(), [{"pattern": "embed", "C": 2}], ci_fn="vector_mlp")
    with pytest.raises(TypeError, match=r"target must be an nn\.Module, got dict"):
        ComponentModel({}, TOY_MODULES)  # type: ignore[arg-type]


def test_tied_to_errors() -> None:
    _one_line_error(
        ValueError,
        r"^decomposition: 'fc2' is tied_to 'fc9', which is not a decomposed, untied module",
        Toy(),
        [{"pattern": "fc1", "C": 2}, {"pattern": "fc2", "C": 2, "tied_to": "fc9"}],
    )
    _one_line_error(
        ValueError,
        r"^decomposition: tied_to 'embed' must be a linear layer",
        Toy(),
        [{"pattern": "embed", "C": 2}, {"pattern": "fc1", "C": 2, "tied_to": "embed"}],
    )
    _one_line_error(
        ValueError,
        r"^decomposition: 'linear2' must have C=20 like 'linear1'",
        _tms(),
        [{"pattern": "linear1", "C": 20}, {"pattern": "linear2", "C": 3, "tied_to": "linear1"}],
    )
    _one_line_error(  # fc2 (8 -> 6) is not the transpose of head (6 -> 10)
        ValueError,
        r"^tied_to: weight of shape \(6, 8\) is not the transpose",
        Toy(),
        [{"pattern": "head", "C": 2}, {"pattern": "fc2", "C": 2, "tied_to": "head"}],
    )


@pytest.mark.parametrize(
    ("spec", "start"),
    [
        ({"pattern": "fc1", "C": 0}, "C must be an integer >= 1"),
        ({"pattern": "", "C": 2}, "pattern"),
        ({"pattern": "x", "C": 2, "k": 1}, "unknown setting 'k'"),
    ],
)
def test_decomposed_module_validation(spec: dict, start: str) -> None:
    with pytest.raises(ValidationError) as e:
        DecomposedModule.model_validate(spec)
    msg = format_validation_error(e.value, DecomposedModule)
    assert msg.startswith(start) and "\n" not in msg


def test_component_and_ci_fn_lookup_errors() -> None:
    model, _, _, _ = _build("toy")
    with pytest.raises(KeyError, match="'head' is not decomposed; decomposed: embed, fc1, fc2"):
        model.component("head")
    with pytest.raises(KeyError, match="'head' is not decomposed"):
        model.ci_fn("head")


def test_output_index() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x.sum(-1), self.lin(x)

    x = torch.randn(4, 3, generator=_gen(0))
    target = Pair()
    with torch.no_grad():
        want = target(x)[1]
    model = ComponentModel(target, [{"pattern": "lin", "C": 2}], output_index=1)
    out, _ = model.target_output(x)
    assert torch.equal(out, want)
    assert model(x, {"lin": torch.ones(4, 2)}).shape == (4, 2)
