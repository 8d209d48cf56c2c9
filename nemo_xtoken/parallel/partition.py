"""Partition-KL on vocab shards (Megatron's vocabulary-parallel logits), equal to the reference.

Same partition (:func:`~nemo_xtoken.losses.partition.build_partition_plan`, from the alignment's
ids on the host); what crosses ranks:

* **level 1** (buckets = sums of columns, named by a teacher id): both sides' bucket masses are
  P-KL-style projections with 0/1 maps (:meth:`Spellings.level1_csr`), carried to the teacher
  shard that owns the bucket by a :class:`~nemo_xtoken.parallel.plan.PKLPlan` each (the
  student's, and the teacher's — mostly the identity, exchanged only for buckets whose teacher
  tokens straddle shards); the KL over the buckets is a sum of per-rank partials, as P-KL's;
* **levels r > 1 and M:N chunks**: every rank sums the bucket entries it owns (per-rank partial
  sums), then ONE all-reduce of all bucket masses, bucket-token probabilities and M:N
  log-likelihoods of the batch; the small terms computed from them are identical on every rank
  and enter the loss once (rank 0's partial).  No all-gather of logits anywhere.

The value is the full loss on every rank; each rank's gradient on its shard is the slice of the
reference gradient (:mod:`nemo_xtoken.parallel.comm`'s convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.partition import PartitionPlan, build_partition_plan, partition_terms
from nemo_xtoken.parallel.comm import all_reduce_sum, group_rank_size, resolve_group, shard_teacher, sum_partials
from nemo_xtoken.parallel.plan import PKLPlan
from nemo_xtoken.parallel.primitives import vocab_parallel_log_softmax
from nemo_xtoken.parallel.traffic import SOFTMAX_SCALARS, ring_all_reduce
from nemo_xtoken.vocab.spellings import Spellings

__all__ = ["PartitionTPPlan", "vocab_parallel_partition_kl", "partition_values_per_token"]

P_EPS = 1e-12


@dataclass
class PartitionTPPlan:
    """Built once per (spellings, tp, padded sizes): the two level-1 exchange plans."""

    spellings: Spellings
    tp: int
    student_padded: int
    teacher_padded: int
    student_plan: PKLPlan  # student token → its level-1 bucket (a teacher id)
    teacher_plan: PKLPlan  # teacher token → its level-1 bucket

    @property
    def student_vocab_size(self) -> int:
        return self.spellings.student_vocab_size

    @property
    def teacher_vocab_size(self) -> int:
        return self.spellings.teacher_vocab_size

    @staticmethod
    def build(spellings: Spellings, tp: int, student_padded: int | None = None, teacher_padded: int | None = None) -> "PartitionTPPlan":
        if not isinstance(spellings, Spellings):
            raise XTokenError(f"partition_kl needs the tokens' Spellings (nemo_xtoken.vocab.spellings), got {type(spellings).__name__}")
        v_s, v_t = spellings.shape
        sp = int(student_padded or -(-v_s // tp) * tp)
        tpad = int(teacher_padded or -(-v_t // tp) * tp)
        s_plan = PKLPlan.build(spellings.level1_csr("student"), tp, sp, tpad)
        t_plan = PKLPlan.build(spellings.level1_csr("teacher"), tp, tpad, tpad)
        return PartitionTPPlan(spellings, tp, sp, tpad, s_plan, t_plan)

    def values_sent_per_token(self) -> np.ndarray:
        """float ``[tp]``: level-1 values rank r sends per chunk (both plans), forward."""
        return self.student_plan.values_sent_per_token() + self.teacher_plan.values_sent_per_token()


def partition_values_per_token(plan: PartitionTPPlan, buckets_per_chunk: float = 0.0) -> np.ndarray:
    """Values each rank sends per chunk, P-KL's accounting: the softmax scalars, the level-1 exchanges,
    the partial-sum all-reduce, and the ring all-reduce of ``buckets_per_chunk`` deeper-level values."""
    return plan.values_sent_per_token() + ring_all_reduce(SOFTMAX_SCALARS + 1 + buckets_per_chunk, plan.tp)


def _local(lp: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's ``lp[pos, tok]`` where it owns ``tok`` (else 0), and the ownership mask."""
    w = lp.shape[1]
    own = (tok >= rank * w) & (tok < (rank + 1) * w)
    li = torch.where(own, tok - rank * w, torch.zeros_like(tok))
    v = lp[pos, li] if pos.numel() else lp.new_zeros(0)
    return torch.where(own, v, torch.zeros_like(v)), own


def vocab_parallel_partition_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: PartitionTPPlan | Spellings,
    *,
    alignment: AlignedPositions | None = None,
    merge: str = "chain",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    block_size: int | None = None,
    group: Any = None,
    partition: PartitionPlan | None = None,
) -> torch.Tensor:
    """Partition-KL on this rank's shards (student ``[N, V_S'/tp]``, teacher ``[N, V_T'/tp]``); see the module doc.

    ``projection``: a :class:`PartitionTPPlan` (build once), or the :class:`Spellings` (a plan is
    then built on every call: fine for tests).  ``merge`` is accepted and ignored (as in the reference).
    """
    from nemo_xtoken.losses.reference import REDUCTIONS, _reduce

    if reduction not in REDUCTIONS:
        raise XTokenError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise XTokenError(f"temperature must be > 0, got {temperature!r}")
    group = resolve_group(group)
    rank, tp = group_rank_size(group)
    s = student_logits.reshape(-1, student_logits.shape[-1])
    plan = projection
    if not isinstance(plan, PartitionTPPlan):
        plan = PartitionTPPlan.build(projection, tp, s.shape[1] * tp,
                                     None if not isinstance(teacher_logits, torch.Tensor) else teacher_logits.shape[-1] * tp)
    v_s, v_t = plan.spellings.shape
    for name, want, have in (("student", student_vocab_size, v_s), ("teacher", teacher_vocab_size, v_t)):
        if want is not None and int(want) != have:
            raise XTokenError(f"partition_kl: the spellings were built for a {name} vocabulary of {have} ids, not {want}: rebuild them")
    teacher_logits = shard_teacher(teacher_logits, group, padded=plan.teacher_padded)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if plan.tp != tp:
        raise XTokenError(f"the partition-KL plan was built for tp = {plan.tp} but the group has {tp} ranks: rebuild it")
    if (plan.student_padded, plan.teacher_padded) != (s.shape[1] * tp, t.shape[1] * tp):
        raise XTokenError(
            f"the partition-KL plan expects padded vocabularies ({plan.student_padded}, {plan.teacher_padded}) but "
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} on {tp} ranks "
            f"cover ({s.shape[1] * tp}, {t.shape[1] * tp}): the spellings or the plan belong to other models"
        )
    if block_size is not None:
        from nemo_xtoken.losses.blocked import run_blocked

        def call(sb, tb, a, m, red, params):
            return vocab_parallel_partition_kl(sb, tb, plan, alignment=a, mask=m, reduction=red, temperature=temperature,
                                               scale_by_temperature_squared=scale_by_temperature_squared, group=group)

        return run_blocked(call, student_logits, teacher_logits, (), block_size=block_size, alignment=alignment, mask=mask, reduction=reduction)
    if alignment is None and s.shape[0] != t.shape[0]:
        raise XTokenError(
            f"without an alignment, student_logits ({s.shape[0]} positions) and teacher_logits ({t.shape[0]}) must have as many positions"
        )
    if alignment is not None and mask is not None:
        raise XTokenError("mask cannot be combined with alignment: put the loss mask into the alignment")
    dev = s.device
    pp = partition
    if pp is None:
        pp = build_partition_plan(alignment, plan.spellings, n_positions=s.shape[0])
        if alignment is None and mask is not None:
            m = mask.reshape(-1).bool().cpu().numpy()
            if m.shape[0] != s.shape[0]:
                raise XTokenError(f"mask {tuple(mask.shape)} does not match the {s.shape[0]} positions of student_logits")
            keep = np.flatnonzero(m)
            pp.counted, pp.l1_chunk, pp.l1_s_pos, pp.l1_t_pos = m, keep, keep, keep.copy()
    lp_s = vocab_parallel_log_softmax(s, vocab_size=v_s, group=group, temperature=temperature, name="student_logits")
    with torch.no_grad():  # the teacher is frozen; its log-probabilities are reused in place for its level-1 buckets
        lp_t = vocab_parallel_log_softmax(t, vocab_size=v_t, group=group, temperature=temperature, name="teacher_logits")
    T = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)  # noqa: E731
    partial = lp_s.new_zeros(pp.n_chunks) + lp_s[:, :0].sum()  # on the graph even when nothing counts (zero gradients)
    # deeper levels and M:N chunks: per-rank partial sums, one all-reduce
    n_cells, n_mn = int(pp.cell_tok.size), int(pp.mn_chunk.size)
    if n_cells or n_mn:
        f_part = lp_s.new_zeros(n_cells)
        c_part = lp_s.new_zeros(n_cells)
        if n_cells:
            lv = T(pp.cell_level)
            f_teacher = T(pp.lvl_f_teacher)
            ftok = T(np.maximum(pp.cell_tok, 0))
            fpos = T(pp.lvl_f_pos)[lv]
            real = T(pp.cell_tok >= 0)
            ft = f_teacher[lv] & real
            fs = ~f_teacher[lv] & real
            for sel, lp in ((ft, lp_t), (fs, lp_s)):
                if bool(sel.any()):
                    idx = torch.nonzero(sel, as_tuple=True)[0]
                    v, own = _local(lp, fpos[idx], ftok[idx], rank)
                    f_part = f_part.index_put((idx,), torch.where(own, v.exp(), torch.zeros_like(v)))
            ec = T(pp.ent_cell)
            elv = lv[ec]
            cpos = T(pp.lvl_c_pos)[elv]
            etok = T(pp.ent_tok)
            c_teacher = ~f_teacher[elv]
            for sel, lp in ((c_teacher, lp_t), (~c_teacher, lp_s)):
                if bool(sel.any()):
                    idx = torch.nonzero(sel, as_tuple=True)[0]
                    v, own = _local(lp, cpos[idx], etok[idx], rank)
                    c_part = c_part.index_add(0, ec[idx], torch.where(own, v.exp(), torch.zeros_like(v)))
        ms = lp_s.new_zeros(n_mn)
        mt = lp_s.new_zeros(n_mn)
        if n_mn:
            v, _ = _local(lp_s, T(pp.mn_s_pos), T(pp.mn_s_tok), rank)
            ms = ms.index_add(0, T(pp.mn_s_item), v)
            v, _ = _local(lp_t, T(pp.mn_t_pos), T(pp.mn_t_tok), rank)
            mt = mt.index_add(0, T(pp.mn_t_item), v)
        full = all_reduce_sum(torch.cat([f_part, c_part, ms, mt]), group)
        f_prob, c_mass = full[:n_cells], full[n_cells : 2 * n_cells]
        mn_s, mn_t = full[2 * n_cells : 2 * n_cells + n_mn], full[2 * n_cells + n_mn :]
        deeper = partition_terms(pp, f_prob, c_mass, mn_s, mn_t, dev)
        partial = partial + (deeper if rank == 0 else deeper * 0.0)  # identical on every rank: enters once
    if pp.l1_chunk.size:  # after the deeper levels: the teacher's log-probabilities are overwritten here
        from nemo_xtoken.parallel.losses import _ExchangeProject, _KLPartial

        def rows(lp: torch.Tensor, pos: np.ndarray) -> torch.Tensor:  # every position in order (no alignment): no copy
            same = pos.size == lp.shape[0] and bool((pos == np.arange(pos.size)).all())
            return lp if same else lp.index_select(0, T(pos))

        with torch.no_grad():  # the teacher's bucket masses first (before the student's exist), in log space, in place
            lt_rows = rows(lp_t, pp.l1_t_pos)
            q_t = _ExchangeProject.apply(lt_rows, plan.teacher_plan.rank_plan(rank, dev), group)
            log_qt = lt_rows.copy_(q_t).log_() if lt_rows.shape == q_t.shape else q_t.log_()  # log 0 = -inf: an empty bucket
            del q_t
        q_s = _ExchangeProject.apply(rows(lp_s, pp.l1_s_pos), plan.student_plan.rank_plan(rank, dev), group)
        partial = partial.index_add(0, T(pp.l1_chunk), _KLPartial.apply(log_qt, q_s, True, P_EPS))
    loss = sum_partials(partial, group)
    counted = T(pp.counted)
    return _reduce(loss, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)
