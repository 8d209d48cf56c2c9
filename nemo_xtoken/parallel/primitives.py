"""Vocab-parallel building blocks with exact backward: log-softmax over a sharded vocabulary and
the target log-probability gather, in the style of Megatron-core's ``VocabParallelCrossEntropy``.

A rank holds the contiguous columns ``[rank*w, (rank+1)*w)`` of a ``[N, V']`` logits tensor
(Megatron's ``VocabUtility`` layout).  Columns ``>= vocab_size`` are padded vocabulary: their
log-probability is ``-inf`` (probability exactly 0) and they receive zero gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.parallel.comm import all_reduce_sum, group_rank_size

__all__ = ["shard_range", "real_prefix", "prefix_or_mask", "vocab_parallel_log_softmax", "vocab_parallel_gather"]


def shard_range(width: int, rank: int) -> tuple[int, int]:
    """Global column range ``[start, end)`` of a rank's shard of width ``width``."""
    return rank * width, (rank + 1) * width


def real_prefix(width: int, rank: int, vocab_size: int | None) -> int | None:
    """How many leading columns of this shard are real vocabulary (None: all of them; the rest is padding)."""
    a, b = shard_range(width, rank)
    if vocab_size is None or vocab_size >= b:
        return None
    return max(vocab_size - a, 0)


def prefix_or_mask(valid: Any) -> torch.Tensor | int | None:
    """A bool column mask as :func:`vocab_parallel_log_softmax` takes it: its length of leading ``True`` when it is a prefix.

    ``valid``: None, or a numpy/CPU bool array (read on the host, so no device sync); a prefix
    (``True…True False…False``) becomes an int, the cheap form; anything else stays a bool tensor.
    """
    if valid is None or isinstance(valid, int):
        return valid
    v = valid.cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
    k = int(v.sum())
    if bool(v[:k].all()):
        return None if k == v.shape[0] else k
    return valid if isinstance(valid, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))


def _fill_invalid(x: torch.Tensor, valid: torch.Tensor | int | None, value: float) -> torch.Tensor:
    """``x`` with its non-vocabulary columns set to ``value`` (a copy; ``x`` itself is left alone).

    ``valid``: None (every column real), an int ``k`` (the first ``k`` columns real: a slice fill,
    several times cheaper than a masked fill), or a bool ``[w]`` mask.
    """
    if valid is None:
        return x
    if isinstance(valid, int):
        if valid >= x.shape[-1]:
            return x
        y = x.clone()
        y[..., valid:] = value
        return y
    return x.masked_fill(~valid, value)


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log-softmax over the full (sharded) vocabulary: all-reduce MAX, then SUM of exp.

    Backward (exact, one all-reduce of a per-row scalar): ``dz = g - p * Σ_all-shards g``,
    zero on padded columns.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, valid: torch.Tensor | int | None, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
        z = _fill_invalid(z.float(), valid, float("-inf"))
        m = z.amax(dim=-1, keepdim=True) if z.shape[-1] else z.new_full((z.shape[0], 1), float("-inf"))
        tp = group_rank_size(group)[1]
        if tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lp = z - m  # the only [N, w] tensor kept; exp() below is a transient
        s = lp.exp().sum(dim=-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        log_s = s.log()
        lp.sub_(log_s)
        lse = m + log_s
        ctx.mark_non_differentiable(lse)
        ctx.group, ctx.tp = group, tp
        ctx.has_mask = isinstance(valid, torch.Tensor)
        ctx.prefix = None if ctx.has_mask else valid  # an int (real columns first) or None
        ctx.save_for_backward(lp, valid if ctx.has_mask else torch.empty(0, dtype=torch.bool))
        return lp, lse

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_lse: torch.Tensor | None = None):
        lp, valid = ctx.saved_tensors
        g = _fill_invalid(g.float(), valid if ctx.has_mask else ctx.prefix, 0.0)
        gs = g.sum(dim=-1, keepdim=True)
        if ctx.tp > 1:
            dist.all_reduce(gs, op=dist.ReduceOp.SUM, group=ctx.group)
        dz = lp.exp().mul_(gs)  # p · Σ g, then g − that, in place
        return dz.neg_().add_(g), None, None


def vocab_parallel_log_softmax(
    logits: torch.Tensor,
    *,
    vocab_size: int | None = None,
    valid: torch.Tensor | None = None,
    group: Any = None,
    temperature: float = 1.0,
    name: str = "logits",
    check_finite: bool = True,
) -> torch.Tensor:
    """fp32 log-probabilities of this rank's shard ``[N, w]`` over the whole sharded vocabulary.

    ``vocab_size`` = the tokenizer's size (columns at or beyond it are padding, probability 0);
    or ``valid``, a bool ``[w]`` mask of this shard's real columns (for permuted vocabularies), or
    an int ``k``: the shard's first ``k`` columns are real (see :func:`prefix_or_mask`).
    ``check_finite`` raises on NaN/inf logits, on every rank alike (it reads the all-reduced
    normalizer, so no extra collective), at the cost of one device sync.
    """
    if logits.dim() != 2:
        raise XTokenError(f"vocab_parallel_log_softmax needs {name} [N, V/tp], got shape {tuple(logits.shape)}")
    rank, _ = group_rank_size(group)
    if valid is None:  # padding is a tail of columns: a prefix length (a slice fill), not a mask
        valid = real_prefix(logits.shape[1], rank, vocab_size)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lp, lse = _VocabParallelLogSoftmax.apply(z, valid, group)
    if check_finite and lse.numel() and not bool(torch.isfinite(lse).all()):
        row = int(torch.nonzero(~torch.isfinite(lse.squeeze(1)))[0])
        raise XTokenError(
            f"{name} (shard shape {tuple(logits.shape)}) has NaN/inf values or no finite real column in row {row}: "
            "check the model's output (and the padded vocabulary size)"
        )
    return lp


def vocab_parallel_gather(values: torch.Tensor, index: torch.Tensor, *, group: Any = None, fill: float = 0.0) -> torch.Tensor:
    """``values_full[i, index[i]]`` from column shards ``[N, w]``: local lookup + one SUM all-reduce.

    Differentiable: the gathered value is replicated and used in every rank's partial, so its
    backward sums the ranks' contributions and scatters the total into the owner's column.
    Indices outside ``[0, w*tp)`` raise; ``fill`` is ignored (reserved).
    """
    if values.dim() != 2 or index.shape != values.shape[:1]:
        raise XTokenError(
            f"vocab_parallel_gather needs values [N, V/tp] and index [N]; got {tuple(values.shape)} and {tuple(index.shape)}"
        )
    rank, tp = group_rank_size(group)
    w = values.shape[1]
    a = rank * w
    idx = index.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w * tp):
        raise XTokenError(f"target ids must lie in [0, {w * tp}) (the padded vocabulary); got range [{int(idx.min())}, {int(idx.max())}]")
    local = (idx >= a) & (idx < a + w)
    li = torch.where(local, idx - a, torch.zeros_like(idx))
    picked = values.gather(1, li.unsqueeze(1)).squeeze(1) if w else values.new_zeros(idx.shape)
    picked = torch.where(local, picked, torch.zeros_like(picked))
    return all_reduce_sum(picked, group)
