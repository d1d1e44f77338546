"""sparselens.lm.hooks: pattern resolution, capture (with early stop), output replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparselens.lm import MiniGPT, MiniGPTConfig
from sparselens.lm.hooks import capture, module_names, replace_output, resolve_patterns


@pytest.fixture
def model() -> MiniGPT:
    torch.manual_seed(0)
    cfg = MiniGPTConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=2, d_ff=32, context_len=8)
    return MiniGPT(cfg).eval()


def test_resolve_patterns_model_order_and_dedup() -> None:
    names = ["a", "blocks.0.x", "blocks.0.y", "blocks.1.x", "blocks.10.x"]
    assert resolve_patterns(names, ["blocks.*.x", "blocks.0.x"]) == [
        "blocks.0.x",
        "blocks.1.x",
        "blocks.10.x",
    ]
    assert resolve_patterns(names, "a") == ["a"]


def test_resolve_patterns_no_match_lists_names() -> None:
    with pytest.raises(
        ValueError,
        match=r"^hookpoints: 'blocks\.\*\.z' matches no module; "
        r"available: a, blocks\.0\.x",
    ):
        resolve_patterns(["a", "blocks.0.x"], ["blocks.*.z"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_patterns(["a"], [])


def test_hook_points_are_module_names(model: MiniGPT) -> None:
    assert set(model.hook_points()) <= set(module_names(model))


def test_capture_matches_manual_computation(model: MiniGPT) -> None:
    """The captured residual stream equals the value computed by hand from the embedding."""
    tokens = torch.randint(0, 16, (3, 8))
    acts = capture(
        model,
        lambda: model(tokens),
        ["embed", "blocks.0.resid_pre", "blocks.1.mlp.fc_in"],
        where=("input", "output"),
    )
    torch.testing.assert_close(acts[("embed", "output")], model.embed(tokens))
    torch.testing.assert_close(acts[("blocks.0.resid_pre", "output")], model.embed(tokens))
    fc_in = model.blocks[1].mlp.fc_in
    torch.testing.assert_close(
        acts[("blocks.1.mlp.fc_in", "output")], fc_in(acts[("blocks.1.mlp.fc_in", "input")])
    )
    assert not acts[("embed", "output")].requires_grad


def test_capture_stops_early(model: MiniGPT) -> None:
    """With stop_early, later modules never run (fails if the full pass runs)."""
    ran: list[str] = []
    h = model.ln_f.register_forward_hook(lambda *a: ran.append("ln_f"))
    try:
        capture(model, lambda: model(torch.zeros(1, 4, dtype=torch.long)), ["blocks.0.ln1"])
        assert ran == []
        capture(
            model,
            lambda: model(torch.zeros(1, 4, dtype=torch.long)),
            ["blocks.0.ln1"],
            stop_early=False,
        )
        assert ran == ["ln_f"]
    finally:
        h.remove()
    # no hooks are left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_missing_module_run() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    m = Branchy()
    with pytest.raises(RuntimeError, match=r"did not run.*b \(output\)"):
        capture(m, lambda: m(torch.zeros(1, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="no module named 'c'"):
        capture(m, lambda: m(torch.zeros(1, 2)), ["c"])


def test_replace_output_changes_logits_only_inside(model: MiniGPT) -> None:
    tokens = torch.randint(0, 16, (2, 8))
    clean = model(tokens)
    with replace_output(model, "blocks.1.mlp", torch.zeros_like):
        ablated = model(tokens)
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(model(tokens), clean)
    # identity replacement reproduces the clean logits exactly
    with replace_output(model, "blocks.1.mlp", lambda t: t):
        torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)


def test_replace_output_tuple_outputs() -> None:
    class TupleOut(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
            return x + 1, "extra"

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TupleOut()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
            return self.inner(x)

    m = Outer()
    with replace_output(m, "inner", lambda t: t * 10):
        out, extra = m(torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 20.0))
    assert extra == "extra"
    acts = capture(m, lambda: m(torch.ones(2)), ["inner"])
    torch.testing.assert_close(acts[("inner", "output")], torch.full((2,), 2.0))
