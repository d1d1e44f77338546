"""Read and replace module activations of any ``nn.Module`` by name (Mini-GPT or Hugging Face).

One place for the hook plumbing that activation sources, SAE evaluation and splicing share:

* :func:`module_names` / :func:`resolve_patterns`: module paths matched by fnmatch patterns
  (``blocks.*.resid_post``); a pattern matching nothing is an error that lists what exists.
* :func:`capture`: one forward pass that records the inputs and/or outputs of named modules,
  optionally stopping as soon as the last of them has run (no work is spent on later layers).
* :func:`replace_output`: a context manager that swaps a module's output for ``fn(output)``
  (e.g. an SAE reconstruction) for the calls made inside it.

Hooks live only for one call or one ``with`` block; nothing stays installed on the model.
A module output that is a tuple (Hugging Face blocks) is read and replaced through its first
element.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from torch import Tensor, nn

Where = Literal["input", "output"]


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once every wanted activation is recorded."""


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule path of ``model`` in registration (model) order, root excluded."""
    return [name for name, _ in model.named_modules() if name]


def resolve_patterns(
    names: Sequence[str], patterns: Sequence[str] | str, *, field: str = "hookpoints"
) -> list[str]:
    """The names matched by any fnmatch pattern, in ``names`` order, without duplicates.

    An exact name always matches itself (also when it contains ``[``). A pattern that matches
    nothing raises a one-line ``ValueError`` naming ``field`` and listing the available names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError(f"{field} must name at least one module, got none")
    available = set(names)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{field} entries must be non-empty strings, got {pattern!r}")
        hits = {pattern} if pattern in available else set(fnmatch.filter(names, pattern))
        if not hits:
            shown = ", ".join(names[:60]) + (
                f", ... ({len(names)} in all)" if len(names) > 60 else ""
            )
            raise ValueError(f"{field}: {pattern!r} matches no module; available: {shown}")
        chosen |= hits
    return [n for n in names if n in chosen]


def _get(model: nn.Module, name: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{field}: no module named {name!r} in {type(model).__name__}") from None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


def capture(
    model: nn.Module,
    run: Callable[[], Any],
    names: Sequence[str],
    *,
    where: Where | Sequence[Where] = "output",
    stop_early: bool = True,
    detach: bool = True,
) -> dict[tuple[str, Where], Tensor]:
    """Call ``run()`` (a forward pass of ``model``) and return the recorded activations.

    Keys are ``(name, "input")`` (the module's first positional argument) and/or
    ``(name, "output")``. With ``stop_early`` the pass ends right after the last wanted
    activation is recorded, and ``run``'s own result is discarded. Tensors are detached unless
    ``detach=False``.
    """
    wheres: list[Where] = [where] if isinstance(where, str) else list(where)
    for w in wheres:
        if w not in ("input", "output"):
            raise ValueError(f"where must be 'input' or 'output', got {w!r}")
    if not names:
        raise ValueError("names must list at least one module, got none")
    wanted = {(n, w) for n in names for w in wheres}
    found: dict[tuple[str, Where], Tensor] = {}

    def record(key: tuple[str, Where], value: Any) -> None:
        t = _first(value)
        if not isinstance(t, Tensor):
            raise TypeError(f"{key[0]}: its {key[1]} is a {type(t).__name__}, not a tensor")
        found[key] = t.detach() if detach else t
        if stop_early and len(found) == len(wanted):
            raise _StopForward

    handles = []
    try:
        for name in dict.fromkeys(names):
            module = _get(model, name, "names")
            if "input" in wheres:

                def pre(_m: nn.Module, args: tuple[Any, ...], *, _n: str = name) -> None:
                    if not args:
                        raise TypeError(f"{_n}: called without positional input")
                    record((_n, "input"), args[0])

                handles.append(module.register_forward_pre_hook(pre))
            if "output" in wheres:

                def post(_m: nn.Module, _a: Any, out: Any, *, _n: str = name) -> None:
                    record((_n, "output"), out)

                handles.append(module.register_forward_hook(post))
        try:
            run()
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(f"{n} ({w})" for n, w in wanted - found.keys())
    if missing:
        raise RuntimeError(f"these modules did not run in the forward pass: {', '.join(missing)}")
    return found


@contextmanager
def replace_output(
    model: nn.Module, name: str, fn: Callable[[Tensor], Tensor]
) -> Iterator[nn.Module]:
    """Within the block, module ``name`` returns ``fn(output)`` (first element if a tuple)."""
    module = _get(model, name, "name")

    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield module
    finally:
        handle.remove()


__all__ = ["capture", "module_names", "replace_output", "resolve_patterns"]
