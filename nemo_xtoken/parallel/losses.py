"""The five distillation losses on vocab-parallel logits (Megatron's vocabulary-sharded output).

Every function takes this rank's shards (student ``[N, V_S'/tp]``, teacher ``[N, V_T'/tp]``,
``[B, S, V/tp]`` accepted), returns the SAME full loss on every rank of ``group``, and when every
rank back-propagates its copy, each rank's gradient on its shard is exactly the slice of the
single-device reference gradient (see :mod:`nemo_xtoken.parallel.comm`).  The value is already
reduced over the TP group: a host loss function must not all-reduce it again (ModelOpt's
``tp_reduce`` = False).  Arguments mirror :mod:`nemo_xtoken.losses`.

Communication per item (position or aligned chunk), besides the softmax statistics (2 scalar
all-reduces per side) and one scalar all-reduce of the partial losses:

* ``kl``: nothing else;
* ``p_kl``: one all-to-all of the student probabilities the :class:`PKLPlan` lists (forward),
  the reverse all-to-all (backward);
* ``uld``, ``gold``, ``h_kl``: exact, by an all-gather of both sides' item probabilities (the
  rank-sorted L1 needs a global order); cost = an all-gather of the (chunk-merged) logits;
  or low traffic (a :class:`~nemo_xtoken.parallel.summary.HybridPlan` as the projection,
  ``summary_bins=`` for ULD): the common-set KL exact through an exchange plan, the sorted L1
  from additive shard summaries within a computed error bound (:mod:`nemo_xtoken.parallel.summary`).

Every loss takes ``block_size=n``: computed ``n`` positions (whole chunks) at a time with
recomputation in the backward (:mod:`nemo_xtoken.losses.blocked`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemo_xtoken.align.merge import MERGES, AlignedPositions, merge_log_probs, side_modes
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.reference import (
    REFERENCE_EPS,
    REFERENCE_UNCOMMON_TOP_K,
    check_uld_tail,
    floored_log,
    grad_floor,
    teacher_top_k_columns,
)
from nemo_xtoken.parallel.comm import (
    all_gather_columns,
    all_reduce_sum,
    all_to_all_columns,
    group_rank_size,
    resolve_group,
    shard_teacher,
    sum_partials,
)
from nemo_xtoken.parallel.plan import PKLPlan, projection_csr
from nemo_xtoken.parallel.primitives import prefix_or_mask, vocab_parallel_gather, vocab_parallel_log_softmax

__all__ = [
    "vocab_parallel_kl",
    "vocab_parallel_p_kl",
    "vocab_parallel_uld",
    "vocab_parallel_gold",
    "vocab_parallel_h_kl",
    "P_KL_EPS",
]

_TRUNCATE_SUMMARY = (
    "uld_tail='truncate' (NeMo-RL's tail) has no low-traffic summary: the summary cannot cut the sorted sides "
    "to the shorter length; set distill.tp_exchange: exact (or uld_tail: pad)"
)
P_KL_EPS = 1e-12  # value floor: log(max(p̃_S, eps)); the gradient is that of log p̃_S (see _KLPartial)
REDUCTIONS = ("mean", "sum", "none")


# ---- shared preparation -------------------------------------------------------------------------
@dataclass
class _Items:
    """Log-distributions of the counted items (positions or chunks), on this rank's shards."""

    lp_s: torch.Tensor  # [n, w_S] fp32
    lp_t: torch.Tensor  # [n, w_T] fp32
    index: torch.Tensor  # int64 [n]: where the items sit among all positions/chunks
    n_total: int


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise XTokenError(f"{name} must be a [N, V/tp] or [B, S, V/tp] tensor, got {shape}")
    return x.reshape(-1, x.shape[-1])


def _check_vocab(name: str, width: int, tp: int, vocab: int | None) -> None:
    if vocab is not None and vocab > width * tp:
        raise XTokenError(
            f"{name} shards are {width} wide on {tp} ranks ({width * tp} columns) but the vocabulary has {vocab} ids: "
            "the logits must cover the whole (padded) vocabulary"
        )


def _prepare(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_vocab: int | None,
    teacher_vocab: int | None,
    teacher_valid: np.ndarray | None,
    teacher_id_map: Any,
    alignment: AlignedPositions | None,
    merge: str,
    mask: torch.Tensor | None,
    temperature: float,
    group: Any,
) -> _Items:
    s = _flatten(student_logits, "student_logits")
    t = _flatten(teacher_logits, "teacher_logits")
    rank, tp = group_rank_size(group)
    _check_vocab("student_logits", s.shape[1], tp, student_vocab)
    _check_vocab("teacher_logits", t.shape[1], tp, teacher_vocab)
    if temperature <= 0:
        raise XTokenError(f"temperature must be > 0, got {temperature}")
    if merge not in MERGES:
        raise XTokenError(f"merge must be one of {MERGES}, got {merge!r}")
    t_valid = None
    if teacher_valid is not None:  # read on the host: a prefix of real columns becomes an int (a slice fill)
        a = rank * t.shape[1]
        t_valid = prefix_or_mask(teacher_valid[a : a + t.shape[1]])
        if isinstance(t_valid, torch.Tensor):
            t_valid = t_valid.to(t.device)
    lp_s = vocab_parallel_log_softmax(s, vocab_size=student_vocab, group=group, temperature=temperature, name="student_logits")
    lp_t = vocab_parallel_log_softmax(
        t, vocab_size=teacher_vocab, valid=t_valid, group=group, temperature=temperature, name="teacher_logits"
    )
    if alignment is None:
        if s.shape[0] != t.shape[0]:
            raise XTokenError(
                f"without an alignment, student_logits ({s.shape[0]} positions, shape {tuple(student_logits.shape)}) and "
                f"teacher_logits ({t.shape[0]} positions, shape {tuple(teacher_logits.shape)}) must have as many positions: "
                "pass an alignment for different tokenizations"
            )
        if mask is None:  # every position counts: no copy
            return _Items(lp_s, lp_t, torch.arange(s.shape[0], device=s.device), s.shape[0])
        else:
            m = mask.reshape(-1)
            if m.shape[0] != s.shape[0]:
                raise XTokenError(f"mask has {m.shape[0]} entries (shape {tuple(mask.shape)}) but there are {s.shape[0]} positions")
            index = torch.nonzero(m.to(s.device).bool(), as_tuple=True)[0]
        return _Items(lp_s.index_select(0, index), lp_t.index_select(0, index), index, s.shape[0])
    al = alignment.to(s.device)
    for side, ids, tg, n in (
        ("student", al.student_chunk_ids, al.student_targets, s.shape[0]),
        ("teacher", al.teacher_chunk_ids, al.teacher_targets, t.shape[0]),
    ):
        if ids.shape != (n,) or tg.shape != (n,):
            raise XTokenError(
                f"alignment.{side}_chunk_ids has shape {tuple(ids.shape)} and {side}_targets {tuple(tg.shape)}, "
                f"but {side}_logits has {n} positions: the alignment belongs to another batch"
            )
        if ids.numel() and int(ids.max()) >= al.n_chunks:
            raise XTokenError(f"alignment.{side}_chunk_ids has id {int(ids.max())} >= n_chunks = {al.n_chunks}")
    if mask is not None:
        raise XTokenError(
            "mask cannot be combined with alignment: put the loss mask into the alignment "
            "(positions_from_token_chunks(..., student_loss_mask=...))"
        )
    s_ids = al.student_chunk_ids
    s_mode, t_mode = side_modes(merge)
    # the student's chain needs its target log-probabilities (one gather); the teacher's chain is
    # normalized (its first position's distribution), so teacher targets are not read
    tlp_s = vocab_parallel_gather(lp_s, al.student_targets, group=group) if s_mode == "chain" else None
    ms = merge_log_probs(lp_s, s_ids, al.n_chunks, mode=s_mode, target_log_probs=tlp_s)
    mt = merge_log_probs(lp_t, al.teacher_chunk_ids, al.n_chunks, mode=t_mode, normalize=True)
    cm = torch.zeros(al.n_chunks, dtype=torch.bool, device=s.device)
    if al.n_chunks:
        cs, ct = torch.zeros_like(cm), torch.zeros_like(cm)
        cs[s_ids[s_ids >= 0]] = True
        ct[al.teacher_chunk_ids[al.teacher_chunk_ids >= 0]] = True
        cm = cs & ct
    index = torch.nonzero(cm, as_tuple=True)[0]
    return _Items(ms.index_select(0, index), mt.index_select(0, index), index, al.n_chunks)


def _reduce(item_loss: torch.Tensor, items: _Items, reduction: str, scale: float) -> torch.Tensor:
    if scale != 1.0:
        item_loss = item_loss * scale
    if reduction == "none":
        out = item_loss.new_zeros(items.n_total)
        return out.index_put((items.index,), item_loss)
    total = item_loss.sum()
    if reduction == "sum":
        return total
    return total / max(int(items.index.numel()), 1)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise XTokenError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _kl_terms(lp_t: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_T (log p_T − log q) over this shard, terms with p_T = 0 exactly 0 (no NaN from −inf)."""
    p_t = lp_t.exp()
    pos = p_t > 0
    diff = torch.where(pos, lp_t - log_q, torch.zeros_like(lp_t))
    return (p_t * diff).sum(-1)


class _FixedWeights:
    """Stands in for a learnable W inside a recomputed block: ``weights()`` returns the block's leaf."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def weights(self) -> torch.Tensor:
        return self.values


def _blocked(fn, student_logits, teacher_logits, projection, block_size, alignment, mask, reduction, group, **kw) -> torch.Tensor:
    """``fn`` block by block of items with recomputation in the backward (:mod:`nemo_xtoken.losses.blocked`).

    Every rank forms the same blocks (from the alignment or the positions), so the recomputed
    blocks' collectives match.  A plan built from a learnable W hands the module's current weights
    to every block as a differentiable input.
    """
    import dataclasses

    from nemo_xtoken.losses.blocked import run_blocked

    params: tuple = ()
    if isinstance(projection, PKLPlan) and projection.learnable is not None:
        params = (projection.learnable.weights(),)

    def call(s, t, a, m, red, p):
        proj = projection
        if p:
            proj = dataclasses.replace(projection, learnable=_FixedWeights(p[0]))
        args = (s, t) if proj is None else (s, t, proj)
        return fn(*args, alignment=a, mask=m, reduction=red, group=group, **kw)

    return run_blocked(call, student_logits, teacher_logits, params, block_size=block_size, alignment=alignment, mask=mask, reduction=reduction)


# ---- KL -----------------------------------------------------------------------------------------
def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    alignment: AlignedPositions | None = None,
    merge: str = "chain",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    block_size: int | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Same-tokenizer KL(p_T ‖ p_S) on vocab shards: the baseline every other loss is timed against."""
    _check_reduction(reduction)
    group = resolve_group(group)
    _, tp = group_rank_size(group)
    sv = _flatten(student_logits, "student_logits").shape[1]
    teacher_logits = shard_teacher(teacher_logits, group, padded=sv * tp)  # a cached SparseTeacher → this rank's columns
    if block_size is not None:
        return _blocked(vocab_parallel_kl, student_logits, teacher_logits, None, block_size, alignment, mask, reduction, group,
                        student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size, merge=merge,
                        temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared)
    tv = _flatten(teacher_logits, "teacher_logits").shape[1]
    vs = student_vocab_size if student_vocab_size is not None else sv * tp
    vt = teacher_vocab_size if teacher_vocab_size is not None else tv * tp
    if vs != vt:
        raise XTokenError(
            f"kl needs one tokenizer: student vocabulary {vs} != teacher vocabulary {vt} "
            f"(student_logits {tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)}); use p_kl"
        )
    if sv != tv and tp > 1:
        raise XTokenError(
            f"kl on {tp} ranks needs equal padded vocabularies (shards student {sv}, teacher {tv} wide): "
            "pad both models to the same size"
        )
    items = _prepare(
        student_logits, teacher_logits, student_vocab=vs, teacher_vocab=vt, teacher_valid=None, teacher_id_map=None,
        alignment=alignment, merge=merge, mask=mask, temperature=temperature, group=group,
    )
    w = min(items.lp_s.shape[1], items.lp_t.shape[1])  # tp = 1 with unequal padding: real columns only
    partial = _KLPartial.apply(items.lp_t[:, :w], items.lp_s[:, :w], False, 0.0)
    loss = sum_partials(partial, group)
    return _reduce(loss, items, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


# ---- P-KL ---------------------------------------------------------------------------------------
def _mm(dense: torch.Tensor, csr: torch.Tensor) -> torch.Tensor | None:
    """``dense [n, a] @ csr [a, b]``, None when the product is empty."""
    if dense.shape[0] == 0 or csr.shape[1] == 0 or csr.shape[0] == 0 or csr.values().numel() == 0:
        return None
    return dense @ csr


def _csr_entries(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each stored value of a CSR matrix, in value order."""
    crow = m.crow_indices()
    rows = torch.repeat_interleave(torch.arange(m.shape[0], device=crow.device), crow[1:] - crow[:-1])
    return rows, m.col_indices()


def _sampled_products(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``Σ_n a[n, rows[k]] · b[n, cols[k]]`` for every k (W's gradient at its non-zeros), ``block`` rows at a time."""
    out = a.new_zeros(rows.numel())
    for n0 in range(0, a.shape[0], block):
        out += (a[n0 : n0 + block].index_select(1, rows) * b[n0 : n0 + block].index_select(1, cols)).sum(0)
    return out


class _ExchangeProject(torch.autograd.Function):
    """``p̃_S = Wᵀ p_S`` on this teacher shard from log-probability shards ``lp_S``.

    Forward: ``q = exp(lp_S)``; the local block of W; one all-to-all of the planned values
    (student columns and partial sums, ``q @ send_mat``); their sparse block.  Backward: the
    transposed blocks, the reverse all-to-all, times ``q`` (recomputed; nothing but ``lp_S``
    saved).  With a learnable W (``w_values`` ``[nnz]``, W's non-zeros): the plan's matrices are
    filled with those weights, and W's gradient — each non-zero sits in exactly one rank's
    matrices — is summed over the group, so every rank holds the full gradient of its
    (replicated) W.
    """

    @staticmethod
    def forward(ctx, lp: torch.Tensor, plan, group, w_values: torch.Tensor | None = None) -> torch.Tensor:  # lp [n, w_S]
        if w_values is not None:
            plan = plan.with_values(w_values)
        ctx.plan, ctx.group, ctx.has_w = plan, group, w_values is not None
        ctx.nnz = 0 if w_values is None else w_values.numel()
        n = lp.shape[0]
        q = lp.exp()
        out = _mm(q, plan.local)
        out = q.new_zeros(n, plan.local.shape[1]) if out is None else out
        recv = None
        if plan.exchange:  # the same decision on every rank
            send = _mm(q, plan.send_mat)
            send = q.new_zeros(n, plan.send_mat.shape[1]) if send is None else send
            del q
            recv = all_to_all_columns(send.t().contiguous(), plan.send_splits, plan.recv_splits, group).t()
            add = _mm(recv, plan.recv_mat)
            if add is not None:
                out.add_(add)
        keep_recv = ctx.has_w and recv is not None  # [n, K_recv]: small (the planned values), for W's gradient
        ctx.save_for_backward(lp, recv if keep_recv else None)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        lp, recv = ctx.saved_tensors
        plan = ctx.plan
        n = g.shape[0]
        g = g.float()
        gq = _mm(g, plan.local_t)
        gq = g.new_zeros(n, lp.shape[1]) if gq is None else gq
        gsend = None
        if plan.exchange:  # the same decision on every rank
            grecv = _mm(g, plan.recv_mat_t)
            grecv = g.new_zeros(n, plan.recv_mat_t.shape[1]) if grecv is None else grecv
            gsend = all_to_all_columns(grecv.t().contiguous(), plan.recv_splits, plan.send_splits, ctx.group).t()
            add = _mm(gsend, plan.send_mat_t)
            if add is not None:
                gq.add_(add)
        q = lp.exp()
        gw = None
        if ctx.has_w:
            gw = g.new_zeros(ctx.nnz)
            for mat, src, left, right in (
                (plan.local, plan.sources["local"], q, g),
                (plan.send_mat, plan.sources["send_mat"], q, gsend),
                (plan.recv_mat, plan.sources["recv_mat"], recv, g),
            ):
                if right is None or left is None or src.numel() == 0:
                    continue
                rows, cols = _csr_entries(mat)
                learn = src >= 0  # one-hot routing entries (constant 1) carry no W weight
                if bool(learn.any()):
                    gw.index_add_(0, src[learn], _sampled_products(left, right, rows[learn], cols[learn]))
            if group_rank_size(ctx.group)[1] > 1:
                torch.distributed.all_reduce(gw, group=ctx.group)
        return gq.mul_(q), None, None, gw


class _KLPartial(torch.autograd.Function):
    """Per row ``Σ_v p_T (log p_T − log q)`` over this shard, terms with ``p_T = 0`` exactly 0.

    ``q`` is given as ``log_q`` (KL) or as a probability (P-KL, H-KL's grouped probabilities):
    then the value uses ``log max(q, eps)`` (``additive``: ``log(q + eps)``, the public form) and
    the gradient that of ``log(q + δ)`` (:func:`~nemo_xtoken.losses.reference.floored_log`: the
    floor bounds the value only).  Saves only its inputs; the gradient flows to ``q`` / ``log_q``
    (the teacher side is frozen: no gradient).
    """

    @staticmethod
    def forward(ctx, lp_t: torch.Tensor, q: torch.Tensor, is_prob: bool, eps: float, additive: bool = False) -> torch.Tensor:
        ctx.is_prob, ctx.eps = is_prob, eps
        ctx.save_for_backward(lp_t, q)
        p_t = lp_t.exp()
        if is_prob:
            log_q = (q + eps).log() if additive else q.clamp_min(eps).log()
        else:
            log_q = q
        diff = torch.where(p_t > 0, lp_t - log_q, torch.zeros((), dtype=lp_t.dtype, device=lp_t.device))
        del log_q
        return (diff.mul_(p_t)).sum(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        lp_t, q = ctx.saved_tensors
        p_t = lp_t.exp()  # 0 where the teacher has no mass (and on padded columns)
        gq = p_t.mul_(-g.unsqueeze(1))
        if ctx.is_prob:
            gq = gq.div_(q + grad_floor(q.dtype))
        return None, gq, None, None, None


def vocab_parallel_p_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: Any,
    *,
    alignment: AlignedPositions | None = None,
    merge: str = "chain",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    eps: float = P_KL_EPS,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    block_size: int | None = None,
    group: Any = None,
    teacher_top_k: int | None = None,
    _teacher_columns: np.ndarray | None = None,
) -> torch.Tensor:
    """KL(p_T ‖ Wᵀp_S) on vocab shards, exact over the whole vocabulary.

    ``projection``: a :class:`PKLPlan` (build it once: ``PKLPlan.build(W, tp, V_S', V_T')``, with
    ``teacher_perm`` if the teacher's output rows were permuted), or W itself (a plan is then
    built on every call: fine for tests, slow for training).  W may be a
    :class:`~nemo_xtoken.losses.learnable.LearnableProjection` (or the plan built from one): its
    current weights are used and its gradient is the full one on every rank.  Teacher targets in ``alignment``
    stay original teacher ids; the plan maps them to permuted columns.

    ``teacher_top_k=k``: NeMo-RL's teacher subset, as :func:`nemo_xtoken.losses.reference.p_kl`
    (the per-id importance all-gathered: ``V_T`` values per call, not per item).
    """
    _check_reduction(reduction)
    group = resolve_group(group)
    rank, tp = group_rank_size(group)
    if teacher_top_k is not None and not isinstance(teacher_logits, torch.Tensor):
        raise XTokenError(
            "teacher_top_k applies to a live teacher's logits: a cached teacher keeps its own top-k per position "
            "(xtoken cache-teacher --top-k); remove teacher_top_k for it"
        )
    teacher_logits = shard_teacher(teacher_logits, group, plan=projection)
    s = _flatten(student_logits, "student_logits")
    t = _flatten(teacher_logits, "teacher_logits")
    plan = projection
    if not isinstance(plan, PKLPlan):
        projection_csr(projection)  # validates the type with a clear error (a LearnableProjection is kept by the plan)
        plan = PKLPlan.build(
            projection, tp, s.shape[1] * tp, t.shape[1] * tp,
            student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
        )
    if plan.tp != tp:
        raise XTokenError(f"the P-KL plan was built for tp = {plan.tp} but the group has {tp} ranks: rebuild it")
    if teacher_top_k is not None:  # NeMo-RL's subset, chosen once over every position (before any blocking)
        if t.shape[1] * tp != plan.teacher_padded:
            raise XTokenError(
                f"the P-KL plan expects a padded teacher vocabulary of {plan.teacher_padded} but teacher_logits "
                f"{tuple(teacher_logits.shape)} on {tp} ranks cover {t.shape[1] * tp}: W or the plan belongs to other models"
            )
        _teacher_columns = _top_k_columns(t, teacher_top_k, plan, group)
    if block_size is not None:
        return _blocked(vocab_parallel_p_kl, student_logits, teacher_logits, plan, block_size, alignment, mask, reduction, group,
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared, eps=eps,
                        _teacher_columns=_teacher_columns)
    if (plan.student_padded, plan.teacher_padded) != (s.shape[1] * tp, t.shape[1] * tp):
        raise XTokenError(
            f"the P-KL plan expects padded vocabularies ({plan.student_padded}, {plan.teacher_padded}) but "
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} on {tp} ranks "
            f"cover ({s.shape[1] * tp}, {t.shape[1] * tp}): W (shape ({plan.student_vocab_size}, {plan.teacher_vocab_size})) "
            "or the plan belongs to other models"
        )
    valid = plan.teacher_valid() if _teacher_columns is None else plan.teacher_valid() & _teacher_columns  # top-k: the rest is p_T = 0
    items = _prepare(
        student_logits, teacher_logits, student_vocab=plan.student_vocab_size, teacher_vocab=None,
        teacher_valid=valid, teacher_id_map=plan.map_teacher_ids,
        alignment=alignment, merge=merge, mask=mask, temperature=temperature, group=group,
    )
    rp = plan.rank_plan(rank, items.lp_s.device)
    w_values = None
    if plan.learnable is not None:  # a learnable W: its current weights fill the plan, its gradient comes back
        w_values = plan.learnable.weights()
        if w_values.numel() != plan.nnz:
            raise XTokenError(
                f"the P-KL plan was built for a W with {plan.nnz} non-zeros but its learnable W has {w_values.numel()}: rebuild the plan"
            )
        w_values = w_values.to(items.lp_s.device)
    p_tilde = _ExchangeProject.apply(items.lp_s, rp, group, w_values)
    if alignment is not None and merge == "reference":  # renormalized over the whole teacher vocabulary, as published
        if _teacher_columns is None:
            on = p_tilde
        else:
            w_t = p_tilde.shape[1]
            mine = torch.from_numpy(np.ascontiguousarray(_teacher_columns[rank * w_t : (rank + 1) * w_t])).to(p_tilde.device)
            on = p_tilde.masked_fill(~mine, 0.0)
        total = all_reduce_sum(on.sum(dim=1, keepdim=True), group)
        partial = _KLPartial.apply(items.lp_t, p_tilde / (total + REFERENCE_EPS), True, REFERENCE_EPS, True)
    else:
        partial = _KLPartial.apply(items.lp_t, p_tilde, True, eps)
    loss = sum_partials(partial, group)
    return _reduce(loss, items, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _top_k_columns(t: torch.Tensor, k: Any, plan: PKLPlan, group: Any) -> np.ndarray:
    """The columns (bool ``[teacher_padded]``, every rank alike) of :func:`~nemo_xtoken.losses.reference.teacher_top_k_columns`.

    The per-column importance (largest logit over this call's rows) is all-gathered, put back in
    teacher-id order (the plan's permutation, padded columns left out), and the same stable top-k
    as the reference picks the ids on every rank.
    """
    w = t.shape[1]
    with torch.no_grad():
        imp = t.detach().max(dim=0).values.double() if t.shape[0] else t.new_full((w,), float("-inf"), dtype=torch.float64)
        full = all_gather_columns(imp.unsqueeze(0), group)[0].cpu().numpy()  # [teacher_padded], column order
    valid = plan.teacher_valid()
    ids = np.arange(plan.teacher_padded) if plan.teacher_perm is None else np.asarray(plan.teacher_perm, dtype=np.int64)
    by_id = torch.full((plan.teacher_vocab_size,), float("-inf"), dtype=torch.float64)
    by_id[torch.from_numpy(ids[valid])] = torch.from_numpy(full[valid])
    keep_id = teacher_top_k_columns(by_id, k).numpy()
    cols = np.zeros(plan.teacher_padded, dtype=bool)
    cols[valid] = keep_id[ids[valid]]
    return cols


# ---- ULD, GOLD, H-KL (rank-sorted L1: exact, through an all-gather of the item probabilities) ---
def _sorted_l1(ps: torch.Tensor, pt: torch.Tensor, tail: str = "pad", top_k: int = REFERENCE_UNCOMMON_TOP_K) -> torch.Tensor:
    """Per-item Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|, the narrower side zero-padded.

    With widths ``k < n``, only the wider side's ``k`` largest values meet a nonzero partner; the
    rest contribute ``Σ |p|`` in any order.  So the wider side takes a top-``k`` (a partial sort:
    ULD ← Qwen3 at the demo's size sorts 1,000 student columns against 94 teacher ones, and a top-94
    costs a quarter of the full sort) and the sum of what is left; equal to the padded full sort
    (same values up to summation order; the same gradient, ``sign`` of each pair, ``+1`` on the rest,
    up to which of two tied values is counted where).  The reference
    (:func:`nemo_xtoken.losses.reference.uld`) keeps the full sort.

    ``tail="truncate"`` (NeMo-RL): both sides' ``min(n_S, n_T, top_k)`` largest values only.
    """
    n_s, n_t = ps.shape[1], pt.shape[1]
    if tail == "truncate":
        k = min(n_s, n_t, int(top_k))
        if k == 0:
            return ps.new_zeros(ps.shape[0])
        return (torch.topk(ps, k, dim=1, sorted=True).values - torch.topk(pt, k, dim=1, sorted=True).values).abs().sum(dim=1)
    width, k = max(n_s, n_t), min(n_s, n_t)
    if width == 0:
        return ps.new_zeros(ps.shape[0])
    if k == width:
        a = torch.sort(ps, dim=1, descending=True).values
        b = torch.sort(pt, dim=1, descending=True).values
        return (a - b).abs().sum(dim=1)
    wide, narrow = (ps, pt) if n_s > n_t else (pt, ps)
    if k == 0:
        return wide.abs().sum(dim=1)
    top, idx = torch.topk(wide, k, dim=1, sorted=True)
    head = (top - torch.sort(narrow, dim=1, descending=True).values).abs().sum(dim=1)
    return head + wide.scatter(1, idx, 0.0).abs().sum(dim=1)


def _gathered_probs(items: _Items, v_s: int, v_t: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary item log-probabilities on every rank (real columns only); backward = own slice."""
    ls = all_gather_columns(items.lp_s, group)[:, :v_s]
    lt = all_gather_columns(items.lp_t, group)[:, :v_t]
    return ls, lt


def vocab_parallel_uld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    alignment: AlignedPositions | None = None,
    merge: str = "chain",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    block_size: int | None = None,
    summary_bins: int | None = None,
    bound_out: Any = None,
    group: Any = None,
    uld_tail: str = "pad",
    uld_top_k: int = REFERENCE_UNCOMMON_TOP_K,
) -> torch.Tensor:
    """ULD on vocab shards: exact (the sort on the gathered item rows), or low traffic with ``summary_bins``.

    ``summary_bins=G``: the sorted L1 from additive shard summaries (:mod:`nemo_xtoken.parallel.summary`,
    ``4·G`` values all-reduced per item instead of both vocabularies, error bound stated there);
    ``bound_out`` (a :class:`~nemo_xtoken.parallel.summary.SummaryBound`) receives that bound.
    ``uld_tail="truncate"`` (NeMo-RL's tail) is exact only: the summary cannot cut the sorted sides.
    """
    _check_reduction(reduction)
    check_uld_tail(uld_tail, uld_top_k)
    if uld_tail != "pad" and summary_bins is not None:
        raise XTokenError(_TRUNCATE_SUMMARY)
    group = resolve_group(group)
    teacher_logits = shard_teacher(teacher_logits, group)
    if block_size is not None:
        return _blocked(vocab_parallel_uld, student_logits, teacher_logits, None, block_size, alignment, mask, reduction, group,
                        student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size, merge=merge,
                        temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared,
                        summary_bins=summary_bins, bound_out=bound_out, uld_tail=uld_tail, uld_top_k=uld_top_k)
    _, tp = group_rank_size(group)
    vs = student_vocab_size if student_vocab_size is not None else _flatten(student_logits, "student_logits").shape[1] * tp
    vt = teacher_vocab_size if teacher_vocab_size is not None else _flatten(teacher_logits, "teacher_logits").shape[1] * tp
    items = _prepare(
        student_logits, teacher_logits, student_vocab=vs, teacher_vocab=vt, teacher_valid=None, teacher_id_map=None,
        alignment=alignment, merge=merge, mask=mask, temperature=temperature, group=group,
    )
    if summary_bins is not None:  # low traffic: the sorted L1 from shard summaries (stated error bound)
        from nemo_xtoken.parallel.summary import summary_sorted_l1

        loss, bound = summary_sorted_l1(items.lp_s.exp(), items.lp_t.detach().exp(), bins=int(summary_bins), group=group)
        scale = temperature**2 if scale_by_temperature_squared else 1.0
        if bound_out is not None:
            bound_out.add(bound * scale)
        return _reduce(loss, items, reduction, scale)
    ls, lt = _gathered_probs(items, vs, vt, group)
    loss = _sorted_l1(ls.exp(), lt.exp(), uld_tail, uld_top_k)  # replicated: computed once per rank, not summed over ranks
    return _reduce(loss, items, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _hybrid(
    student_logits, teacher_logits, projection, relaxed, alignment, merge, mask, temperature, reduction,
    scale_by_temperature_squared, matched_weight, unmatched_weight, student_vocab_size, teacher_vocab_size, group,
    block_size=None, bound_out=None, uld_tail="pad", uld_top_k=REFERENCE_UNCOMMON_TOP_K, common_set="top1",
) -> torch.Tensor:
    from nemo_xtoken.losses.reference import choose_common_set, resolve_projection

    from nemo_xtoken.parallel.summary import HybridPlan

    _check_reduction(reduction)
    check_uld_tail(uld_tail, uld_top_k)
    group = resolve_group(group)
    rank, tp = group_rank_size(group)
    # a cached SparseTeacher → this rank's columns (at a HybridPlan's padded width and permutation)
    teacher_logits = shard_teacher(teacher_logits, group, plan=projection if isinstance(projection, HybridPlan) else None)
    if isinstance(projection, HybridPlan):
        w = projection
    else:
        w = resolve_projection(projection, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
    if block_size is not None:
        fn = vocab_parallel_h_kl if relaxed else vocab_parallel_gold
        extra = dict(common_set=common_set) if relaxed else {}
        return _blocked(fn, student_logits, teacher_logits, w, block_size, alignment, mask, reduction, group,
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared,
                        matched_weight=matched_weight, unmatched_weight=unmatched_weight, bound_out=bound_out,
                        uld_tail=uld_tail, uld_top_k=uld_top_k, **extra)
    if isinstance(w, HybridPlan):
        if uld_tail != "pad":
            raise XTokenError(_TRUNCATE_SUMMARY)
        if w.common_set != common_set:
            raise XTokenError(
                f"this HybridPlan was built with common_set={w.common_set!r} but the loss asks for {common_set!r}: "
                "build it with HybridPlan.build(..., common_set=...) (config distill.common_set)"
            )
        return _hybrid_low_traffic(
            student_logits, teacher_logits, w, relaxed, alignment, merge, mask, temperature, reduction,
            scale_by_temperature_squared, matched_weight, unmatched_weight, group, bound_out,
        )
    v_s, v_t = w.shape
    s = _flatten(student_logits, "student_logits")
    t = _flatten(teacher_logits, "teacher_logits")
    for side, x, v in (("student", s, v_s), ("teacher", t, v_t)):
        if x.shape[1] * tp < v:
            raise XTokenError(
                f"{side}_logits shards {tuple(x.shape)} on {tp} ranks cover {x.shape[1] * tp} columns but W {w.shape} "
                f"needs {v}: W was built for other tokenizers, or the logits are not the full vocabulary"
            )
        if x.shape[1] * tp % tp:
            raise XTokenError(f"{side} padded vocabulary not divisible by tp = {tp}")
    common = choose_common_set(w, relaxed, common_set)
    if (matched_weight is None) != (unmatched_weight is None):
        raise XTokenError("matched_weight and unmatched_weight must both be numbers or both be None (adaptive)")
    if matched_weight is None:  # TRL GOLD's adaptive weighting, as the reference
        matched_weight = common.teacher_ids.numel() / max(1, v_t)
        unmatched_weight = 1.0 - matched_weight
    items = _prepare(
        student_logits, teacher_logits, student_vocab=v_s, teacher_vocab=v_t, teacher_valid=None, teacher_id_map=None,
        alignment=alignment, merge=merge, mask=mask, temperature=temperature, group=group,
    )
    ls, lt = _gathered_probs(items, v_s, v_t, group)
    dev = ls.device
    sid, grp, tid = common.student_ids.to(dev), common.group.to(dev), common.teacher_ids.to(dev)
    if common.one_to_one:
        log_q = ls.index_select(1, sid)
    else:
        grouped = ls.new_zeros(ls.shape[0], tid.numel()).index_add(1, grp, ls.index_select(1, sid).exp())
        log_q = floored_log(grouped, P_KL_EPS)
    matched = _kl_terms(lt.index_select(1, tid), log_q)
    s_keep = torch.ones(v_s, dtype=torch.bool, device=dev)
    s_keep[sid] = False
    t_keep = torch.ones(v_t, dtype=torch.bool, device=dev)
    t_keep[tid] = False
    unmatched = _sorted_l1(
        ls.index_select(1, torch.nonzero(s_keep, as_tuple=True)[0]).exp(),
        lt.index_select(1, torch.nonzero(t_keep, as_tuple=True)[0]).exp(),
        uld_tail, uld_top_k,
    )
    loss = float(matched_weight) * matched + float(unmatched_weight) * unmatched  # replicated, not summed
    return _reduce(loss, items, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _hybrid_low_traffic(
    student_logits, teacher_logits, plan, relaxed, alignment, merge, mask, temperature, reduction,
    scale_by_temperature_squared, matched_weight, unmatched_weight, group, bound_out=None,
) -> torch.Tensor:
    """GOLD / H-KL through a :class:`~nemo_xtoken.parallel.summary.HybridPlan` (:mod:`nemo_xtoken.parallel.summary`)."""
    from nemo_xtoken.parallel.summary import summary_sorted_l1

    rank, tp = group_rank_size(group)
    if plan.relaxed != relaxed:
        raise XTokenError(
            f"this HybridPlan was built for {'H-KL' if plan.relaxed else 'GOLD'} (relaxed={plan.relaxed}): "
            f"build one with relaxed={relaxed} for {'H-KL' if relaxed else 'GOLD'}"
        )
    pk = plan.pkl
    if pk.tp != tp:
        raise XTokenError(f"the HybridPlan was built for tp = {pk.tp} but the group has {tp} ranks: rebuild it")
    s = _flatten(student_logits, "student_logits")
    t = _flatten(teacher_logits, "teacher_logits")
    if (pk.student_padded, pk.teacher_padded) != (s.shape[1] * tp, t.shape[1] * tp):
        raise XTokenError(
            f"the HybridPlan expects padded vocabularies ({pk.student_padded}, {pk.teacher_padded}) but student_logits "
            f"{tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} on {tp} ranks cover "
            f"({s.shape[1] * tp}, {t.shape[1] * tp}): W or the plan belongs to other models"
        )
    if (matched_weight is None) != (unmatched_weight is None):
        raise XTokenError("matched_weight and unmatched_weight must both be numbers or both be None (adaptive)")
    if matched_weight is None:  # TRL GOLD's adaptive weighting, as the reference
        matched_weight = plan.n_common_teacher / max(1, pk.teacher_vocab_size)
        unmatched_weight = 1.0 - matched_weight
    items = _prepare(
        student_logits, teacher_logits, student_vocab=pk.student_vocab_size, teacher_vocab=None,
        teacher_valid=pk.teacher_valid(), teacher_id_map=pk.map_teacher_ids,
        alignment=alignment, merge=merge, mask=mask, temperature=temperature, group=group,
    )
    s_keep, t_keep, t_common = plan.masks(rank, items.lp_s.device)
    # the common-set KL: q = Mᵀ p_S on the teacher's shards (one all-to-all), the teacher's mass off
    # the common set masked out; value floor as the reference (grouped: EPS; one-to-one: the exact log
    # down to grad_floor)
    q = _ExchangeProject.apply(items.lp_s, pk.rank_plan(rank, items.lp_s.device), group, None)
    lp_tc = items.lp_t.masked_fill(~t_common, float("-inf"))
    eps = grad_floor(q.dtype) if plan.one_to_one else P_KL_EPS
    matched = sum_partials(_KLPartial.apply(lp_tc, q, True, eps), group)
    ps = items.lp_s.exp().masked_fill(~s_keep, 0.0)
    pt = items.lp_t.detach().exp().masked_fill(~t_keep, 0.0)
    unmatched, bound = summary_sorted_l1(ps, pt, bins=plan.bins, group=group)
    loss = float(matched_weight) * matched + float(unmatched_weight) * unmatched
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    if bound_out is not None:  # exact − value ∈ [0, unmatched_weight · bound] per item (unmatched_weight ≥ 0)
        bound_out.add(abs(float(unmatched_weight)) * scale * bound)
    return _reduce(loss, items, reduction, scale)


def vocab_parallel_gold(student_logits: torch.Tensor, teacher_logits: torch.Tensor, projection: Any, **options: Any) -> torch.Tensor:
    """GOLD (KL on the exact-match common set + ULD on the rest) on vocab shards: exact, or low traffic with a ``HybridPlan``.

    It is :func:`vocab_parallel_h_kl` with ``common_set=None`` (the strict exact-match set), and takes the
    same keyword options (``common_set`` excepted); ``bound_out`` receives the low-traffic path's error bound.
    """
    return vocab_parallel_h_kl(student_logits, teacher_logits, projection, common_set=None, **options)


def vocab_parallel_h_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: Any,
    *,
    matched_weight: float | None = 1.0,
    unmatched_weight: float | None = 1.0,
    alignment: AlignedPositions | None = None,
    merge: str = "chain",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    block_size: int | None = None,
    bound_out: Any = None,
    group: Any = None,
    uld_tail: str = "pad",
    uld_top_k: int = REFERENCE_UNCOMMON_TOP_K,
    common_set: str | None = "top1",
) -> torch.Tensor:
    """H-KL (GOLD with the common set relaxed to each student row's top-1 under W) on vocab shards: exact, or low traffic with a ``HybridPlan``.

    ``bound_out`` (a :class:`~nemo_xtoken.parallel.summary.SummaryBound`) receives the low-traffic path's error bound.
    ``common_set=None``: GOLD's strict exact-match set (:func:`vocab_parallel_gold`).
    """
    return _hybrid(
        student_logits, teacher_logits, projection, common_set is not None, alignment, merge, mask, temperature, reduction,
        scale_by_temperature_squared, matched_weight, unmatched_weight, student_vocab_size, teacher_vocab_size, group, block_size,
        bound_out, uld_tail, uld_top_k, common_set or "top1",
    )
