"""Chunk merge: per-position next-token distributions → one distribution per aligned chunk.

**The next-token shift, in one place.**  Logits at position ``p`` predict token ``p + 1``.  A chunk
covering tokens ``[a, b)`` of one side is therefore predicted by positions ``a-1 … b-2``; a chunk
that starts at token 0 has no predicting position and takes no part in the loss.  The function
:func:`positions_from_token_chunks` turns per-token chunk ids into per-position ones and the
targets ``token[p + 1]``; everything downstream (losses, tensor-parallel losses) works on
:class:`AlignedPositions`.

**Merges** a loss accepts (``merge=``; :func:`side_modes` says what each side does):

- ``"chain"`` (default, the paper's chain rule): for a chunk predicted by positions
  ``p_0 < p_1 < … < p_m``, the student's ``log q_S(v) = log p_{p_0}(v) + Σ_{i ≥ 1} log
  p_{p_i}(target_{p_i})``: the distribution of the chunk's first token, scaled by the probability
  ``C_S`` that the rest of the chunk follows as it did (the student can change ``C_S``).  The
  teacher's chain-merged distribution is **normalized**: ``q_T / Σ_v q_T = p_{p_0}`` — its
  continuation probability ``C_T`` is a constant factor the student cannot change; left in, it
  would add ``C_T·log C_T < 0`` to every chunk's KL, so that a student equal to the teacher
  scores below 0 (see docs/losses.md).  A one-token chunk is its position unchanged.
- ``"mean"``: ``q(v) = mean_i p_{p_i}(v)`` on both sides (a distribution, sums to 1).
- ``"reference"`` (the public reference code, NeMo-RL's X-Token loss): student probabilities
  averaged over the chunk's positions (``"mean"``; P-KL renormalizes them after the projection),
  teacher log-probabilities averaged (``"logmean"``: ``log q(v) = mean_i log p_{p_i}(v)``,
  unnormalized, as published).

Per side, :func:`merge_log_probs` takes ``mode`` = ``"chain"`` (``normalize=True``: the first
position's distribution), ``"mean"`` or ``"logmean"``; all are differentiable, in log space, and
work on a vocab shard ``[N, V/tp]`` unchanged.  The chain's target log-probabilities are
per-position scalars, so on a vocab-sharded tensor the caller gathers them once (a local lookup
and one all-reduce) and the merge itself needs no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AlignedPositions", "positions_from_token_chunks", "merge_log_probs", "side_modes", "MERGES", "SIDE_MODES"]

MERGES = ("chain", "mean", "reference")
SIDE_MODES = ("chain", "mean", "logmean")


def side_modes(merge: str) -> tuple[str, str]:
    """``(student mode, teacher mode)`` of a loss's ``merge`` (the teacher's chain is normalized)."""
    if merge not in MERGES:
        raise ValueError(f"merge {merge!r} is not one of {MERGES}")
    return {"chain": ("chain", "chain"), "mean": ("mean", "mean"), "reference": ("mean", "logmean")}[merge]


@dataclass
class AlignedPositions:
    """Per-position chunk ids of both sides, as the losses consume them.

    ``student_chunk_ids[p]`` is the chunk that student position ``p`` helps predict, ``-1`` for
    none (padding, a masked label, the last position, a one-sided chunk); likewise for the
    teacher.  ``n_chunks`` bounds the ids.  Chunk ``k`` enters the loss only if both sides have a
    position in it (:meth:`chunk_mask`).  ``*_targets[p]`` is the token position ``p`` predicts
    (``token[p + 1]``), used by the chain merge.  Batches are flattened: ids are unique over the
    whole batch (see :meth:`concat`).
    """

    student_chunk_ids: torch.Tensor  # int64 [N_s]
    teacher_chunk_ids: torch.Tensor  # int64 [N_t]
    student_targets: torch.Tensor  # int64 [N_s]
    teacher_targets: torch.Tensor  # int64 [N_t]
    n_chunks: int

    def chunk_mask(self) -> torch.Tensor:
        """bool [n_chunks]: chunks predicted by at least one position on both sides."""
        s = torch.zeros(self.n_chunks, dtype=torch.bool, device=self.student_chunk_ids.device)
        t = torch.zeros_like(s)
        sid, tid = self.student_chunk_ids, self.teacher_chunk_ids
        s[sid[sid >= 0]] = True
        t[tid[tid >= 0]] = True
        return s & t

    def to(self, device) -> "AlignedPositions":
        return AlignedPositions(
            self.student_chunk_ids.to(device),
            self.teacher_chunk_ids.to(device),
            self.student_targets.to(device),
            self.teacher_targets.to(device),
            self.n_chunks,
        )

    @staticmethod
    def concat(parts: list["AlignedPositions"]) -> "AlignedPositions":
        """Concatenate per-sequence alignments of a batch (offsetting chunk ids)."""
        sids, tids, sts, tts, off = [], [], [], [], 0
        for a in parts:
            sids.append(torch.where(a.student_chunk_ids >= 0, a.student_chunk_ids + off, a.student_chunk_ids))
            tids.append(torch.where(a.teacher_chunk_ids >= 0, a.teacher_chunk_ids + off, a.teacher_chunk_ids))
            sts.append(a.student_targets)
            tts.append(a.teacher_targets)
            off += a.n_chunks
        return AlignedPositions(torch.cat(sids), torch.cat(tids), torch.cat(sts), torch.cat(tts), off)


def positions_from_token_chunks(
    student_token_chunk_ids: torch.Tensor,
    teacher_token_chunk_ids: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    n_chunks: int,
    *,
    student_loss_mask: torch.Tensor | None = None,
) -> AlignedPositions:
    """Apply the next-token shift to per-token chunk ids of one sequence (1-D tensors).

    Position ``p`` gets the chunk id of token ``p + 1`` and target ``token[p + 1]``; the last
    position gets ``-1``.  ``student_loss_mask[p]`` (per position, as Megatron's ``loss_mask``)
    set to 0 removes the position from its chunk.
    """

    def shift(chunk_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.full_like(chunk_ids, -1)
        tgt = torch.zeros_like(ids)
        if chunk_ids.numel() > 1:
            c[:-1] = chunk_ids[1:]
            tgt[:-1] = ids[1:]
        return c, tgt

    sc, st = shift(student_token_chunk_ids.long(), student_ids.long())
    tc, tt = shift(teacher_token_chunk_ids.long(), teacher_ids.long())
    if student_loss_mask is not None:
        sc = torch.where(student_loss_mask.bool(), sc, torch.full_like(sc, -1))
    return AlignedPositions(sc, tc, st, tt, int(n_chunks))


def merge_log_probs(
    log_probs: torch.Tensor,
    chunk_ids: torch.Tensor,
    n_chunks: int,
    *,
    mode: str = "chain",
    target_log_probs: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Merge per-position log-distributions ``[N, V]`` into per-chunk ones ``[n_chunks, V]``.

    ``chunk_ids`` int64 ``[N]`` (``-1`` = position in no chunk).  ``mode`` is one side's merge
    (:data:`SIDE_MODES`).  ``"chain"`` needs ``target_log_probs`` ``[N]`` (log p of each position's
    actual next token) unless ``normalize=True``, which returns the normalized chain merge: the
    chunk's first position's distribution (the continuation probability is a per-chunk constant).
    Chunks with no position get ``-inf`` rows (callers mask them with
    :meth:`AlignedPositions.chunk_mask`).
    """
    if mode not in SIDE_MODES:
        raise ValueError(f"merge mode {mode!r} is not one of {SIDE_MODES}")
    if log_probs.dim() != 2 or chunk_ids.shape != log_probs.shape[:1]:
        raise ValueError(f"merge_log_probs needs log_probs [N, V] and chunk_ids [N]; got {tuple(log_probs.shape)} and {tuple(chunk_ids.shape)}")
    n, v = log_probs.shape
    valid = chunk_ids >= 0
    pos = torch.nonzero(valid, as_tuple=True)[0]
    cid = chunk_ids[pos]
    out_dtype = log_probs.dtype
    if mode == "chain":
        if not normalize and (target_log_probs is None or target_log_probs.shape != (n,)):
            raise ValueError("the chain merge needs target_log_probs [N] (log p of the actual next tokens)")
        # First position of each chunk (positions are increasing within a chunk).
        first = torch.full((n_chunks,), n, dtype=torch.long, device=log_probs.device)
        first.scatter_reduce_(0, cid, pos, reduce="amin")
        has = first < n
        # (no position: zeros still connected to the graph, so an empty side back-propagates zeros)
        rows = log_probs.index_select(0, first.clamp(max=max(n - 1, 0))) if n else log_probs.new_zeros(n_chunks, v) + log_probs.sum() * 0
        if normalize:
            merged = rows
        else:
            tl = target_log_probs[pos]
            is_first = pos == first[cid]
            cont = torch.zeros(n_chunks, dtype=tl.dtype, device=log_probs.device)
            cont = cont.index_add(0, cid, torch.where(is_first, torch.zeros_like(tl), tl))
            merged = rows + cont.unsqueeze(1).to(out_dtype)
        return torch.where(has.unsqueeze(1), merged, torch.full_like(merged, float("-inf")))
    count = torch.zeros(n_chunks, dtype=log_probs.dtype, device=log_probs.device).index_add(
        0, cid, torch.ones_like(cid, dtype=log_probs.dtype)
    )
    sel = log_probs[pos]
    if mode == "logmean":  # mean of the log-probabilities (a log of the geometric mean, unnormalized)
        summed = torch.zeros(n_chunks, v, dtype=log_probs.dtype, device=log_probs.device).index_add(0, cid, sel)
        merged = summed / count.clamp(min=1).unsqueeze(1)
        return torch.where((count > 0).unsqueeze(1), merged, torch.full_like(merged, float("-inf")))
    # mean: log( Σ_i exp(lp_i) / count ), stabilised by the per-chunk max
    cmax = torch.full((n_chunks, v), float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    cmax = cmax.scatter_reduce(0, cid.unsqueeze(1).expand(-1, v), sel.detach(), reduce="amax")
    cmax = torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax))
    summed = torch.zeros(n_chunks, v, dtype=log_probs.dtype, device=log_probs.device).index_add(
        0, cid, torch.exp(sel - cmax[cid])
    )
    merged = torch.log(summed) + cmax - torch.log(count.clamp(min=1)).unsqueeze(1)
    return torch.where((count > 0).unsqueeze(1), merged, torch.full_like(merged, float("-inf")))
