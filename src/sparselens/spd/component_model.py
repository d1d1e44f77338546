"""A frozen target model whose chosen Linear/Embedding layers can run on their components.

:class:`ComponentModel` (Bushnaq et al. 2025, §2; sheet §1) takes a target ``nn.Module`` and a
list of :class:`DecomposedModule` entries (an fnmatch ``pattern`` over module paths, ``C``
components each, optionally ``tied_to`` another decomposed layer whose weight is this one's
transpose). It freezes the target and puts a thin slot module in place of each matched layer --
no hooks: the slot reads a per-call state set by the component model and either runs the
original layer (recording its input when asked) or the replaced forward of
:class:`~sparselens.spd.components.Components` with the given masks.

* :meth:`ComponentModel.target_output` -- the target's output, optionally with every decomposed
  layer's input, without gradient (the target is frozen);
* :meth:`ComponentModel.causal_importance` -- :class:`~sparselens.spd.ci_functions.CIOutput` per
  layer from the cached inputs;
* ``model(x, masks, delta_masks, routes, rows)`` -- layers named in ``masks`` run on their
  components; ``delta_masks`` add the delta component ``r * x (W - (VU)^T)^T``; ``routes`` (bool
  per position) choose per position between the replaced and the original output (a routed-off
  position runs with ``m = r = 1``, which is the original layer exactly; on CPU, for a linear
  layer on one batch axis, the routed-on positions are instead selected as ``rows``, so the
  routed-off ones cost no component products -- a host read of the route that costs nothing
  there and that accelerators skip); ``rows`` restrict a
  layer's replacement to some rows of the input's first axis (the other rows run the original
  layer and cost no component products). Layers not in ``masks`` keep the target's weights.
  Every mask's leading (batch) shape equals the layer input's (or its selected rows'), so
  stacking several mask draws or loss variants along the batch axis is one batched pass
  (:func:`~sparselens.spd.losses.compute_losses`).
* :meth:`ComponentModel.weight_deltas` -- ``W - (VU)^T`` per layer, differentiable in U and V.

The target is taken over: its matched submodules are replaced in place, so build one component
model per target instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from sparselens.lm.hooks import module_names, resolve_patterns
from sparselens.spd.ci_functions import CIOutput, ci_output, make_ci_function
from sparselens.spd.components import (
    Components,
    EmbeddingComponents,
    LinearComponents,
    TiedLinearComponents,
    make_components,
)


class DecomposedModule(BaseModel):
    """Which modules to decompose: an fnmatch ``pattern`` over module paths, ``C`` components."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(min_length=1, description="fnmatch pattern over module paths")
    C: int = Field(ge=1, le=2**20, description="components per matched module")
    tied_to: str | None = Field(
        None,
        description="a decomposed module whose weight is this one's transpose (one module only)",
    )


class BaseInput(NamedTuple):
    """The first decomposed layer's input for ONE copy of a batch that the model's input repeats
    along dim 0 (``x.repeat(n, ...)``, as the batched loss variants do): that layer's input is then
    the same rows repeated, so it reuses ``x V`` and ``x W^T`` of one copy (and ``acts``, the
    activations the CI function already formed, if given) instead of recomputing them n times.

    Valid when the layer is called once per forward (:attr:`ComponentModel.first_layer`) and the
    frozen target before it treats rows independently (eval mode: no batch statistics)."""

    name: str
    x: Tensor
    acts: Tensor | None = None


@dataclass
class _CallState:
    """What the slots read during one forward call of the component model."""

    cache: dict[str, Tensor] | None = None
    masks: Mapping[str, Tensor] = field(default_factory=dict)
    delta_masks: Mapping[str, Tensor] = field(default_factory=dict)
    routes: Mapping[str, Tensor] = field(default_factory=dict)
    rows: Mapping[str, Tensor] = field(default_factory=dict)
    base: BaseInput | None = None
    calls: dict[str, int] = field(default_factory=dict)  # slot calls while caching

    def reset(self) -> None:
        self.cache, self.masks, self.delta_masks, self.routes, self.rows = None, {}, {}, {}, {}
        self.base, self.calls = None, {}


class _Slot(nn.Module):
    """Stands in for one decomposed layer inside the target (see the module docstring)."""

    def __init__(self, name: str, original: nn.Module, state: _CallState) -> None:
        super().__init__()
        self.original = original
        self._name = name
        self._state = state
        self._components: list[Components] = []  # set by ComponentModel; not registered here

    @property
    def weight(self) -> Tensor:
        """The original layer's weight (the target stays readable as before)."""
        return self.original.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.original, "bias", None)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st, name = self._state, self._name
        if st.cache is not None:
            st.cache[name] = x
            st.calls[name] = st.calls.get(name, 0) + 1
        mask = st.masks.get(name)
        if mask is None:
            return self.original(x, *args, **kwargs)
        comp = self._components[0]
        rows = st.rows.get(name)
        xs = x if rows is None else x.index_select(0, rows)
        expected = (*xs.shape, comp.C) if isinstance(comp, EmbeddingComponents) else None
        if expected is None:
            expected = (*xs.shape[:-1], comp.C)
        if tuple(mask.shape) != expected:
            where = "the layer input's batch shape" if rows is None else "the selected rows"
            raise ValueError(
                f"masks[{name!r}] must have shape {expected} ({where} and C), "
                f"got {tuple(mask.shape)}"
            )
        delta = st.delta_masks.get(name)
        route = st.routes.get(name)
        if route is not None and tuple(route.shape) != tuple(mask.shape[:-1]):
            raise ValueError(
                f"routes[{name!r}] must have shape {tuple(mask.shape[:-1])} (the masks' batch "
                f"shape), got {tuple(route.shape)}"
            )
        if route is not None and _route_as_rows(x, route, comp):
            # run only the routed-on rows on the components (the others are the original layer,
            # as below): one host read of the route saves the routed-off rows' products
            on = route.nonzero().squeeze(1)
            rows = on if rows is None else rows.index_select(0, on)
            mask = mask.index_select(0, on)
            delta = None if delta is None else delta.index_select(0, on)
            route, xs = None, x.index_select(0, rows)
        if route is not None:
            # Routed-off positions take m = r = 1: (h * (m - r)) U + r x W^T + b is then exactly
            # the original x W^T + b with no gradient into U, V or the masks -- a select on the
            # (B, C) masks instead of on the (B, d_out) outputs (components.py's form).
            one = mask.new_ones(())
            mask = torch.where(route.unsqueeze(-1), mask, one)
            delta = (~route).to(mask.dtype) if delta is None else torch.where(route, delta, one)
        acts = y0 = acts_sel = y0_sel = None  # None: formed from x below / by comp
        base, st.base = st.base, None  # only the first slot reached sees the repeated input
        if base is not None and base.name == name:
            # x repeats base.x along dim 0: one copy's products, repeated or row-selected
            need_y0 = delta is not None or rows is not None
            a1, y1, n = self._base_products(comp, base, x, need_y0)
            if rows is None:
                acts, y0 = _repeat(a1, n), None if y1 is None else _repeat(y1, n)
            else:
                assert y1 is not None  # need_y0 with rows
                sel = rows % base.x.shape[0]
                acts_sel, y0_sel = a1.index_select(0, sel), y1.index_select(0, sel)
                y0 = _repeat(y1, n)
        if rows is None:
            return comp(x, mask, delta, acts=acts, target_product=y0)
        # only the selected rows run on the components; the others are the original layer
        y0 = comp.target_product(x) if y0 is None else y0
        y0_sel = y0.index_select(0, rows) if y0_sel is None else y0_sel
        part = comp(xs, mask, delta, acts=acts_sel, target_product=y0_sel)
        b = comp.bias
        return (y0 if b is None else y0 + b).index_copy(0, rows, part)

    @staticmethod
    def _base_products(
        comp: Components, base: BaseInput, x: Tensor, need_y0: bool
    ) -> tuple[Tensor, Tensor | None, int]:
        """``x V`` and (``need_y0``) ``x W^T`` of one copy, and the number of copies in ``x``."""
        n_base = base.x.shape[0]
        if x.shape[1:] != base.x.shape[1:] or n_base == 0 or x.shape[0] % n_base:
            raise ValueError(
                f"base input of {base.name!r} has shape {tuple(base.x.shape)}; the layer's "
                f"input {tuple(x.shape)} is not a repeat of it along dim 0"
            )
        acts = comp.acts(base.x) if base.acts is None else base.acts
        y0 = comp.target_product(base.x) if need_y0 else None
        return acts, y0, x.shape[0] // n_base


def _route_as_rows(x: Tensor, route: Tensor, comp: Components) -> bool:
    """Whether a layer's route is applied by selecting rows (CPU, one batch axis, a linear
    layer) rather than by a select on the masks (elsewhere: no host read of the route)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and route.dim() == 1
        and not isinstance(comp, EmbeddingComponents)
    )


def _repeat(t: Tensor, n: int) -> Tensor:
    """``t`` tiled ``n`` times along dim 0 (as ``x.repeat(n, ...)`` tiles the batch)."""
    return t.repeat(n, *([1] * (t.dim() - 1)))


def key(name: str) -> str:
    """A module path as a ModuleDict key (dots are not allowed there)."""
    return name.replace(".", "-")


class ComponentModel(nn.Module):
    """A frozen target with components and CI functions for its decomposed layers."""

    def __init__(
        self,
        target: nn.Module,
        modules: Sequence[DecomposedModule | Mapping[str, Any]],
        ci_fn: str = "mlp",
        ci_hidden: Sequence[int] = (16,),
        output_index: int | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(target, nn.Module):
            raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
        specs = [DecomposedModule.model_validate(m) for m in modules]
        if not specs:
            raise ValueError("decomposition must list at least one module")
        slots = [n for n, m in target.named_modules() if isinstance(m, _Slot)]
        if slots:
            raise ValueError(
                f"target is already decomposed (module {slots[0]!r} belongs to a "
                "ComponentModel); build a new model from an undecomposed copy of the target"
            )
        target.requires_grad_(False)
        target.eval()
        self.target = target
        self.output_index = output_index
        self._state = _CallState()
        self.first_layer: str | None = None
        """Set by ``target_output(..., cache_inputs=True)`` (see there)."""
        all_names = module_names(target)
        assigned: dict[str, DecomposedModule] = {}
        for spec in specs:
            for name in resolve_patterns(all_names, [spec.pattern], field="decomposition"):
                if name in assigned:
                    raise ValueError(
                        f"decomposition: module {name!r} matches both {assigned[name].pattern!r} "
                        f"and {spec.pattern!r}"
                    )
                assigned[name] = spec
        self.names: list[str] = [n for n in all_names if n in assigned]
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        originals = {n: target.get_submodule(n) for n in self.names}
        comps: dict[str, Components] = {}
        for name in [n for n in self.names if assigned[n].tied_to is None]:
            try:
                comps[name] = make_components(originals[name], assigned[name].C)
            except TypeError as e:
                raise TypeError(f"decomposition: {name}: {e}") from None
        for name in [n for n in self.names if assigned[n].tied_to is not None]:
            comps[name] = self._tied(name, assigned[name], originals[name], comps)
        hidden = list(ci_hidden)
        for name in self.names:
            comp = comps[name]
            self.components[key(name)] = comp
            d_in = None if isinstance(comp, EmbeddingComponents) else comp.d_in
            try:
                self.ci_fns[key(name)] = make_ci_function(ci_fn, d_in, comp.C, hidden)
            except ValueError as e:
                raise ValueError(f"decomposition: {name}: {e}") from None
        for name in self.names:
            slot = _Slot(name, originals[name], self._state)
            slot._components.append(comps[name])
            parent, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, child, slot)

    @staticmethod
    def _tied(
        name: str, spec: DecomposedModule, original: nn.Module, comps: dict[str, Components]
    ) -> Components:
        src = spec.tied_to
        source = comps.get(src or "")
        if source is None:
            raise ValueError(
                f"decomposition: {name!r} is tied_to {src!r}, which is not a decomposed, untied "
                f"module (decomposed: {', '.join(comps)})"
            )
        if not isinstance(source, LinearComponents):
            raise ValueError(f"decomposition: tied_to {src!r} must be a linear layer")
        if spec.C != source.C:
            raise ValueError(f"decomposition: {name!r} must have C={source.C} like {src!r}")
        return TiedLinearComponents(original, source)

    # -- access -----------------------------------------------------------------------------------
    def component(self, name: str) -> Components:
        """The components of decomposed layer ``name``."""
        self._check_name(name)
        return self.components[key(name)]  # type: ignore[return-value]

    def ci_fn(self, name: str) -> nn.Module:
        """The CI function of decomposed layer ``name``."""
        self._check_name(name)
        return self.ci_fns[key(name)]

    def _check_name(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(f"{name!r} is not decomposed; decomposed: {', '.join(self.names)}")

    # -- forward passes ---------------------------------------------------------------------------
    def _select(self, out: Any) -> Tensor:
        if self.output_index is None:
            return out
        if isinstance(self.output_index, int):
            return out[self.output_index]
        return getattr(out, self.output_index)

    def target_output(
        self, x: Tensor, cache_inputs: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The target's output and (``cache_inputs``) each decomposed layer's input; no grad.

        A layer called several times keeps its last call's input. With ``cache_inputs``,
        :attr:`first_layer` is set to the first decomposed layer this pass reached if it was
        called exactly once (the layer a :class:`BaseInput` may stand for), else None.
        """
        st = self._state
        st.reset()
        cache: dict[str, Tensor] = {}
        if cache_inputs:
            st.cache = cache
        try:
            with torch.no_grad():
                out = self._select(self.target(x))
            if cache_inputs:
                first = next(iter(cache), None)
                self.first_layer = first if first and st.calls[first] == 1 else None
        finally:
            st.reset()
        return out, cache

    def causal_importance(
        self, inputs: Mapping[str, Tensor], acts_out: dict[str, Tensor] | None = None
    ) -> dict[str, CIOutput]:
        """CI of every decomposed layer from its (cached) input; ``acts_out`` receives the
        component activations ``x V`` the CI functions formed (``mlp`` CI functions only)."""
        out = {}
        for name in self.names:
            x = inputs.get(name)
            if x is None:
                raise KeyError(f"causal_importance needs the input of {name!r}")
            fn = self.ci_fns[key(name)]
            acts = self.components[key(name)].acts(x) if fn.uses_component_acts else None
            if acts is not None and acts_out is not None:
                acts_out[name] = acts
            out[name] = ci_output(fn(x, acts))
        return out

    def forward(
        self,
        x: Tensor,
        masks: Mapping[str, Tensor] | None = None,
        delta_masks: Mapping[str, Tensor] | None = None,
        routes: Mapping[str, Tensor] | None = None,
        rows: Mapping[str, Tensor] | None = None,
        base: BaseInput | None = None,
    ) -> Tensor:
        """The target's output with the layers in ``masks`` replaced (module docstring).

        ``rows`` (int64 indices along the input's first axis, per layer) restricts a layer's
        replacement to those rows; its masks, delta masks and routes then cover only them.
        ``base``: see :class:`BaseInput` (the caller vouches that ``x`` repeats one batch whose
        first decomposed layer saw ``base.x``).
        """
        for what, given in (
            ("masks", masks),
            ("delta_masks", delta_masks),
            ("routes", routes),
            ("rows", rows),
        ):
            for name in given or {}:
                if name not in self.names:
                    raise ValueError(
                        f"{what}: {name!r} is not a decomposed module; decomposed: "
                        f"{', '.join(self.names)}"
                    )
        st = self._state
        st.reset()
        st.masks, st.delta_masks, st.routes = masks or {}, delta_masks or {}, routes or {}
        st.rows, st.base = rows or {}, base
        try:
            return self._select(self.target(x))
        finally:
            st.reset()

    def weight_deltas(self) -> dict[str, Tensor]:
        """``W - (VU)^T`` of every decomposed layer, differentiable in U and V."""
        return {n: self.components[key(n)].weight_delta() for n in self.names}


__all__ = ["BaseInput", "ComponentModel", "DecomposedModule", "key"]
