"""World size, rank and an autograd-aware global sum across ``torch.distributed`` ranks.

:func:`global_sum` follows the convention of ``torch.distributed.nn.functional.all_reduce`` and
of the SPD DDP fix (param-decomp PR #543): the forward all-reduces SUM, and the backward
all-reduces SUM of ``grad_output``. Every rank computes the same global loss ``L(sum_r s_r)``, so
each rank's backward sees ``grad_output = dL/dS`` and returns ``world_size * dL/dS`` to its local
``s_r``; DDP then averages parameter gradients over ranks, so the optimiser sees exactly
``d(global loss)/d(theta)``. Summing (not copying) the incoming gradient also stays correct when
the ranks' losses differ (e.g. a rank-local term added to a global one).

Every rank must call :func:`global_sum` (and run the backward through it) the same number of
times, in the same order, with tensors of the same shape: it is a collective.

Without an initialised process group, or with a single rank, every function here is the
identity / the local value, so single-process code pays nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


class _AllReduceSum(torch.autograd.Function):
    """``y = sum_r x_r`` on every rank; backward ``dx_r = sum_r' dy_r'``.

    Same maths as ``torch.distributed.nn.functional.all_reduce``, written here because that
    function is deprecated (torch 2.13 warns and points to the private
    ``torch.distributed._functional_collectives``), and so the convention is pinned and tested in
    this package.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def global_sum(t: Tensor) -> Tensor:
    """Autograd-aware all-reduce SUM of ``t`` over all ranks (``t`` itself on a single rank).

    Forward: the elementwise sum of ``t`` over ranks. Backward: the SUM over ranks of the incoming
    gradient (see the module docstring for why, under DDP averaging, this gives the gradient of
    the global loss).
    """
    if world_size() == 1:
        return t
    return _AllReduceSum.apply(t)


def global_count(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.int64
) -> Tensor:
    """The sum over ranks of a local count ``n`` (e.g. tokens), as a 0-d tensor without grad."""
    out = torch.tensor(n, dtype=dtype, device=device)
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
