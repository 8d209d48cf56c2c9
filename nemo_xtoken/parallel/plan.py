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

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["PKLPlan", "teacher_permutation", "projection_csr"]


def _is_learnable(obj: Any) -> bool:
    from nemo_xtoken.losses.learnable import LearnableProjection

    return isinstance(obj, LearnableProjection)


def projection_csr(projection: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """``(indptr, indices, data, (V_S, V_T))`` of W: a ``Projection``, a torch sparse CSR tensor or a ``LearnableProjection``."""
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
    if _is_learnable(projection):  # the pattern and the current weights
        rows = projection.rows.detach().cpu().numpy()
        counts = np.bincount(rows, minlength=projection.student_vocab_size)
        return (
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            projection.cols.detach().cpu().numpy().astype(np.int64),
            projection.weights().detach().float().cpu().numpy(),
            projection.shape,
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


def min_vertex_cover(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum vertex cover ``(row_ids, col_ids)`` of the bipartite graph with edges ``(rows[k], cols[k])``.

    Maximum matching (greedy start, then augmenting paths, iterative), then König's construction:
    from the unmatched rows, alternating reachability Z; cover = (rows ∖ Z) ∪ (cols ∩ Z).  Its
    size is the fewest values that let a receiver obtain every linked ``Σ_s p_S[s] W[s, t]``.
    """
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lu, li = np.unique(rows, return_inverse=True)
    ru, ri = np.unique(cols, return_inverse=True)
    nl, nr = lu.size, ru.size
    order = np.argsort(li, kind="stable")
    adj_ptr = np.concatenate([[0], np.cumsum(np.bincount(li, minlength=nl))])
    adj = ri[order].tolist()
    ptr = adj_ptr.tolist()
    match_l = [-1] * nl
    match_r = [-1] * nr
    for u in range(nl):  # greedy start
        for v in adj[ptr[u] : ptr[u + 1]]:
            if match_r[v] < 0:
                match_l[u], match_r[v] = v, u
                break
    for root in range(nl):  # augmenting paths (iterative DFS)
        if match_l[root] >= 0:
            continue
        seen = set()
        stack = [(root, ptr[root])]
        parent: dict[int, tuple[int, int]] = {}
        found = -1
        while stack and found < 0:
            u, k = stack[-1]
            if k >= ptr[u + 1]:
                stack.pop()
                continue
            stack[-1] = (u, k + 1)
            v = adj[k]
            if v in seen:
                continue
            seen.add(v)
            parent[v] = (u, 0)
            if match_r[v] < 0:
                found = v
            else:
                w = match_r[v]
                stack.append((w, ptr[w]))
        if found >= 0:
            v = found
            while True:
                u = parent[v][0]
                prev = match_l[u]
                match_l[u], match_r[v] = v, u
                if u == root:
                    break
                v = prev
    # König: alternating reachability from unmatched rows
    z_l = [False] * nl
    z_r = [False] * nr
    queue = [u for u in range(nl) if match_l[u] < 0]
    for u in queue:
        z_l[u] = True
    while queue:
        nxt = []
        for u in queue:
            for v in adj[ptr[u] : ptr[u + 1]]:
                if not z_r[v] and match_l[u] != v:
                    z_r[v] = True
                    w = match_r[v]
                    if w >= 0 and not z_l[w]:
                        z_l[w] = True
                        nxt.append(w)
        queue = nxt
    cover_l = lu[~np.asarray(z_l, dtype=bool)]
    cover_r = ru[np.asarray(z_r, dtype=bool)]
    return cover_l, cover_r


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A float32 torch sparse CSR matrix from COO triplets (duplicates summed)."""
    idx = torch.from_numpy(np.stack([rows.astype(np.int64), cols.astype(np.int64)]))
    coo = torch.sparse_coo_tensor(idx, torch.from_numpy(vals.astype(np.float32)), shape, check_invariants=False)
    return coo.coalesce().to_sparse_csr()


def _value_source(rows: np.ndarray, cols: np.ndarray, src: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """For the CSR :func:`_csr` builds from ``(rows, cols)``: the W non-zero each stored value comes from.

    ``src[k]`` is the index into W's non-zeros of triplet ``k`` (``-1``: a constant 1, a one-hot
    routing entry).  Returned in the CSR's value order (row-major, columns increasing), so that a
    learnable W's current weights fill the same matrix: ``where(src >= 0, w[src], 1)``.
    """
    key = rows.astype(np.int64) * max(shape[1], 1) + cols.astype(np.int64)
    order = np.argsort(key, kind="stable")
    if key.size and np.any(np.diff(key[order]) == 0):
        raise AssertionError("exchange plan: two W entries fell on one matrix position (a plan bug)")
    return src[order].astype(np.int64)


@dataclass
class _RankPlan:
    """One rank's part of the plan, as sparse matrices (``dense @ CSR`` on the device).

    ``p̃_S`` on this teacher shard = ``q @ local`` + ``recv @ recv_mat``, where ``recv``
    ``[n, K_recv]`` arrives by the all-to-all of every rank's ``q @ send_mat`` (columns grouped by
    destination; a one-hot column sends ``p_S[s]`` itself, a weighted one a partial sum).
    The ``*_t`` matrices are the transposes, for the backward.
    """

    local: torch.Tensor  # CSR [w_S, w_T]: W's block inside this rank
    local_t: torch.Tensor  # CSR [w_T, w_S]
    send_mat: torch.Tensor  # CSR [w_S, K_send]
    send_mat_t: torch.Tensor  # CSR [K_send, w_S]
    recv_mat: torch.Tensor  # CSR [K_recv, w_T]
    recv_mat_t: torch.Tensor  # CSR [w_T, K_recv]
    send_splits: list[int]
    recv_splits: list[int]
    send_cols: np.ndarray  # int64: local student columns sent as they are (introspection, tests)
    n_partial: int  # partial sums sent (introspection, tests)
    exchange: bool  # whether any rank sends anything: the all-to-all runs on all ranks or on none
    # index into W's non-zeros of each stored value (-1: a constant 1), per matrix, for a learnable W
    sources: dict = field(default_factory=dict, repr=False)

    def with_values(self, w: torch.Tensor) -> "_RankPlan":
        """The same plan with W's non-zeros replaced by ``w`` ``[nnz]`` (detached): a learnable W's current weights."""
        w = w.detach().float()
        mats = {}
        for name in ("local", "local_t", "send_mat", "send_mat_t", "recv_mat", "recv_mat_t"):
            m, src = getattr(self, name), self.sources[name]
            vals = torch.where(src >= 0, w[src.clamp(min=0)], torch.ones((), dtype=w.dtype, device=w.device))
            with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
                warnings.simplefilter("ignore", UserWarning)
                mats[name] = torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), vals, size=m.shape, check_invariants=False)
        return dataclasses.replace(self, **mats)


@dataclass
class PKLPlan:
    """Which student values each teacher shard needs, built once from W (see module doc).

    Between two ranks, every non-zero ``W[s, t]`` (``s`` on the sender, ``t`` on the receiver)
    is carried either by sending ``p_S[s]`` or by sending the sender's partial sum
    ``Σ_{s on sender} p_S[s] W[s, t]``; ``partial_sums=True`` (default) chooses the fewest values
    (a minimum vertex cover of that bipartite graph), so a teacher token that many student rows
    of one rank map to (a digit, a frequent piece) costs one value, not one per row.
    """

    tp: int
    student_padded: int
    teacher_padded: int
    student_vocab_size: int
    teacher_vocab_size: int
    teacher_perm: np.ndarray | None  # new position → original teacher id, or None
    sent: np.ndarray  # int64 [tp, tp]: values rank r sends to r' per token (diagonal = kept local)
    ranks: list[_RankPlan] = field(repr=False)
    nnz: int = 0  # W's stored non-zeros (the length of a learnable W's weight vector)
    learnable: Any = field(default=None, repr=False)  # the LearnableProjection the plan was built from, if any
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
        partial_sums: bool = True,
    ) -> "PKLPlan":
        """Build the exchange plan for ``tp`` ranks (``*_padded`` default to W's sizes).

        ``teacher_perm`` (from :func:`teacher_permutation`) says the teacher's logits columns are
        permuted: position ``j`` holds original teacher id ``teacher_perm[j]``.
        ``*_vocab_size``: the tokenizers' real sizes when W is a CSR tensor wider than them.
        ``partial_sums=False`` sends student columns only.
        """
        indptr, indices, data, wshape = projection_csr(projection)
        shape = (
            wshape[0] if student_vocab_size is None else int(student_vocab_size),
            wshape[1] if teacher_vocab_size is None else int(teacher_vocab_size),
        )
        if shape[0] > wshape[0] or shape[1] > wshape[1]:
            raise XTokenError(f"W has shape {wshape} but the tokenizers have {shape} ids: W was built for other tokenizers")
        rows = np.repeat(np.arange(wshape[0], dtype=np.int64), np.diff(indptr))
        if len(indices) and (int(rows.max()) >= shape[0] or int(indices.max()) >= shape[1]):
            raise XTokenError(f"W {wshape} has non-zeros beyond the real vocabulary sizes {shape}: it was built for other tokenizers")
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
        cols = np.asarray(indices, dtype=np.int64) if inv is None else inv[indices]
        keep = data != 0
        nz = np.nonzero(keep)[0]  # each edge's index among W's non-zeros (a learnable W's weights)
        rows, cols, vals = rows[keep], cols[keep], np.asarray(data, dtype=np.float32)[keep]
        src, dst = rows // w_s, cols // w_t
        pair = src * tp + dst
        order = np.argsort(pair, kind="stable")
        bounds = np.searchsorted(pair[order], np.arange(tp * tp + 1))
        # per pair: (A rows sent as columns, B teacher columns sent as partial sums, edge split)
        blocks: dict[tuple[int, int], tuple] = {}
        sent = np.zeros((tp, tp), dtype=np.int64)
        for r in range(tp):
            for r2 in range(tp):
                e = order[bounds[r * tp + r2] : bounds[r * tp + r2 + 1]]
                er, ec, ev, ek = rows[e], cols[e], vals[e], nz[e]
                if partial_sums and r != r2 and e.size:
                    a_rows, b_cols = min_vertex_cover(er, ec)
                else:
                    a_rows, b_cols = np.unique(er), np.zeros(0, np.int64)
                by_col = ~np.isin(er, a_rows)  # edges carried by a partial sum (their t is in B)
                blocks[(r, r2)] = (a_rows, b_cols, er, ec, ev, by_col, ek)
                sent[r, r2] = a_rows.size + b_cols.size
        ranks: list[_RankPlan] = []
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        for r in range(tp):
            # local block
            _, _, er, ec, ev, _, ek = blocks[(r, r)]
            local = _csr(er - r * w_s, ec - r * w_t, ev, (w_s, w_t))
            local_t = _csr(ec - r * w_t, er - r * w_s, ev, (w_t, w_s))
            sources = {
                "local": _value_source(er - r * w_s, ec - r * w_t, ek, (w_s, w_t)),
                "local_t": _value_source(ec - r * w_t, er - r * w_s, ek, (w_t, w_s)),
            }
            # sender side: per destination r2 ≠ r, columns [A rows one-hot][B partial sums]
            s_r, s_c, s_v, s_k, send_cols = [], [], [], [], []
            off, n_partial = 0, 0
            for r2 in range(tp):
                if r2 == r:
                    continue
                a_rows, b_cols, er, ec, ev, by_col, ek = blocks[(r, r2)]
                s_r.append(a_rows - r * w_s)
                s_c.append(off + np.arange(a_rows.size))
                s_v.append(np.ones(a_rows.size, np.float32))
                s_k.append(np.full(a_rows.size, -1, np.int64))
                s_r.append(er[by_col] - r * w_s)
                s_c.append(off + a_rows.size + np.searchsorted(b_cols, ec[by_col]))
                s_v.append(ev[by_col])
                s_k.append(ek[by_col])
                send_cols.append(a_rows - r * w_s)
                n_partial += b_cols.size
                off += a_rows.size + b_cols.size
            k_send = off
            sr, sc, sv, sk = cat(s_r, np.int64), cat(s_c, np.int64), cat(s_v, np.float32), cat(s_k, np.int64)
            sources["send_mat"] = _value_source(sr, sc, sk, (w_s, k_send))
            sources["send_mat_t"] = _value_source(sc, sr, sk, (k_send, w_s))
            # receiver side: from each source r0 ≠ r, rows [A_{r0,r}][B_{r0,r}]
            r_r, r_c, r_v, r_k = [], [], [], []
            base = 0
            for r0 in range(tp):
                if r0 == r:
                    continue
                a_rows, b_cols, er, ec, ev, by_col, ek = blocks[(r0, r)]
                direct = ~by_col
                r_r.append(base + np.searchsorted(a_rows, er[direct]))
                r_c.append(ec[direct] - r * w_t)
                r_v.append(ev[direct])
                r_k.append(ek[direct])
                r_r.append(base + a_rows.size + np.arange(b_cols.size))
                r_c.append(b_cols - r * w_t)
                r_v.append(np.ones(b_cols.size, dtype=np.float32))
                r_k.append(np.full(b_cols.size, -1, np.int64))
                base += a_rows.size + b_cols.size
            k_recv = base
            rr, rc, rv, rk = cat(r_r, np.int64), cat(r_c, np.int64), cat(r_v, np.float32), cat(r_k, np.int64)
            sources["recv_mat"] = _value_source(rr, rc, rk, (k_recv, w_t))
            sources["recv_mat_t"] = _value_source(rc, rr, rk, (w_t, k_recv))
            splits_s = [0 if r2 == r else int(sent[r, r2]) for r2 in range(tp)]
            splits_r = [0 if r0 == r else int(sent[r0, r]) for r0 in range(tp)]
            ranks.append(
                _RankPlan(
                    local=local, local_t=local_t,
                    send_mat=_csr(sr, sc, sv, (w_s, k_send)), send_mat_t=_csr(sc, sr, sv, (k_send, w_s)),
                    recv_mat=_csr(rr, rc, rv, (k_recv, w_t)), recv_mat_t=_csr(rc, rr, rv, (w_t, k_recv)),
                    send_splits=splits_s, recv_splits=splits_r,
                    send_cols=cat(send_cols, np.int64), n_partial=int(n_partial),
                    exchange=bool((sent * (1 - np.eye(tp, dtype=np.int64))).sum() > 0),
                    sources={k: torch.from_numpy(v) for k, v in sources.items()},
                )
            )
        plan = PKLPlan(tp, sp, tpd, shape[0], shape[1], teacher_perm, sent, ranks, nnz=int(len(indices)))
        if _is_learnable(projection):
            plan.learnable = projection
        return plan

    # ---- queries ---------------------------------------------------------------------------------
    def rank_plan(self, rank: int, device: Any) -> _RankPlan:
        """This rank's part of the plan on ``device`` (moved once, then cached)."""
        key = (rank, str(device))
        if key not in self._device_cache:
            p = self.ranks[rank]
            self._device_cache[key] = _RankPlan(
                p.local.to(device), p.local_t.to(device), p.send_mat.to(device), p.send_mat_t.to(device),
                p.recv_mat.to(device), p.recv_mat_t.to(device), p.send_splits, p.recv_splits, p.send_cols, p.n_partial,
                p.exchange, {k: v.to(device) for k, v in p.sources.items()},
            )
        return self._device_cache[key]

    def teacher_valid(self) -> np.ndarray:
        """bool ``[teacher_padded]`` in the (possibly permuted) column order: real teacher ids (computed once)."""
        if "teacher_valid" not in self._device_cache:
            ids = np.arange(self.teacher_padded) if self.teacher_perm is None else self.teacher_perm
            self._device_cache["teacher_valid"] = ids < self.teacher_vocab_size
        return self._device_cache["teacher_valid"]

    def map_teacher_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Original teacher token ids → column positions in the permuted logits."""
        if self.teacher_perm is None:
            return ids
        key = ("teacher_inverse", str(ids.device))
        if key not in self._device_cache:  # inverted and moved once per device, not every step
            inv = np.empty(self.teacher_padded, dtype=np.int64)
            inv[self.teacher_perm] = np.arange(self.teacher_padded)
            self._device_cache[key] = torch.from_numpy(inv).to(ids.device)
        return self._device_cache[key][ids.long()]

    def values_sent_per_token(self) -> np.ndarray:
        """int64 ``[tp]``: values (student probabilities or partial sums) each rank sends to others, per token."""
        off = self.sent.copy()
        np.fill_diagonal(off, 0)
        return off.sum(axis=1)
