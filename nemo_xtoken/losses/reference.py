"""Single-device reference losses: KL, P-KL, ULD, GOLD and H-KL (the specification).

Every loss compares, item by item, a student distribution ``p_S`` with a teacher distribution
``p_T``.  An *item* is a position (no alignment: student position ``i`` against teacher position
``i``) or an aligned chunk (per-position log-softmax, then :func:`merge_log_probs` on each side).

Common conventions (see README.md, section "Losses"):

- logits ``[N, V']`` or ``[B, S, V']`` (flattened to ``[B*S, V']``); columns at or beyond the
  real vocabulary size are *padded columns* (Megatron pads the output layer) and get probability
  exactly zero: they are set to ``-inf`` before the softmax;
- ``temperature`` divides both sides' logits; no ``T²`` factor unless
  ``scale_by_temperature_squared``;
- ``reduction``: ``"none"`` one value per item (0 where not counted), ``"sum"`` over counted
  items, ``"mean"`` the sum over the number counted, exactly 0 with zero gradients when nothing
  counts;
- computation in float32 at least (bf16/fp16 inputs are upcast), float64 kept.

The floor (P-KL, H-KL's grouped probabilities): the value uses ``log max(q, EPS)``, the gradient
is that of ``log(q + grad_floor(dtype))`` (:func:`floored_log`): the floor bounds the value only,
so a student far below it still learns.

Memory: nothing of size ``N × V_S × V_T`` and no dense W; W enters only through its non-zeros
(``index_select`` / ``index_add`` over its ``nnz`` triplets).  ``block_size=n`` (every loss)
computes the same loss ``n`` positions at a time with recomputation in the backward
(:mod:`nemo_xtoken.losses.blocked`): then only one block's ``[n, V]`` intermediates are alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from nemo_xtoken.align.merge import MERGES, AlignedPositions, merge_log_probs, side_modes
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.sparse import dense_teacher
from nemo_xtoken.vocab.projection import ROW_EXACT, Projection

__all__ = [
    "EPS",
    "REDUCTIONS",
    "REFERENCE_EPS",
    "grad_floor",
    "floored_log",
    "renormalized_log",
    "ProjectionLike",
    "SparseW",
    "CommonSet",
    "resolve_projection",
    "exact_common_set",
    "top1_common_set",
    "reference_common_set",
    "choose_common_set",
    "teacher_top_k_columns",
    "COMMON_SETS",
    "ULD_TAILS",
    "REFERENCE_UNCOMMON_TOP_K",
    "REFERENCE_COMMON_THRESHOLD",
    "kl",
    "p_kl",
    "uld",
    "gold",
    "h_kl",
    "LOSSES",
    "NEEDS_PROJECTION",
]

EPS = 1e-12  # floor of the projected / grouped student probability inside log (P-KL, H-KL): value only
REDUCTIONS = ("mean", "sum", "none")
_GRAD_FLOOR = {torch.float64: 1e-300}
#: The rank-sorted L1's tail (ULD, and GOLD/H-KL's uncommon part): ``pad`` zero-pads the shorter sorted
#: side (ours, TRL GOLD), ``truncate`` cuts both sides to the shorter length and to ``uld_top_k``
#: entries (NeMo-RL's gold path).  See docs/losses.md, "Options that follow the reference code".
ULD_TAILS = ("pad", "truncate")
REFERENCE_UNCOMMON_TOP_K = 8192  # NeMo-RL's default ``uncommon_topk``
#: H-KL's common set: ``top1`` (ours: every non-empty row's top-1, rows sharing a token summed) or
#: ``reference`` (NeMo-RL's relaxed exact map: top weight >= 0.6, one student row per teacher token).
COMMON_SETS = ("top1", "reference")
REFERENCE_COMMON_THRESHOLD = 0.6


def grad_floor(dtype: torch.dtype) -> float:
    """``δ`` in the gradient ``1/(q + δ)`` of a floored log: 1e-30 in float32, 1e-300 in float64.

    Far below the value floor ``EPS``, far enough above the dtype's smallest normal number that
    ``g/(q + δ)`` cannot overflow for any ``|g| < 1e8`` (W's rows sum to at most 1).
    """
    return _GRAD_FLOOR.get(dtype, 1e-30)


def floored_log(q: torch.Tensor, eps: float = EPS, *, additive: bool = False) -> torch.Tensor:
    """``log max(q, eps)`` as the value, the gradient of ``log(q + δ)``: the floor bounds the value only.

    A plain ``log(q.clamp(min=eps))`` has zero gradient wherever ``q < eps``: a student whose
    projected probability starts below the floor would never move (issue 12).  Here the gradient
    is exactly that of ``log q`` wherever ``q ≫ δ = grad_floor(q.dtype)``.  ``additive=True``: the
    value is ``log(q + eps)`` instead (the public reference code's form, ``merge="reference"``).
    """
    grad_path = torch.log(q + grad_floor(q.dtype))
    value = torch.log(q + eps) if additive else torch.log(q.clamp(min=eps))
    return grad_path + (value - grad_path).detach()


REFERENCE_EPS = 1e-10  # the public reference code's additive epsilon (merge="reference", P-KL)


def renormalized_log(q: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``merge="reference"``'s student side after the projection, as published: ``log(q/(Σq + ε) + ε)``, ε = 1e-10.

    ``total`` is ``Σ_t q[t]`` per item ``[K, 1]`` (on vocab shards: the all-reduced sum).  The
    value is the published one; the gradient through the log is that of ``log`` itself
    (:func:`floored_log`), so the public form's floor too bounds the value only.
    """
    return floored_log(q / (total + REFERENCE_EPS), REFERENCE_EPS, additive=True)


ProjectionLike = Union[Projection, torch.Tensor, "SparseW", "LearnableProjection"]  # noqa: F821 (see learnable.py)


# ---- W as triplets -------------------------------------------------------------------------------


@dataclass
class SparseW:
    """W ``[V_S, V_T]`` as its non-zeros: ``W[rows[k], cols[k]] = values[k]`` (values may carry grad).

    ``exact_rows[s]`` marks the student rows that count as exact matches for GOLD's common set
    (``row_kind == ROW_EXACT`` for a :class:`Projection`; a single weight-1 entry otherwise).
    Every loss accepts a ``SparseW`` as its ``projection``: resolve W once (on the training device)
    and the conversion and the common sets (cached here) are not recomputed per step.
    """

    rows: torch.Tensor  # int64 [nnz]
    cols: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float [nnz]
    student_vocab_size: int
    teacher_vocab_size: int
    exact_rows: torch.Tensor  # bool [V_S]
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def frozen(self) -> bool:
        """Whether W is fixed (no gradient into its values), so derived sets may be cached."""
        return not self.values.requires_grad

    @property
    def shape(self) -> tuple[int, int]:
        return (self.student_vocab_size, self.teacher_vocab_size)

    def top1(self) -> torch.Tensor:
        """Each row's highest-weight teacher id (ties: lowest id), ``-1`` for empty rows (int64 [V_S])."""
        if self.frozen and "top1" in self.cache:
            return self.cache["top1"]
        rows = self.rows.cpu().numpy()
        cols = self.cols.cpu().numpy()
        vals = self.values.detach().double().cpu().numpy()
        out = np.full(self.student_vocab_size, -1, dtype=np.int64)
        if rows.size:
            order = np.lexsort((cols, -vals, rows))
            r = rows[order]
            first = np.ones(r.size, dtype=bool)
            first[1:] = r[1:] != r[:-1]
            out[r[first]] = cols[order][first]
        top1 = torch.from_numpy(out).to(self.rows.device)
        if self.frozen:
            self.cache["top1"] = top1
        return top1


def _is_learnable(obj: Any) -> bool:
    from nemo_xtoken.losses.learnable import LearnableProjection

    return isinstance(obj, LearnableProjection)


def resolve_projection(
    projection: ProjectionLike,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> SparseW:
    """Turn a :class:`Projection`, a torch sparse CSR tensor or a :class:`LearnableProjection` into triplets.

    ``student_vocab_size``/``teacher_vocab_size`` (the tokenizers' real sizes) are checked against
    W when given: a W built for other tokenizers is refused.  For a CSR tensor wider than the real
    sizes (built with ``to_torch(student_padded=…)``) they give the real sizes.
    """
    if isinstance(projection, SparseW):
        _check_sizes(*projection.shape, student_vocab_size, teacher_vocab_size)
        return projection if device is None else _to_device(projection, torch.device(device))
    if isinstance(projection, Projection):
        v_s, v_t = projection.shape
        counts = np.diff(projection.indptr)
        rows = torch.from_numpy(np.repeat(np.arange(v_s, dtype=np.int64), counts))
        cols = torch.from_numpy(projection.indices.astype(np.int64))
        values = torch.from_numpy(projection.data.astype(np.float32))
        exact = torch.from_numpy(projection.row_kind == ROW_EXACT)
        _check_sizes(v_s, v_t, student_vocab_size, teacher_vocab_size)
    elif _is_learnable(projection):
        v_s, v_t = projection.shape
        rows, cols, values, exact = projection.rows, projection.cols, projection.weights(), projection.exact_rows
        _check_sizes(v_s, v_t, student_vocab_size, teacher_vocab_size)
    elif isinstance(projection, torch.Tensor) and projection.layout == torch.sparse_csr:
        if projection.dim() != 2:
            raise XTokenError(f"projection: a sparse CSR W must be 2-D [V_S, V_T], got shape {tuple(projection.shape)}")
        crow = projection.crow_indices().long()
        cols = projection.col_indices().long()
        values = projection.values()
        full_s, full_t = int(projection.shape[0]), int(projection.shape[1])
        rows = torch.repeat_interleave(torch.arange(full_s, device=crow.device), crow[1:] - crow[:-1])
        v_s = full_s if student_vocab_size is None else int(student_vocab_size)
        v_t = full_t if teacher_vocab_size is None else int(teacher_vocab_size)
        if v_s > full_s or v_t > full_t:
            raise XTokenError(
                f"projection: W has shape {(full_s, full_t)} but the tokenizers have ({v_s}, {v_t}) ids: "
                "this W was built for other tokenizers; rebuild it with `xtoken build-projection`"
            )
        if rows.numel() and (bool((rows >= v_s).any()) or bool((cols >= v_t).any())):
            raise XTokenError(
                f"projection: W {(full_s, full_t)} has non-zeros beyond the real vocabulary sizes ({v_s}, {v_t}): "
                "it was built for other tokenizers"
            )
        counts = torch.zeros(full_s, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
        row_sum = torch.zeros(full_s, dtype=values.dtype, device=rows.device).index_add_(0, rows, values.detach())
        exact = ((counts == 1) & (row_sum == 1))[:v_s]
    else:
        raise XTokenError(
            f"projection must be a nemo_xtoken.vocab.Projection, a torch sparse CSR tensor [V_S, V_T] or a "
            f"LearnableProjection; got {type(projection).__name__}"
            + (f" with layout {projection.layout}" if isinstance(projection, torch.Tensor) else "")
        )
    w = SparseW(rows.long(), cols.long(), values, int(v_s), int(v_t), exact.bool())
    if device is not None:
        w = SparseW(w.rows.to(device), w.cols.to(device), w.values.to(device), w.student_vocab_size, w.teacher_vocab_size, w.exact_rows.to(device))
    return w


def _check_sizes(v_s: int, v_t: int, want_s: int | None, want_t: int | None) -> None:
    """Refuse a W whose shape is not the tokenizers' real vocabulary sizes (when those are given)."""
    bad = [
        f"{side} tokenizer has {want} ids, W has {have} {'rows' if side == 'student' else 'columns'}"
        for side, want, have in (("student", want_s, v_s), ("teacher", want_t, v_t))
        if want is not None and int(want) != have
    ]
    if bad:
        raise XTokenError(
            f"projection: W {(v_s, v_t)} was built for other tokenizers ({'; '.join(bad)}): "
            "rebuild it with `xtoken build-projection` for this pair"
        )


@dataclass
class CommonSet:
    """Common pairs of a hybrid loss.

    ``teacher_ids [m]`` are distinct teacher tokens; ``student_ids [n]`` with ``group [n]`` (in
    ``0..m-1``) say which student rows feed which teacher token (GOLD: one row each; H-KL: all
    rows whose top-1 is that token, their probabilities summed).
    """

    student_ids: torch.Tensor  # int64 [n]
    group: torch.Tensor  # int64 [n]
    teacher_ids: torch.Tensor  # int64 [m]

    @property
    def one_to_one(self) -> bool:
        """Whether student row ``k`` pairs with teacher token ``k`` (no summing needed)."""
        return self.student_ids.numel() == self.teacher_ids.numel() and bool(
            (self.group == torch.arange(self.group.numel(), device=self.group.device)).all()
        )


def exact_common_set(w: SparseW) -> CommonSet:
    """GOLD's strict common set: exact rows ``(s, top1[s])``; several rows on one ``t`` keep the lowest ``s``."""
    if w.frozen and "exact_common_set" in w.cache:
        return w.cache["exact_common_set"]
    top1 = w.top1()
    s = torch.nonzero(w.exact_rows & (top1 >= 0), as_tuple=True)[0]
    t = top1[s]
    sn, tn = s.cpu().numpy(), t.cpu().numpy()
    order = np.lexsort((sn, tn))
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = tn[order][1:] != tn[order][:-1]
    sel = order[keep]
    sel = sel[np.argsort(sn[sel], kind="stable")]
    dev = w.rows.device
    out = CommonSet(
        torch.from_numpy(sn[sel]).to(dev), torch.arange(sel.size, device=dev), torch.from_numpy(tn[sel]).to(dev)
    )
    if w.frozen:
        w.cache["exact_common_set"] = out
    return out


def top1_common_set(w: SparseW) -> CommonSet:
    """H-KL's relaxed common set: every non-empty student row with its top-1 teacher token."""
    if w.frozen and "top1_common_set" in w.cache:
        return w.cache["top1_common_set"]
    top1 = w.top1()
    s = torch.nonzero(top1 >= 0, as_tuple=True)[0]
    t = top1[s]
    uniq, group = torch.unique(t, sorted=True, return_inverse=True)
    out = CommonSet(s, group, uniq)
    if w.frozen:
        w.cache["top1_common_set"] = out
    return out


def reference_common_set(w: SparseW, threshold: float = REFERENCE_COMMON_THRESHOLD) -> CommonSet:
    """NeMo-RL's relaxed exact map (``build_exact_token_map(xtoken_loss=True)``): one student row per teacher token.

    A row ``s`` is a candidate when its top weight ``max_t W[s, t] >= threshold`` (0.6); its pair is
    ``(s, top1[s])``.  Several candidates on one teacher token: the highest top weight wins, ties
    the lowest ``s``.  The other candidates' rows are not common (their mass goes to the sorted L1).
    """
    key = f"reference_common_set_{threshold!r}"
    if w.frozen and key in w.cache:
        return w.cache[key]
    top1 = w.top1().cpu().numpy()
    rows = w.rows.cpu().numpy()
    vals = w.values.detach().cpu().numpy()
    topv = np.full(w.student_vocab_size, -np.inf, dtype=vals.dtype if vals.size else np.float32)
    if rows.size:
        np.maximum.at(topv, rows, vals)
    s = np.nonzero((top1 >= 0) & (topv >= threshold))[0]
    t, v = top1[s], topv[s]
    order = np.lexsort((s, -v.astype(np.float64), t))  # per teacher token: highest weight, then lowest row
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = t[order][1:] != t[order][:-1]
    sel = order[keep]
    sel = sel[np.argsort(s[sel], kind="stable")]  # paired arrays sorted by student row (as NeMo-RL)
    dev = w.rows.device
    out = CommonSet(
        torch.from_numpy(s[sel].astype(np.int64)).to(dev), torch.arange(sel.size, device=dev),
        torch.from_numpy(t[sel].astype(np.int64)).to(dev),
    )
    if w.frozen:
        w.cache[key] = out
    return out


def choose_common_set(w: SparseW, relaxed: bool, common_set: str = "top1") -> CommonSet:
    """The common set of GOLD (``relaxed=False``: the strict exact set) or H-KL (``common_set`` of :data:`COMMON_SETS`)."""
    if common_set not in COMMON_SETS:
        raise XTokenError(f"common_set must be one of {list(COMMON_SETS)} (config distill.common_set), got {common_set!r}")
    if not relaxed:
        if common_set != "top1":
            raise XTokenError(
                "common_set applies to H-KL only: GOLD keeps its strict exact-match common set (use loss h_kl with common_set='reference')"
            )
        return exact_common_set(w)
    return top1_common_set(w) if common_set == "top1" else reference_common_set(w)


def check_uld_tail(uld_tail: str, uld_top_k: int) -> None:
    """Refuse a bad ``uld_tail`` / ``uld_top_k`` with one line naming the config key."""
    if uld_tail not in ULD_TAILS:
        raise XTokenError(f"uld_tail must be one of {list(ULD_TAILS)} (config distill.uld_tail), got {uld_tail!r}")
    if isinstance(uld_top_k, bool) or not isinstance(uld_top_k, (int, np.integer)) or uld_top_k < 1:
        raise XTokenError(f"uld_top_k must be an integer >= 1 (config distill.uld_top_k; NeMo-RL's default 8192), got {uld_top_k!r}")


def teacher_top_k_columns(importance: torch.Tensor, k: int) -> torch.Tensor:
    """NeMo-RL's P-KL teacher subset: the ``k`` teacher ids of highest importance (bool ``[V_T]``).

    ``importance[t]`` is the teacher's largest logit on id ``t`` over every position handed to the
    loss (``select_teacher_topk_indices``).  Ties: the lowest ids first (a stable order, so the
    vocab-parallel path picks the same set).  ``k >= V_T``: every id.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise XTokenError(f"teacher_top_k must be an integer >= 1 (config distill.teacher_top_k; NeMo-RL's default 8192), got {k!r}")
    imp = importance.detach().double().cpu().numpy()
    keep = np.zeros(imp.size, dtype=bool)
    keep[np.argsort(-imp, kind="stable")[: int(k)]] = True
    return torch.from_numpy(keep).to(importance.device)


# ---- input checks and per-item log-distributions ---------------------------------------------------


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise XTokenError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    if x.dim() != 2:
        raise XTokenError(f"{name} must be [N, V] or [B, S, V]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise XTokenError(f"{name} must be a floating-point tensor; got {x.dtype} with shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        row = int(torch.nonzero(bad.any(dim=1), as_tuple=True)[0][0])
        raise XTokenError(
            f"{name} {tuple(x.shape)} holds {n_bad} NaN/inf value(s) (first in row {row}): "
            "check the model's forward (overflow in bf16/fp16?) before computing the loss"
        )
    return x


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _log_probs(logits: torch.Tensor, real: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Log-softmax over the real columns ``[N, real]``: padded columns (``>= real``) have probability 0
    and are left out (their gradient is exactly 0)."""
    x = logits[:, :real].to(dtype) / temperature
    return torch.log_softmax(x, dim=-1)


def _check_common(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    v_s: int,
    v_t: int,
    alignment: AlignedPositions | None,
    mask: torch.Tensor | None,
    merge: str,
    temperature: float,
    reduction: str,
    w_shape: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    s = _as_2d(student_logits, "student_logits")
    t = _as_2d(teacher_logits, "teacher_logits")
    if reduction not in REDUCTIONS:
        raise XTokenError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if merge not in MERGES:
        raise XTokenError(f"merge must be one of {MERGES}, got {merge!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and np.isfinite(temperature)):
        raise XTokenError(f"temperature must be a positive finite number, got {temperature!r}")
    what = f"W {w_shape}" if w_shape is not None else "the vocabulary size"
    if s.shape[1] < v_s or v_s <= 0:
        raise XTokenError(
            f"student_logits {tuple(s.shape)} are narrower than {what}: the student vocabulary has {v_s} ids; "
            "pass the full (unsharded) logits, or a W built for this student tokenizer"
        )
    if t.shape[1] < v_t or v_t <= 0:
        raise XTokenError(
            f"teacher_logits {tuple(t.shape)} are narrower than {what}: the teacher vocabulary has {v_t} ids; "
            "pass the full (unsharded) logits, or a W built for this teacher tokenizer"
        )
    m = None
    if alignment is None:
        if s.shape[0] != t.shape[0]:
            raise XTokenError(
                f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} have different numbers of "
                "positions: without an alignment position i is compared with position i; pass alignment="
            )
        if mask is not None:
            m = mask.reshape(-1)
            if m.shape[0] != s.shape[0]:
                raise XTokenError(f"mask {tuple(mask.shape)} does not match {s.shape[0]} positions of student_logits {tuple(s.shape)}")
            m = m.bool()
    else:
        if mask is not None:
            raise XTokenError(
                "mask cannot be combined with alignment: put the loss mask into the alignment "
                "(positions_from_token_chunks(..., student_loss_mask=...))"
            )
        _check_alignment(alignment, s.shape[0], t.shape[0], v_s, v_t)
    return s, t, m


def _check_alignment(a: AlignedPositions, n_s: int, n_t: int, v_s: int, v_t: int) -> None:
    for side, ids, tg, n, v in (
        ("student", a.student_chunk_ids, a.student_targets, n_s, v_s),
        ("teacher", a.teacher_chunk_ids, a.teacher_targets, n_t, v_t),
    ):
        if ids.shape != (n,) or tg.shape != (n,):
            raise XTokenError(
                f"alignment.{side}_chunk_ids {tuple(ids.shape)} / {side}_targets {tuple(tg.shape)} do not match the "
                f"{n} positions of {side}_logits: build the alignment for these sequences"
            )
        used = ids >= 0
        if bool((ids[used] >= a.n_chunks).any()):
            raise XTokenError(f"alignment.{side}_chunk_ids hold ids >= n_chunks = {a.n_chunks}")
        if bool(((tg[used] < 0) | (tg[used] >= v)).any()):
            raise XTokenError(
                f"alignment.{side}_targets hold token ids outside [0, {v}) at positions inside chunks: "
                f"the {side} tokenizer has {v} ids"
            )


def _items(
    ls: torch.Tensor,
    lt: torch.Tensor,
    alignment: AlignedPositions | None,
    mask: torch.Tensor | None,
    merge: str,
    v_s: int,
    v_t: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item log-distributions over the real columns ``[K, V_S]``, ``[K, V_T]`` and which items count.

    Each side is merged with its mode of ``merge`` (:func:`~nemo_xtoken.align.merge.side_modes`;
    the teacher's chain merge normalized).  Padded columns (probability exactly 0) are dropped
    before merging, and rows of items that do not count are replaced by zeros (finite,
    gradient-free), so that no ``-inf - -inf`` or ``0 · ∞`` ever reaches the loss or its backward.
    """
    ls, lt = ls[:, :v_s], lt[:, :v_t]
    if alignment is None:
        counted = torch.ones(ls.shape[0], dtype=torch.bool, device=ls.device) if mask is None else mask.to(ls.device)
    else:
        a = alignment.to(ls.device)
        s_mode, t_mode = side_modes(merge)

        def side(lp: torch.Tensor, ids: torch.Tensor, tg: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
            tgt_lp = None
            if mode == "chain" and not normalize:
                safe = torch.where(ids >= 0, tg, torch.zeros_like(tg)).long()
                tgt_lp = lp.gather(1, safe.unsqueeze(1)).squeeze(1) if lp.shape[0] else lp.new_zeros(0)
            return merge_log_probs(lp, ids.long(), a.n_chunks, mode=mode, target_log_probs=tgt_lp, normalize=normalize)

        ls = side(ls, a.student_chunk_ids, a.student_targets, s_mode, False)
        lt = side(lt, a.teacher_chunk_ids, a.teacher_targets, t_mode, True)
        counted = a.chunk_mask()
    c = counted.unsqueeze(1)
    ls = torch.where(c, ls, torch.zeros((), dtype=ls.dtype, device=ls.device))
    lt = torch.where(c, lt, torch.zeros((), dtype=lt.dtype, device=lt.device))
    return ls, lt, counted


def _reduce(values: torch.Tensor, counted: torch.Tensor, reduction: str, scale: float) -> torch.Tensor:
    values = torch.where(counted, values * scale, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1).to(values.dtype)


def _xent_terms(lt: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-item ``Σ_v p_T[v] (log p_T[v] - log_q[v])``; columns with ``p_T[v] = 0`` contribute exactly 0."""
    live = torch.isfinite(lt) & (lt > float("-inf"))
    zero = torch.zeros((), dtype=lt.dtype, device=lt.device)
    a = torch.where(live, lt, zero)
    b = torch.where(live, log_q, zero)
    pt = torch.where(live, torch.exp(a), zero)
    return torch.where(live, pt * (a - b), zero).sum(dim=1)


def _sorted_l1(ps: torch.Tensor, pt: torch.Tensor, tail: str = "pad", top_k: int = REFERENCE_UNCOMMON_TOP_K) -> torch.Tensor:
    """Per-item ``Σ_i |sort↓(ps)_i - sort↓(pt)_i|``.

    ``tail="pad"`` (ULD, TRL GOLD): the shorter side zero-padded.  ``tail="truncate"`` (NeMo-RL's
    gold path): both sorted sides cut to ``min(width_S, width_T, top_k)`` entries.
    """
    width = max(ps.shape[1], pt.shape[1])
    if tail == "truncate":
        width = min(ps.shape[1], pt.shape[1], int(top_k))
    if width == 0:
        return ps.new_zeros(ps.shape[0])
    a = torch.sort(ps, dim=1, descending=True).values[:, :width]
    b = torch.sort(pt, dim=1, descending=True).values[:, :width]
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]))
    return (a - b).abs().sum(dim=1)


# ---- the losses -------------------------------------------------------------------------------------


def kl(
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
) -> torch.Tensor:
    """Same-tokenizer KL(p_T ‖ p_S) per item: ``Σ_v p_T[v] (log p_T[v] - log p_S[v])``.

    The real vocabulary sizes (None: the logits' widths) must be equal; the two sides may be padded
    to different widths.
    """
    teacher_logits = dense_teacher(teacher_logits)  # a cached SparseTeacher → dense log-probabilities
    if block_size is not None:
        return _blocked(kl, student_logits, teacher_logits, None, block_size, alignment, mask, reduction,
                        dict(student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size),
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared)
    v_s = int(student_vocab_size) if student_vocab_size is not None else _width(student_logits)
    v_t = int(teacher_vocab_size) if teacher_vocab_size is not None else _width(teacher_logits)
    s, t, m = _check_common(student_logits, teacher_logits, v_s, v_t, alignment, mask, merge, temperature, reduction, None)
    if v_s != v_t:
        raise XTokenError(
            f"kl needs one tokenizer on both sides: the student has {v_s} ids (student_logits {tuple(s.shape)}), "
            f"the teacher {v_t} (teacher_logits {tuple(t.shape)}); use p_kl, h_kl, gold or uld across tokenizers"
        )
    dt = _compute_dtype(s, t)
    ls, lt, counted = _items(_log_probs(s, v_s, temperature, dt), _log_probs(t, v_t, temperature, dt), alignment, m, merge, v_s, v_t)
    values = _xent_terms(lt[:, :v_t], ls[:, :v_s])
    return _reduce(values, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _blocked(
    fn: Any,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: ProjectionLike | None,
    block_size: int,
    alignment: AlignedPositions | None,
    mask: torch.Tensor | None,
    reduction: str,
    sizes: dict,
    **kw: Any,
) -> torch.Tensor:
    """``fn`` computed block by block of items (:mod:`nemo_xtoken.losses.blocked`): same value and gradients.

    W is resolved once (on the logits' device); a learnable W's weights enter every block as a
    differentiable input, so its gradient is the unblocked one.
    """
    from nemo_xtoken.losses.blocked import run_blocked

    if projection is None:
        def call(s, t, a, m, red, params):
            return fn(s, t, alignment=a, mask=m, reduction=red, **sizes, **kw)

        return run_blocked(call, student_logits, teacher_logits, (), block_size=block_size, alignment=alignment, mask=mask, reduction=reduction)
    device = student_logits.device if isinstance(student_logits, torch.Tensor) else None
    w = resolve_projection(projection, **sizes, device=device)
    learn = w.values.requires_grad

    def call(s, t, a, m, red, params):
        wb = SparseW(w.rows, w.cols, params[0], w.student_vocab_size, w.teacher_vocab_size, w.exact_rows) if learn else w
        return fn(s, t, wb, alignment=a, mask=m, reduction=red, **kw)

    return run_blocked(
        call, student_logits, teacher_logits, (w.values,) if learn else (), block_size=block_size, alignment=alignment, mask=mask, reduction=reduction
    )


def _width(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise XTokenError(f"logits must be a torch.Tensor [N, V] or [B, S, V]; got {type(x).__name__}")
    return int(x.shape[-1])


def _project(ps: torch.Tensor, w: SparseW) -> torch.Tensor:
    """``p̃_S = Wᵀ p_S`` per item (``[K, V_S] → [K, V_T]``) from W's non-zeros, never a dense W."""
    vals = w.values.to(ps.dtype)
    contrib = ps.index_select(1, w.rows) * vals
    out = ps.new_zeros(ps.shape[0], w.teacher_vocab_size)
    return out.index_add(1, w.cols, contrib)


def p_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: ProjectionLike,
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
    teacher_top_k: int | None = None,
    _teacher_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """P-KL: ``KL(p_T ‖ Wᵀ p_S)``, the student's probabilities carried onto the teacher's vocabulary.

    Terms with ``p_T[t] = 0`` contribute 0; the log is taken of ``max(p̃_S, EPS)`` in value
    (``EPS = 1e-12``) with the gradient of ``log p̃_S`` (:func:`floored_log`: the floor bounds the
    value only).  Student mass on empty W rows projects nowhere: it is lost, not renormalized —
    except with ``merge="reference"``, which renormalizes the projected chunk distribution as the
    public reference code does (:func:`renormalized_log`, its ε = 1e-10 included).  ``projection`` may be a
    :class:`~nemo_xtoken.losses.learnable.LearnableProjection` (its gradient flows into W).

    ``teacher_top_k=k`` (NeMo-RL's ``vocab_topk``): the teacher is restricted to the ``k`` ids of
    :func:`teacher_top_k_columns` (its largest logit over every position passed here) and
    renormalized over them; the projected student is read on those ids only (renormalized over
    them with ``merge="reference"``, as NeMo-RL; otherwise its mass elsewhere is lost, as above).
    """
    if teacher_top_k is not None:
        if not isinstance(teacher_logits, torch.Tensor):
            raise XTokenError(
                "teacher_top_k applies to a live teacher's logits: a cached teacher keeps its own top-k per position "
                "(xtoken cache-teacher --top-k); remove teacher_top_k for it"
            )
        w0 = resolve_projection(projection, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
        t2 = _as_2d(teacher_logits, "teacher_logits")
        if t2.shape[1] < w0.teacher_vocab_size:
            raise XTokenError(f"teacher_logits {tuple(t2.shape)} are narrower than W {w0.shape}: pass the full (unsharded) logits")
        imp = t2[:, : w0.teacher_vocab_size].detach().max(dim=0).values if t2.shape[0] else t2.new_full((w0.teacher_vocab_size,), float("-inf"))
        _teacher_columns = teacher_top_k_columns(imp, teacher_top_k)
    teacher_logits = dense_teacher(teacher_logits)
    if block_size is not None:
        return _blocked(p_kl, student_logits, teacher_logits, projection, block_size, alignment, mask, reduction,
                        dict(student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size),
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared,
                        _teacher_columns=_teacher_columns)
    w = resolve_projection(projection, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
    s, t, m = _check_common(student_logits, teacher_logits, w.student_vocab_size, w.teacher_vocab_size, alignment, mask, merge, temperature, reduction, w.shape)
    dt = _compute_dtype(s, t)
    w = _to_device(w, s.device)
    if _teacher_columns is not None:  # the teacher renormalized over its top-k ids (the rest: probability 0)
        t = t[:, : w.teacher_vocab_size].masked_fill(~_teacher_columns.to(t.device), float("-inf"))
    ls, lt, counted = _items(
        _log_probs(s, w.student_vocab_size, temperature, dt), _log_probs(t, w.teacher_vocab_size, temperature, dt), alignment, m, merge,
        w.student_vocab_size, w.teacher_vocab_size,
    )
    q = _project(torch.exp(ls[:, : w.student_vocab_size]), w)
    if alignment is not None and merge == "reference":  # projected, averaged, renormalized (public code)
        on = q if _teacher_columns is None else q.masked_fill(~_teacher_columns.to(q.device), 0.0)  # over the top-k ids
        log_q = renormalized_log(q, on.sum(dim=1, keepdim=True))
    else:
        log_q = floored_log(q)
    values = _xent_terms(lt[:, : w.teacher_vocab_size], log_q)
    return _reduce(values, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _to_device(w: SparseW, device: torch.device) -> SparseW:
    here = w.rows.device
    if here.type == device.type and (device.index is None or here.index == device.index):
        return w
    return SparseW(w.rows.to(device), w.cols.to(device), w.values.to(device), w.student_vocab_size, w.teacher_vocab_size, w.exact_rows.to(device))


def uld(
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
    uld_tail: str = "pad",
    uld_top_k: int = REFERENCE_UNCOMMON_TOP_K,
) -> torch.Tensor:
    """ULD (Boizard et al.): ``Σ_i |sort↓(p_S)_i - sort↓(p_T)_i|``, the shorter vocabulary zero-padded.

    ``uld_tail="truncate"``: both sorted sides cut to ``min(V_S, V_T, uld_top_k)`` instead (NeMo-RL).
    """
    teacher_logits = dense_teacher(teacher_logits)
    check_uld_tail(uld_tail, uld_top_k)
    if block_size is not None:
        return _blocked(uld, student_logits, teacher_logits, None, block_size, alignment, mask, reduction,
                        dict(student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size),
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared,
                        uld_tail=uld_tail, uld_top_k=uld_top_k)
    v_s = int(student_vocab_size) if student_vocab_size is not None else _width(student_logits)
    v_t = int(teacher_vocab_size) if teacher_vocab_size is not None else _width(teacher_logits)
    s, t, m = _check_common(student_logits, teacher_logits, v_s, v_t, alignment, mask, merge, temperature, reduction, None)
    dt = _compute_dtype(s, t)
    ls, lt, counted = _items(_log_probs(s, v_s, temperature, dt), _log_probs(t, v_t, temperature, dt), alignment, m, merge, v_s, v_t)
    values = _sorted_l1(torch.exp(ls[:, :v_s]), torch.exp(lt[:, :v_t]), uld_tail, uld_top_k)
    return _reduce(values, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _hybrid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: ProjectionLike,
    relaxed: bool,
    alignment: AlignedPositions | None,
    merge: str,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
    scale_by_temperature_squared: bool,
    matched_weight: float | None,
    unmatched_weight: float | None,
    student_vocab_size: int | None,
    teacher_vocab_size: int | None,
    uld_tail: str = "pad",
    uld_top_k: int = REFERENCE_UNCOMMON_TOP_K,
    common_set: str = "top1",
) -> torch.Tensor:
    teacher_logits = dense_teacher(teacher_logits)
    check_uld_tail(uld_tail, uld_top_k)
    w = resolve_projection(projection, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
    v_s, v_t = w.shape
    s, t, m = _check_common(student_logits, teacher_logits, v_s, v_t, alignment, mask, merge, temperature, reduction, w.shape)
    w = _to_device(w, s.device)
    common = choose_common_set(w, relaxed, common_set)
    if (matched_weight is None) != (unmatched_weight is None):
        raise XTokenError("matched_weight and unmatched_weight must both be numbers or both be None (adaptive)")
    if matched_weight is None:  # TRL GOLD's adaptive weighting: share of the teacher vocabulary matched
        matched_weight = common.teacher_ids.numel() / max(1, v_t)
        unmatched_weight = 1.0 - matched_weight
    dt = _compute_dtype(s, t)
    ls, lt, counted = _items(_log_probs(s, v_s, temperature, dt), _log_probs(t, v_t, temperature, dt), alignment, m, merge, v_s, v_t)
    ls, lt = ls[:, :v_s], lt[:, :v_t]
    # KL on the common pairs, with the full-vocabulary-normalized probabilities.
    if common.one_to_one:
        log_q = ls.index_select(1, common.student_ids)
    else:
        grouped = ls.new_zeros(ls.shape[0], common.teacher_ids.numel()).index_add(
            1, common.group, torch.exp(ls.index_select(1, common.student_ids))
        )
        log_q = floored_log(grouped)
    matched = _xent_terms(lt.index_select(1, common.teacher_ids), log_q)
    # ULD on the remainders.
    s_keep = torch.ones(v_s, dtype=torch.bool, device=s.device)
    s_keep[common.student_ids] = False
    t_keep = torch.ones(v_t, dtype=torch.bool, device=s.device)
    t_keep[common.teacher_ids] = False
    rest_s = torch.exp(ls.index_select(1, torch.nonzero(s_keep, as_tuple=True)[0]))
    rest_t = torch.exp(lt.index_select(1, torch.nonzero(t_keep, as_tuple=True)[0]))
    unmatched = _sorted_l1(rest_s, rest_t, uld_tail, uld_top_k)
    values = float(matched_weight) * matched + float(unmatched_weight) * unmatched  # type: ignore[arg-type]
    return _reduce(values, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def gold(student_logits: torch.Tensor, teacher_logits: torch.Tensor, projection: ProjectionLike, **options: Any) -> torch.Tensor:
    """GOLD's hybrid: KL on the strict exact-match common set plus ULD on the remainders.

    ``matched_weight · Σ_{(s,t)∈C} p_T[t](log p_T[t] - log p_S[s]) + unmatched_weight ·
    sortedL1(p_S off C, p_T off C)``.  Both weights ``None``: TRL's adaptive weighting
    (``|C| / V_T`` and its complement).  It is :func:`h_kl` with ``common_set=None`` (the strict
    exact-match set), and takes the same keyword options (``common_set`` excepted).
    """
    return h_kl(student_logits, teacher_logits, projection, common_set=None, **options)


def h_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: ProjectionLike,
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
    uld_tail: str = "pad",
    uld_top_k: int = REFERENCE_UNCOMMON_TOP_K,
    common_set: str | None = "top1",
) -> torch.Tensor:
    """H-KL: GOLD's hybrid with the common set relaxed to every non-empty student row's top-1 under W.

    Student rows sharing one top-1 teacher token ``t`` are summed (``q[t] = Σ p_S[s]``, log of
    ``max(q, EPS)`` in value, gradient of ``log q``: :func:`floored_log`), so each teacher token
    appears once in the KL part.  ``common_set="reference"``: NeMo-RL's common set instead
    (:func:`reference_common_set`: top weight >= 0.6, one row per teacher token); ``common_set=None``:
    GOLD's strict exact-match set (:func:`gold`); ``uld_tail`` as :func:`uld`.
    """
    if block_size is not None:
        teacher_logits = dense_teacher(teacher_logits)  # a cached SparseTeacher: blocks slice the dense rows
        return _blocked(h_kl, student_logits, teacher_logits, projection, block_size, alignment, mask, reduction,
                        dict(student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size),
                        merge=merge, temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared,
                        matched_weight=matched_weight, unmatched_weight=unmatched_weight, uld_tail=uld_tail, uld_top_k=uld_top_k,
                        common_set=common_set)
    return _hybrid(
        student_logits, teacher_logits, projection, common_set is not None, alignment, merge, mask, temperature, reduction,
        scale_by_temperature_squared, matched_weight, unmatched_weight, student_vocab_size, teacher_vocab_size,
        uld_tail, uld_top_k, common_set or "top1",
    )


from nemo_xtoken.losses.partition import partition_kl  # noqa: E402 (partition.py imports this module lazily)

LOSSES = {"kl": kl, "p_kl": p_kl, "uld": uld, "gold": gold, "h_kl": h_kl, "partition_kl": partition_kl}
# partition_kl's third argument is the tokens' Spellings (nemo_xtoken.vocab.spellings), not W
NEEDS_PROJECTION = {"kl": False, "p_kl": True, "uld": False, "gold": True, "h_kl": True, "partition_kl": True}
