"""Tensor-parallel group handling and the differentiable collectives the losses are built from.

Gradient convention (what makes every rank's shard gradient the exact slice of the reference):

* a *sharded* tensor (a rank's vocabulary slice) carries its true gradient on its own rank;
* a *replicated* tensor that every rank uses in its own partial sum carries, on each rank, only
  that rank's contribution; the true gradient is the sum over ranks.  Hence
  :func:`all_reduce_sum` (shards → replicated value used in partials) sums its gradients over
  ranks in the backward, like ``torch.distributed.nn.functional.all_reduce``;
* the final loss is the sum of per-rank partials (:func:`sum_partials`): every rank holds the
  same value and back-propagates its own copy, so the backward is the identity (Megatron's
  ``vocab_parallel_cross_entropy`` convention; an all-reduce in that backward would make every
  gradient tp times too large — the ``TopKLogitsKLLoss`` bug);
* a term computed identically on every rank from gathered values and added once
  (:func:`all_gather_columns`) back-propagates each rank's own slice of its gradient.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.sparse import SparseTeacher

__all__ = [
    "shard_teacher",
    "resolve_group",
    "group_rank_size",
    "all_reduce_sum",
    "all_reduce_max",
    "sum_partials",
    "all_gather_columns",
    "all_to_all_columns",
]


def resolve_group(group: Any = None) -> Any:
    """The process group to use: ``group`` if given, else Megatron's TP group, else the world (or None)."""
    if group is not None:
        return group
    # Megatron's groups can only be initialised once its ``parallel_state`` was imported: look it up in
    # ``sys.modules`` instead of importing megatron-core (optional, and 5-10 CPU-seconds to import) just to ask.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None  # the default (world) group when torch.distributed is initialised, else tp = 1


def group_rank_size(group: Any) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the per-rank gradient contributions (see module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class _SumPartials(torch.autograd.Function):
    """Sum the per-rank partial losses; backward identity (each rank back-propagates its own copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _AllGatherColumns(torch.autograd.Function):
    """Concatenate the ranks' ``[n, w]`` column shards to ``[n, w*tp]``; backward keeps own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        rank, size = group_rank_size(group)
        ctx.rank, ctx.width = rank, x.shape[1]
        xt = x.t().contiguous()  # gather along dim 0 (contiguous chunks)
        parts = [torch.empty_like(xt) for _ in range(size)]
        dist.all_gather(parts, xt, group=group)
        return torch.cat(parts, 0).t().contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a = ctx.rank * ctx.width
        return g[:, a : a + ctx.width].contiguous(), None


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable sum over the group of a tensor that the ranks then use in their partials."""
    if not _initialized() or group_rank_size(group)[1] == 1:
        return x
    return _AllReduceSum.apply(x, group)


def all_reduce_max(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Max over the group, without gradient (used for numerical stabilisation only)."""
    y = x.detach().clone()
    if _initialized() and group_rank_size(group)[1] > 1:
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=group)
    return y


def sum_partials(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The full loss from per-rank partials: same value on every rank, identity backward."""
    if not _initialized() or group_rank_size(group)[1] == 1:
        return x
    return _SumPartials.apply(x, group)


def all_gather_columns(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Full rows from column shards, for a term computed once (identically) on every rank."""
    if not _initialized() or group_rank_size(group)[1] == 1:
        return x
    if x.dim() != 2:
        raise XTokenError(f"all_gather_columns needs a [n, w] tensor, got shape {tuple(x.shape)}")
    return _AllGatherColumns.apply(x, group)


def all_to_all_columns(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any
) -> torch.Tensor:
    """Exchange row blocks of ``send`` ``[sum(send_splits), n]``: block r goes to rank r (no autograd)."""
    out = torch.empty((sum(recv_splits),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
    if not _initialized() or group_rank_size(group)[1] == 1:
        out.copy_(send)
        return out
    dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits, group=group)
    return out


def shard_teacher(teacher: Any, group: Any = None, *, plan: Any = None, padded: int | None = None) -> Any:
    """Loss entry point (tensor parallel): this rank's columns of a :class:`~nemo_xtoken.losses.sparse.SparseTeacher`; else unchanged.

    The padded width is a P-KL ``plan``'s (``PKLPlan.teacher_padded``, with its teacher
    permutation), else ``padded``, else the vocabulary rounded up to a multiple of the group size.
    """
    if not isinstance(teacher, SparseTeacher):
        return teacher
    rank, tp = group_rank_size(resolve_group(group))
    column_ids = None
    if plan is not None and hasattr(plan, "teacher_padded"):
        padded, column_ids = int(plan.teacher_padded), getattr(plan, "teacher_perm", None)
    total = int(padded) if padded is not None else -(-teacher.vocab_size // tp) * tp
    if total % tp or total < teacher.vocab_size:
        raise XTokenError(
            f"a sparse teacher of {teacher.vocab_size} ids cannot be sharded to {total} columns on {tp} ranks: "
            "the padded teacher vocabulary must cover its ids and be divisible by the tensor-parallel size"
        )
    w = total // tp
    if column_ids is not None:
        cols = torch.as_tensor(column_ids)[rank * w : (rank + 1) * w]
        return teacher.dense(column_ids=cols)
    return teacher.dense(start=rank * w, width=w)
