"""Activations of a subject's modules, ready for a sparse coder: ``(x, y)`` token rows.

:class:`ActivationSource` runs the subject once per token batch with
:func:`sparselens.lm.hooks.capture` (all hookpoints in one pass, stopping after the last of them
has run), flattens ``(B, T, d)`` to ``(B T, d)`` rows and drops the positions of special tokens
(BOS/EOS/PAD; sparsify #113). For a sparse autoencoder ``y`` is ``x`` (the module's output); for
a transcoder ``x`` is the module's input and ``y`` its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparselens.lm.hooks import capture, resolve_patterns
from sparselens.sae.data import exclusion_mask
from sparselens.sae.subject import Subject


@dataclass(frozen=True)
class Widths:
    """Feature widths of one hookpoint: the module's input and output."""

    d_in: int
    d_out: int


class ActivationSource:
    """Per-hookpoint ``(x, y)`` rows of a subject for token batches (see the module doc).

    ``hookpoints``: fnmatch patterns over ``subject.module_names()`` (a pattern matching nothing
    raises a one-line ValueError listing the names). Rows are float tensors ``(N, d)`` on the
    subject's device, ``N`` the kept positions of the batch, in row-major ``(b, t)`` order.
    """

    def __init__(
        self,
        subject: Subject,
        hookpoints: Sequence[str] | str,
        *,
        transcode: bool = False,
        exclude_special_tokens: bool = True,
    ) -> None:
        self.subject = subject
        self.hookpoints = resolve_patterns(subject.module_names(), hookpoints, field="hookpoints")
        self.transcode = bool(transcode)
        self.specials: tuple[int, ...] = (
            tuple(subject.special_token_ids) if exclude_special_tokens else ()
        )
        self._widths: dict[str, Widths] | None = None

    @property
    def where(self) -> tuple[str, ...]:
        return ("input", "output") if self.transcode else ("output",)

    def keep_mask(self, tokens: Tensor) -> Tensor:
        """Bool ``(B T,)``: positions whose activations are used."""
        return exclusion_mask(tokens, self.specials).reshape(-1)

    @torch.no_grad()
    def raw(self, tokens: Tensor) -> dict[tuple[str, str], Tensor]:
        """The captured ``(B, T, ...)`` activations keyed ``(hookpoint, "input"|"output")``."""
        s = self.subject
        tokens = tokens.to(s.device)
        return capture(s.model, lambda: s.logits(tokens), self.hookpoints, where=self.where)

    def _rows(self, name: str, where: str, t: Tensor, lead: tuple[int, int]) -> Tensor:
        if t.dim() < 3 or tuple(t.shape[:2]) != lead:
            raise ValueError(
                f"hookpoint {name}: its {where} has shape {tuple(t.shape)}, expected "
                f"(batch, seq, features) with (batch, seq) = {lead}"
            )
        if not t.is_floating_point():
            raise ValueError(f"hookpoint {name}: its {where} has non-float dtype {t.dtype}")
        return t.reshape(lead[0] * lead[1], -1)

    def __call__(self, tokens: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``{hookpoint: (x, y)}`` for a ``(B, T)`` token batch, special positions dropped."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a (batch, seq) tensor of token ids")
        lead = (int(tokens.shape[0]), int(tokens.shape[1]))
        acts = self.raw(tokens)
        keep = self.keep_mask(tokens).to(self.subject.device)
        everything = bool(keep.all()) if self.specials else True
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name in self.hookpoints:
            y = self._rows(name, "output", acts[(name, "output")], lead)
            x = self._rows(name, "input", acts[(name, "input")], lead) if self.transcode else y
            if not everything:
                y = y[keep]
                x = x[keep] if self.transcode else y
            out[name] = (x, y)
        return out

    def widths(self) -> dict[str, Widths]:
        """Input/output width per hookpoint (one forward of a 2-token batch, cached)."""
        if self._widths is None:
            probe = torch.zeros(1, min(2, self.subject.context_len), dtype=torch.long)
            acts = self.raw(probe)
            lead = (1, int(probe.shape[1]))
            self._widths = {}
            for name in self.hookpoints:
                d_out = self._rows(name, "output", acts[(name, "output")], lead).shape[1]
                d_in = (
                    self._rows(name, "input", acts[(name, "input")], lead).shape[1]
                    if self.transcode
                    else d_out
                )
                self._widths[name] = Widths(int(d_in), int(d_out))
        return self._widths


__all__ = ["ActivationSource", "Widths"]
