"""The SPD optimisation loop: faithfulness warm-up, then Adam on components and CI functions.

One step (sheet §7.5, Bushnaq et al. 2025 Alg. 1): set the learning rate from the schedule, draw a
batch, :func:`~sparselens.spd.losses.compute_losses` (one vectorised pass), backward, average the
gradients over ranks, Adam step. No host synchronisation happens inside a step: the loss terms
are accumulated as tensors and read only at log points (:meth:`SPDTrainer.pop_log`).

Randomness, per purpose, each with its own state (all checkpointed, so a resumed run continues
bit for bit): the global torch RNG (initialisation), the data generator (seed ``seed``; every rank
draws the same *global* batch and keeps its slice, so the data do not depend on the world size)
and the mask generator (stochastic masks, delta masks, routing, PGD starts; one per rank).

Distributed (``torch.distributed`` initialised): ``batch_size`` is the global batch; each rank
takes ``batch_size / world_size`` samples. Losses that are global statistics (importance
minimality) are reduced inside the core penalties with an autograd-aware all-reduce; gradients
are all-reduced and divided by the world size after the backward (what DDP does), so the step
equals one process on the global batch for every deterministic loss term.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparselens.core import distributed as D
from sparselens.spd.component_model import ComponentModel, DecomposedModule
from sparselens.spd.config import SPDRunConfig
from sparselens.spd.losses import compute_losses, faithfulness
from sparselens.spd.tasks import Task
from sparselens.train.seeding import seed_everything

logger = logging.getLogger(__name__)

_MASK_SEED_STRIDE = 1_000_003


def _fused_adam(params: list[Tensor]) -> bool:
    """The fused AdamW kernel applies to float CPU / CUDA parameters."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def mask_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s mask generator (distinct from the data generator's ``seed``)."""
    return (seed + _MASK_SEED_STRIDE * (rank + 1)) % (2**63)


def build_model(config: SPDRunConfig, task: Task) -> tuple[ComponentModel, list[DecomposedModule]]:
    """The run's component model over ``task.target`` (which it takes over; components drawn
    from the current torch RNG) and its decomposition: the config's, or the task's default."""
    decomposition = list(config.decomposition or task.decomposition(config.C))
    model = ComponentModel(
        task.target, decomposition, ci_fn=config.ci_fn, ci_hidden=list(config.ci_hidden)
    )
    if config.compile_ci:
        for fn in model.ci_fns.values():
            if hasattr(fn, "compiled"):
                fn.compiled = True
    return model, decomposition


class SPDTrainer:
    """Component model, optimiser, generators and the step counter of one SPD run."""

    def __init__(self, config: SPDRunConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.rank, self.world = D.rank(), D.world_size()
        if config.batch_size % self.world:
            raise ValueError(
                f"batch_size must be divisible by the world size {self.world}, "
                f"got {config.batch_size}"
            )
        self.local_batch = config.batch_size // self.world
        seed_everything(config.seed)
        self.model, self.decomposition = build_model(config, task)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # fused: one kernel for every parameter instead of ~8 small ops per parameter
        self.opt = torch.optim.AdamW(
            self.params, lr=config.lr.start, weight_decay=0.0, fused=_fused_adam(self.params)
        )
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.mask_gen = torch.Generator().manual_seed(mask_seed(config.seed, self.rank))
        self.step = 0
        self._acc: dict[str, Tensor] = {}
        self._acc_n = 0

    # -- data -------------------------------------------------------------------------------------
    def batch(self) -> Tensor:
        """This rank's slice of the next global batch."""
        x = self.task.sample(self.config.batch_size, self.data_gen)
        if self.world > 1:
            x = x[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return x

    # -- warm-up and steps ------------------------------------------------------------------------
    def faithfulness_warmup(self) -> float | None:
        """Minimise faithfulness alone with a separate AdamW on U and V (sheet §7.4).

        Deterministic and identical on every rank (no data, no randomness). Returns the final
        faithfulness loss (one host sync), or None without warm-up.
        """
        fw = self.config.faithfulness_warmup
        if fw.steps == 0:
            return None
        uv = [p for p in self.model.components.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(uv, lr=fw.lr, weight_decay=fw.weight_decay)
        loss = torch.zeros(())
        for _ in range(fw.steps):
            loss = faithfulness(self.model.weight_deltas())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in uv:
            p.grad = None
        with torch.no_grad():
            return float(faithfulness(self.model.weight_deltas()))

    def set_lr(self) -> float:
        lr = self.config.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> None:
        """One optimiser step (no host synchronisation)."""
        self.set_lr()
        x = self.batch()
        total, terms = compute_losses(
            self.model,
            x,
            self.config.losses,
            progress=self.step / self.config.steps,
            generator=self.mask_gen,
            finite_check=False,  # checked on the accumulated losses in pop_log
        )
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.world > 1:
            self._average_gradients()
        self.opt.step()
        self._accumulate(total, terms)
        self.step += 1

    def _average_gradients(self) -> None:
        """All-reduce every gradient in one flat buffer and divide by the world size."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _accumulate(self, total: Tensor, terms: dict[str, Tensor]) -> None:
        items = {"total": total, **terms}
        for k, v in items.items():
            v = v.detach()
            self._acc[k] = self._acc[k] + v if k in self._acc else v.clone()
        self._acc_n += 1

    def _means(self) -> dict[str, float]:
        """Mean of each accumulated term, averaged over ranks (one host read); raises if one is
        NaN or inf (every rank together: the values are all-reduced first)."""
        keys = sorted(self._acc)
        vals = torch.stack([self._acc[k].to(torch.float64) for k in keys]) / self._acc_n
        if self.world > 1:
            dist.all_reduce(vals, op=dist.ReduceOp.SUM)
            vals /= self.world
        out = dict(zip(keys, vals.tolist(), strict=True))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"SPD losses {', '.join(bad)} became NaN or inf by step {self.step} (a non-finite "
                "CI or activation: check the target and its data, or lower lr)"
            )
        return out

    def pop_log(self) -> dict[str, float]:
        """Mean of each loss term since the last call (averaged over ranks); one host sync.

        Raises if a term is NaN or inf: a non-finite CI or activation in any step since the last
        call makes its mean non-finite (the steps themselves do not read tensors on the host).
        """
        if not self._acc_n:
            return {}
        out = self._means()
        self._acc, self._acc_n = {}, 0
        return out

    def check_finite(self) -> None:
        """Raise if a loss accumulated since the last log is NaN or inf (one host read; a
        collective under DDP). Run before writing a checkpoint, so none holds broken weights."""
        if self._acc_n:
            self._means()

    # -- state ------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        """The trainable parameters (components and CI functions) by name, detached copies."""
        return {n: p.detach().clone() for n, p in zip(self.param_names, self.params, strict=True)}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        missing = set(self.param_names) - set(state)
        extra = set(state) - set(self.param_names)
        if missing or extra:
            raise ValueError(
                "checkpoint does not fit the decomposition: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
            )
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                p.copy_(state[n])

    def _mask_states(self) -> list[Tensor]:
        state = self.mask_gen.get_state()
        if self.world == 1:
            return [state]
        out = [torch.empty_like(state) for _ in range(self.world)]
        dist.all_gather(out, state)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (a collective under DDP: every rank must call it)."""
        return {
            "model": self.trainable_state(),
            "optimizer": self.opt.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.data_gen.get_state(),
                "masks": self._mask_states(),
            },
            "acc": {k: v.clone() for k, v in self._acc.items()},
            "acc_n": self._acc_n,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["rng"]["masks"]
        if len(masks) != self.world:
            raise ValueError(
                f"the checkpoint was written by {len(masks)} rank(s); resume it with the same "
                f"world size, not {self.world}"
            )
        self.load_trainable_state(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # the saved groups' flags replace the current ones
            group["fused"] = _fused_adam(self.params)
        torch.set_rng_state(state["rng"]["torch"])
        self.data_gen.set_state(state["rng"]["data"])
        self.mask_gen.set_state(masks[self.rank])
        self._acc = dict(state["acc"])
        self._acc_n = int(state["acc_n"])
        self.step = int(state["step"])


__all__ = ["SPDTrainer", "build_model", "mask_seed"]
