"""Static exchange plan for vocab-parallel P-KL, and the optional teacher permutation.

P-KL needs ``p̃_S = Wᵀ p_S`` on the teacher's vocabulary shards.  Teacher column ``t`` on rank
``r'`` needs ``p_S[s]`` for every student row ``s`` with ``W[s, t] ≠ 0``; ``s`` lives on rank
``s // (V_S'/tp)``.  The plan lists, for every pair ``(r, r')``, the student columns rank ``r``
must send to ``r'`` (exactly those, once each), and for every receiver the sparse block of W that
turns the received probabilities into its ``p̃_S`` columns.  The forward is one all-to-all of
those per-token probabilities, the backward the reverse all-to-all: no all-gather of logits.

The teacher is frozen, so its output-layer rows may be permuted once at load time
(:func:`teacher_permutation`): teacher ids are placed on the rank whose student shard links to
them most, and only a small halo of student columns crosses ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["PKLPlan", "teacher_permutation", "projection_csr"]


def projection_csr(projection: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """``(indptr, indices, data, (V_S, V_T))`` of W given as a ``Projection`` or a torch sparse CSR tensor."""
    if isinstance(projection, torch.Tensor):
        if projection.layout != torch.sparse_csr or projection.dim() != 2:
            raise XTokenError(
                f"projection must be a nemo_xtoken Projection or a 2-D torch sparse CSR tensor [V_S, V_T]; "
                f"got a tensor with layout {projection.layout} and shape {tuple(projection.shape)}"
            )
        p = projection.detach().cpu()
        return (
            p.crow_indices().numpy().astype(np.int64),
            p.col_indices().numpy().astype(np.int64),
            p.values().float().numpy(),
            (int(p.shape[0]), int(p.shape[1])),
        )
    if hasattr(projection, "indptr") and hasattr(projection, "shape"):
        return (
            np.asarray(projection.indptr, dtype=np.int64),
            np.asarray(projection.indices, dtype=np.int64),
            np.asarray(projection.data, dtype=np.float32),
            tuple(int(x) for x in projection.shape),
        )
    raise XTokenError(f"projection must be a nemo_xtoken Projection or a torch sparse CSR tensor, got {type(projection).__name__}")


def _check_padded(tp: int, student_padded: int, teacher_padded: int, shape: tuple[int, int]) -> None:
    v_s, v_t = shape
    if tp < 1:
        raise XTokenError(f"tensor-parallel size must be >= 1, got {tp}")
    if student_padded < v_s or teacher_padded < v_t:
        raise XTokenError(
            f"W has shape {shape} but student_logits cover {student_padded} and teacher_logits {teacher_padded} "
            "vocabulary columns (all shards): the padded vocabularies must be at least the tokenizers' "
            "(was W built for other tokenizers?)"
        )
    for side, size in (("student", student_padded), ("teacher", teacher_padded)):
        if size % tp:
            raise XTokenError(
                f"the {side} padded vocabulary ({size}) is not divisible by the tensor-parallel size {tp}: "
                "pad the vocabulary to a multiple of tp (Megatron pads to 128*tp)"
            )


def teacher_permutation(projection: Any, tp: int, student_padded: int, teacher_padded: int) -> np.ndarray:
    """A permutation of the padded teacher ids that keeps most non-zeros of W on one rank.

    Returns ``perm`` (int64 ``[teacher_padded]``): new position ``j`` holds original teacher id
    ``perm[j]``.  Apply it once to the frozen teacher's output layer (``weight[perm]``, bias
    likewise) and build the plan with it; the losses map teacher targets through the inverse.
    Greedy: each teacher column goes to the rank whose student shard has the most non-zeros in
    it (heaviest columns first), within the ``teacher_padded / tp`` slots of each rank.
    """
    indptr, indices, _, shape = projection_csr(projection)
    _check_padded(tp, student_padded, teacher_padded, shape)
    w_s, cap = student_padded // tp, teacher_padded // tp
    rows = np.repeat(np.arange(shape[0], dtype=np.int64), np.diff(indptr))
    counts = np.zeros((teacher_padded, tp), dtype=np.int64)
    np.add.at(counts, (indices, rows // w_s), 1)
    order_pref = np.argsort(-counts, axis=1, kind="stable")  # ranks by preference per column
    strength = counts.max(axis=1)
    linked = np.nonzero(strength > 0)[0]
    linked = linked[np.argsort(-strength[linked], kind="stable")]
    free = np.full(tp, cap, dtype=np.int64)
    slots: list[list[int]] = [[] for _ in range(tp)]
    for t in linked.tolist():
        for r in order_pref[t].tolist():
            if free[r] > 0:
                slots[r].append(t)
                free[r] -= 1
                break
    placed = np.zeros(teacher_padded, dtype=bool)
    placed[linked] = True
    rest = np.nonzero(~placed)[0].tolist()  # unlinked and padded ids fill the remaining slots, in order
    k = 0
    for r in range(tp):
        need = int(free[r])
        slots[r].extend(rest[k : k + need])
        k += need
    perm = np.concatenate([np.asarray(s, dtype=np.int64) for s in slots])
    assert perm.shape == (teacher_padded,) and np.array_equal(np.sort(perm), np.arange(teacher_padded))
    return perm


@dataclass
class _RankPlan:
    send_cols: torch.Tensor  # int64 [K_send]: local student columns, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    proj_t: torch.Tensor  # sparse CSR [w_T, K_recv]: p̃ᵀ = proj_t @ recv
    proj: torch.Tensor  # sparse CSR [K_recv, w_T]: grad_recv = proj @ grad_p̃ᵀ


@dataclass
class PKLPlan:
    """Which student probabilities each teacher shard needs, built once from W (see module doc)."""

    tp: int
    student_padded: int
    teacher_padded: int
    student_vocab_size: int
    teacher_vocab_size: int
    teacher_perm: np.ndarray | None  # new position → original teacher id, or None
    sent: np.ndarray  # int64 [tp, tp]: student columns rank r sends to r' (diagonal = kept local)
    ranks: list[_RankPlan] = field(repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def build(
        projection: Any,
        tp: int,
        student_padded: int | None = None,
        teacher_padded: int | None = None,
        *,
        teacher_perm: np.ndarray | None = None,
        student_vocab_size: int | None = None,
        teacher_vocab_size: int | None = None,
    ) -> "PKLPlan":
        """Build the exchange plan for ``tp`` ranks (``*_padded`` default to W's sizes).

        ``teacher_perm`` (from :func:`teacher_permutation`) says the teacher's logits columns are
        permuted: position ``j`` holds original teacher id ``teacher_perm[j]``.
        ``*_vocab_size``: the tokenizers' real sizes when W is a CSR tensor wider than them.
        """
        indptr, indices, data, wshape = projection_csr(projection)
        shape = (
            wshape[0] if student_vocab_size is None else int(student_vocab_size),
            wshape[1] if teacher_vocab_size is None else int(teacher_vocab_size),
        )
        if shape[0] > wshape[0] or shape[1] > wshape[1]:
            raise XTokenError(f"W has shape {wshape} but the tokenizers have {shape} ids: W was built for other tokenizers")
        if len(indices) and (int(np.repeat(np.arange(wshape[0]), np.diff(indptr)).max()) >= shape[0] or int(indices.max()) >= shape[1]):
            raise XTokenError(f"W {wshape} has non-zeros beyond the real vocabulary sizes {shape}: it was built for other tokenizers")
        indptr = indptr[: shape[0] + 1]
        sp = wshape[0] if student_padded is None else int(student_padded)
        tpd = wshape[1] if teacher_padded is None else int(teacher_padded)
        _check_padded(tp, sp, tpd, shape)
        inv = None
        if teacher_perm is not None:
            teacher_perm = np.asarray(teacher_perm, dtype=np.int64)
            if teacher_perm.shape != (tpd,) or not np.array_equal(np.sort(teacher_perm), np.arange(tpd)):
                raise XTokenError(
                    f"teacher_perm must be a permutation of the {tpd} padded teacher ids; got shape {teacher_perm.shape}"
                )
            inv = np.empty(tpd, dtype=np.int64)
            inv[teacher_perm] = np.arange(tpd)
        w_s, w_t = sp // tp, tpd // tp
        rows = np.repeat(np.arange(shape[0], dtype=np.int64), np.diff(indptr))
        cols = indices if inv is None else inv[indices]
        keep = data != 0
        rows, cols, vals = rows[keep], cols[keep], data[keep].astype(np.float32)
        src, dst = rows // w_s, cols // w_t
        sent = np.zeros((tp, tp), dtype=np.int64)
        # unique (src, dst, row) triples: the student columns each pair exchanges
        pair_key = (src * tp + dst) * sp + rows
        uniq = np.unique(pair_key)
        u_pair, u_row = uniq // sp, uniq % sp
        u_src, u_dst = u_pair // tp, u_pair % tp
        np.add.at(sent, (u_src, u_dst), 1)
        # position of each unique triple inside the receiver's buffer (ordered by source rank, then row)
        recv_order = np.lexsort((u_row, u_src, u_dst))
        pos_in_recv = np.empty(len(uniq), dtype=np.int64)
        start_dst = np.zeros(tp + 1, dtype=np.int64)
        np.add.at(start_dst, u_dst + 1, 1)
        start_dst = np.cumsum(start_dst)
        sorted_dst = u_dst[recv_order]
        pos_in_recv[recv_order] = np.arange(len(uniq)) - start_dst[sorted_dst]
        edge_pos = pos_in_recv[np.searchsorted(uniq, pair_key)]
        ranks: list[_RankPlan] = []
        for r in range(tp):
            m_send = u_src == r
            o = np.lexsort((u_row[m_send], u_dst[m_send]))  # grouped by destination, rows ascending
            send_cols = u_row[m_send][o] - r * w_s
            e = dst == r
            k_recv = int(sent[:, r].sum())
            er, ec, ev = edge_pos[e], cols[e] - r * w_t, vals[e]
            proj = torch.sparse_coo_tensor(
                torch.from_numpy(np.stack([er, ec])), torch.from_numpy(ev), (k_recv, w_t)
            ).coalesce()
            proj_t = torch.sparse_coo_tensor(
                torch.from_numpy(np.stack([ec, er])), torch.from_numpy(ev), (w_t, k_recv)
            ).coalesce()
            ranks.append(
                _RankPlan(
                    send_cols=torch.from_numpy(send_cols.astype(np.int64)),
                    send_splits=[int(x) for x in sent[r]],
                    recv_splits=[int(x) for x in sent[:, r]],
                    proj_t=proj_t.to_sparse_csr(),
                    proj=proj.to_sparse_csr(),
                )
            )
        return PKLPlan(tp, sp, tpd, shape[0], shape[1], teacher_perm, sent, ranks)

    # ---- queries ---------------------------------------------------------------------------------
    def rank_plan(self, rank: int, device: Any) -> _RankPlan:
        """This rank's part of the plan on ``device`` (moved once, then cached)."""
        key = (rank, str(device))
        if key not in self._device_cache:
            p = self.ranks[rank]
            self._device_cache[key] = _RankPlan(
                p.send_cols.to(device), p.send_splits, p.recv_splits, p.proj_t.to(device), p.proj.to(device)
            )
        return self._device_cache[key]

    def teacher_valid(self) -> np.ndarray:
        """bool ``[teacher_padded]`` in the (possibly permuted) column order: real teacher ids."""
        ids = np.arange(self.teacher_padded) if self.teacher_perm is None else self.teacher_perm
        return ids < self.teacher_vocab_size

    def map_teacher_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Original teacher token ids → column positions in the permuted logits."""
        if self.teacher_perm is None:
            return ids
        inv = np.empty(self.teacher_padded, dtype=np.int64)
        inv[self.teacher_perm] = np.arange(self.teacher_padded)
        return torch.from_numpy(inv).to(ids.device)[ids.long()]

    def values_sent_per_token(self) -> np.ndarray:
        """int64 ``[tp]``: student probabilities each rank sends to other ranks, per token (forward)."""
        off = self.sent.copy()
        np.fill_diagonal(off, 0)
        return off.sum(axis=1)
