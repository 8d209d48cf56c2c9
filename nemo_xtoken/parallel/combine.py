"""Multi-teacher weighting, the student's cross-entropy and the total loss on vocab shards.

Thin: every vocab-parallel loss already returns the full value on every rank, so combining them
is scalar arithmetic.  What needs the TP group is the adaptive teachers' scores (CE, entropy,
max-probability over a sharded vocabulary; no gradient) and the student's own cross-entropy.
``total_loss`` (dynamic scaling ``sg(L_CE/|L_KD|)·L_KD + L_CE`` or fixed weights) is the
reference function itself: it works unchanged on the replicated scalars.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.multi_teacher import WEIGHTINGS, MultiTeacherOutput, Teacher, combine_teachers
from nemo_xtoken.losses.total import dynamic_scale, total_loss
from nemo_xtoken.parallel.comm import group_rank_size, resolve_group, shard_teacher, sum_partials
from nemo_xtoken.parallel.losses import (
    vocab_parallel_gold,
    vocab_parallel_h_kl,
    vocab_parallel_kl,
    vocab_parallel_p_kl,
    vocab_parallel_uld,
)
from nemo_xtoken.parallel.partition import vocab_parallel_partition_kl
from nemo_xtoken.parallel.plan import PKLPlan
from nemo_xtoken.parallel.primitives import prefix_or_mask, vocab_parallel_log_softmax
from nemo_xtoken.parallel.summary import HybridPlan

__all__ = [
    "PARALLEL_LOSSES",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_teacher_score",
    "vocab_parallel_multi_teacher",
    "total_loss",
    "dynamic_scale",
]

PARALLEL_LOSSES = {
    "kl": vocab_parallel_kl,
    "p_kl": vocab_parallel_p_kl,
    "uld": vocab_parallel_uld,
    "gold": vocab_parallel_gold,
    "h_kl": vocab_parallel_h_kl,
    "partition_kl": vocab_parallel_partition_kl,  # its third argument: a PartitionTPPlan (or the Spellings)
}
_NEEDS_W = {"kl": False, "p_kl": True, "uld": False, "gold": True, "h_kl": True, "partition_kl": True}


def _pick_local(lp: torch.Tensor, targets: torch.Tensor, rank: int) -> torch.Tensor:
    """This shard's ``lp[i, targets[i]]`` where it owns the column, else 0 (a per-rank partial)."""
    w = lp.shape[1]
    t = targets.reshape(-1).long().to(lp.device)
    own = (t >= rank * w) & (t < (rank + 1) * w)
    li = torch.where(own, t - rank * w, torch.zeros_like(t))
    picked = lp.gather(1, li.unsqueeze(1)).squeeze(1) if w else lp.new_zeros(t.shape)
    return torch.where(own, picked, torch.zeros_like(picked))


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    group: Any = None,
) -> torch.Tensor:
    """The student's next-token CE on vocab shards (``-log p[target]``), full value on every rank."""
    group = resolve_group(group)
    rank, _ = group_rank_size(group)
    x = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise XTokenError(f"targets {tuple(targets.shape)} do not match the {x.shape[0]} positions of logits {tuple(logits.shape)}")
    lp = vocab_parallel_log_softmax(x, vocab_size=vocab_size, group=group, name="logits")
    nll = -sum_partials(_pick_local(lp, t, rank), group)  # each rank back-propagates its own copy
    sel = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask.reshape(-1).bool().to(nll.device)
    nll = torch.where(sel, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / sel.sum().clamp(min=1).to(nll.dtype)
    raise XTokenError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@torch.no_grad()
def vocab_parallel_teacher_score(
    teacher_logits: torch.Tensor,
    scheme: str,
    *,
    vocab_size: int | None = None,
    valid: torch.Tensor | int | None = None,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    group: Any = None,
    block_rows: int = 1024,
) -> torch.Tensor:
    """Mean CE / entropy / max-probability of one teacher on its vocab shards (detached, every rank alike).

    Computed ``block_rows`` positions at a time (no gradient, so nothing is kept between blocks).
    """
    if scheme not in WEIGHTINGS[1:]:
        raise XTokenError(f"adaptive weighting must be one of {WEIGHTINGS[1:]}, got {scheme!r}")
    group = resolve_group(group)
    rank, tp = group_rank_size(group)
    teacher_logits = shard_teacher(teacher_logits, group)
    x = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    n = x.shape[0]
    sel = torch.ones(n, dtype=torch.bool, device=x.device) if positions is None else positions.reshape(-1).bool().to(x.device)
    if sel.shape[0] != n:
        raise XTokenError(f"positions {tuple(sel.shape)} do not match teacher_logits {tuple(teacher_logits.shape)}")
    tg = None
    if scheme == "ce":
        if targets is None:
            raise XTokenError("the 'ce' weighting needs each teacher's next-token ids (teacher_targets or an alignment)")
        tg = targets.reshape(-1).long().to(x.device)
        if tg.shape[0] != n:
            raise XTokenError(f"teacher targets {tuple(targets.shape)} do not match teacher_logits {tuple(teacher_logits.shape)}")
        tg = torch.where(sel, tg, torch.zeros_like(tg))
    parts = []
    for a in range(0, n, max(int(block_rows), 1)):
        lp = vocab_parallel_log_softmax(x[a : a + block_rows], vocab_size=vocab_size, valid=valid, group=group, name="teacher_logits")
        if scheme == "ce":
            per = -_pick_local(lp, tg[a : a + block_rows], rank)
            op = dist.ReduceOp.SUM
        elif scheme == "entropy":
            p = lp.exp()
            per = -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(1)
            op = dist.ReduceOp.SUM
        else:
            per = lp.max(dim=1).values.exp() if lp.shape[1] else lp.new_zeros(lp.shape[0])
            op = dist.ReduceOp.MAX
        if tp > 1:
            dist.all_reduce(per, op=op, group=group)
        parts.append(per)
    per = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float32)
    per = torch.where(sel, per, torch.zeros_like(per))
    return per.sum() / sel.sum().clamp(min=1)


def vocab_parallel_multi_teacher(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    teachers: Sequence[Teacher],
    *,
    weighting: str = "static",
    group: Any = None,
    **options: Any,
) -> MultiTeacherOutput:
    """``Σ_m α_m · L_m`` on vocab shards: :func:`nemo_xtoken.losses.multi_teacher` with parallel losses.

    The keyword options are :func:`~nemo_xtoken.losses.multi_teacher`'s (``alignments``, ``mask``,
    ``weighting_temperature``, ``teacher_targets``, ``merge``, ``temperature``, ``reduction``,
    ``scale_by_temperature_squared``, same defaults), plus the tensor-parallel ``group``.

    A teacher's ``projection`` may be a :class:`PKLPlan` for ``p_kl`` (with a permuted teacher,
    the permutation is taken into account by the scores as well).  A teacher may be a
    :class:`~nemo_xtoken.offline.SparseTeacher` (a cached teacher): each rank materializes only its
    columns.
    """
    group = resolve_group(group)
    rank, _ = group_rank_size(group)
    width = student_logits.shape[-1] * group_rank_size(group)[1]  # a same-tokenizer (kl) teacher: the student's
    teacher_logits = [
        shard_teacher(x, group, plan=teachers[m].projection, padded=width if teachers[m].loss == "kl" else None)
        if m < len(teachers) else x
        for m, x in enumerate(teacher_logits)
    ]

    def score(tch: Teacher, logits: torch.Tensor, positions: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
        plan = tch.projection if isinstance(tch.projection, PKLPlan) else None
        if isinstance(tch.projection, HybridPlan):  # low-traffic GOLD/H-KL: its common-set plan has the teacher's layout
            plan = tch.projection.pkl
        valid, vocab = None, tch.options.get("teacher_vocab_size")
        if plan is not None:
            w = logits.shape[-1]
            valid = prefix_or_mask(plan.teacher_valid()[rank * w : (rank + 1) * w])  # read on the host, as in the losses
            valid = valid.to(logits.device) if isinstance(valid, torch.Tensor) else valid
            targets = plan.map_teacher_ids(targets) if targets is not None else None
        elif vocab is None and (hasattr(tch.projection, "spellings") or hasattr(tch.projection, "level1")):
            vocab = tch.projection.teacher_vocab_size  # partition_kl: its PartitionTPPlan or the Spellings
        elif vocab is None and tch.projection is not None:
            from nemo_xtoken.losses.reference import resolve_projection

            vocab = resolve_projection(tch.projection).teacher_vocab_size
        return vocab_parallel_teacher_score(
            logits, weighting, vocab_size=vocab, valid=valid, positions=positions, targets=targets, group=group
        )

    return combine_teachers(
        student_logits, teacher_logits, teachers, PARALLEL_LOSSES, _NEEDS_W, score,
        weighting=weighting, group=group, **options,
    )
