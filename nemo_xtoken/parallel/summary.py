"""Low-traffic tensor-parallel ULD / GOLD / H-KL: the sorted L1 from additive shard summaries.

The exact path all-gathers both vocabularies per item (``V_S' + V_T'`` values, as much as the
logits).  Here nothing of vocabulary size crosses ranks:

* **the common-set KL** (GOLD, H-KL) goes through a :class:`~nemo_xtoken.parallel.plan.PKLPlan`
  built on the common set's 0/1 matrix ``M`` (``M[s, t] = 1`` for each common pair): ``Mᵀ p_S``
  is exactly the reference's (grouped) ``q`` on the teacher's shards, moved by the same
  all-to-all as P-KL (and the same teacher permutation keeps it small);
* **the sorted L1** uses the identity, for non-negative vectors ``a``, ``b`` zero-padded to one
  length and sorted in decreasing order, ``Σ_i |a_(i) − b_(i)| = ∫_0^∞ |N_a(τ) − N_b(τ)| dτ``
  with ``N_x(τ) = #{i : x_i > τ}``.  On a fixed grid ``0 = τ_0 < τ_1 < … < τ_G = 1``
  (log-spaced) the integral of the *signed* difference over each interval,
  ``I_j = Σ_i c_j(a_i) − Σ_i c_j(b_i)`` with ``c_j(x) = clamp(x − τ_j, 0, τ_{j+1} − τ_j)``, is a
  sum over the vocabulary, so each rank computes its shard's part and one all-reduce of
  ``4·G`` numbers per item (the two sides' interval sums and counts) completes it.  The loss is
  ``Σ_j |I_j|``.

Error, stated and checked (tests): ``Σ_j |I_j| ≤ exact ≤ Σ_j |I_j| + bound`` per item, where
``bound = Σ_j (U_j − |I_j|)`` is computed from the counts: on an interval where the counting
functions cannot cross (``#{a ≥ τ_{j+1}} ≥ #{b > τ_j}`` or the converse) the term is exact
(``U_j = |I_j|``), else ``U_j = min(w_j · max gap of the counts, Σ c_j(a) + Σ c_j(b))``.  The
gradient is ``sign(I_j)`` for a probability in interval ``j``: the exact gradient wherever the
interval is exact.  :func:`summary_sorted_l1` returns the bound beside the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.parallel.comm import sum_partials
from nemo_xtoken.parallel.plan import PKLPlan

__all__ = ["HybridPlan", "SummaryBound", "summary_sorted_l1", "summary_grid", "DEFAULT_BINS", "summary_values_per_token"]

DEFAULT_BINS = 2048  # log-spaced intervals on [1e-16, 1] (ratio 1.018 between edges) + [0, 1e-16)
_LOW = -16.0


def summary_grid(bins: int = DEFAULT_BINS, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """The ``bins + 1`` edges ``[0, 1e-16, …, 1]`` (log-spaced above 0) of the sorted-L1 summary."""
    if bins < 2:
        raise XTokenError(f"the sorted-L1 summary needs at least 2 bins, got {bins}")
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(_LOW, 0.0, bins, dtype=torch.float64)])
    return edges.to(dtype=dtype, device=device)


def summary_values_per_token(bins: int) -> int:
    """Numbers all-reduced per item by the sorted-L1 summary: interval sums and counts of both sides."""
    return 4 * int(bins)


def _local_summary(x: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's ``(Σ_{x in j} (x − τ_j), #{x in j, x > 0})`` per interval ``j`` ([n, G] each)."""
    g = edges.numel() - 1
    j = torch.bucketize(x.detach(), edges[1:-1], right=True)  # edges[j] ≤ x < edges[j+1]
    off = x - edges[j]
    s = x.new_zeros(x.shape[0], g).scatter_add(1, j, off)
    c = x.new_zeros(x.shape[0], g).scatter_add(1, j, (x.detach() > 0).to(x.dtype))
    return s, c


def summary_sorted_l1(
    ps: torch.Tensor, pt: torch.Tensor, *, bins: int = DEFAULT_BINS, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item ``(Σ_j |I_j|, error bound)`` of ``Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|`` over all ranks' shards.

    ``ps`` ``[n, w_S]`` and ``pt`` ``[n, w_T]`` are this rank's columns (zeros where a column does
    not take part); one all-reduce of ``[n, 4·bins]``; the value is replicated on every rank and
    each rank's gradient is its shard's part (the module doc).
    """
    if ps.shape[0] != pt.shape[0]:
        raise XTokenError(f"summary_sorted_l1: {ps.shape[0]} student rows but {pt.shape[0]} teacher rows")
    dt = torch.promote_types(ps.dtype, pt.dtype)
    edges = summary_grid(bins, dt, ps.device)
    sa, ca = _local_summary(ps.to(dt), edges)
    sb, cb = _local_summary(pt.to(dt), edges)
    tot = sum_partials(torch.cat([sa, sb, ca, cb], dim=1), group)  # backward: identity (own shard's part)
    g = bins
    sa, sb, ca, cb = tot[:, :g], tot[:, g : 2 * g], tot[:, 2 * g : 3 * g].detach(), tot[:, 3 * g :].detach()
    w = edges[1:] - edges[:-1]
    hi_a = ca.flip(1).cumsum(1).flip(1)  # #{a ≥ τ_j} (#{a > 0} for j = 0)
    hi_b = cb.flip(1).cumsum(1).flip(1)
    lo_a = torch.nn.functional.pad(hi_a[:, 1:], (0, 1))  # #{a ≥ τ_{j+1}}
    lo_b = torch.nn.functional.pad(hi_b[:, 1:], (0, 1))
    big_a = w * lo_a + sa  # ∫_j N_a
    big_b = w * lo_b + sb
    diff = big_a - big_b
    value = diff.abs().sum(1)
    with torch.no_grad():
        a_ = diff.abs()
        exact = (lo_a >= hi_b) | (lo_b >= hi_a)
        gap = torch.maximum(hi_a - lo_b, hi_b - lo_a).clamp_min(0)
        upper = torch.minimum(w * gap, big_a + big_b)
        bound = torch.where(exact, torch.zeros_like(a_), (upper - a_).clamp_min(0)).sum(1)
    return value, bound


class SummaryBound:
    """Collects the computed error bound of a low-traffic loss call by call (``bound_out=`` of the losses).

    Each call of a low-traffic ULD / GOLD / H-KL (one per token block) adds its counted items'
    bounds, already weighted as their losses are (the absolute unmatched weight, temperature²), so
    ``total("mean")`` bounds ``|exact − value|`` of the loss's ``"mean"`` and ``total("sum")`` of its
    ``"sum"``; with a non-negative unmatched weight (the default, and TRL's adaptive one)
    ``value ≤ exact ≤ value + total``.  A token-blocked loss recomputes its blocks in the
    backward: :meth:`freeze` after reading the forward's bound keeps those calls out.
    """

    def __init__(self) -> None:
        self._sums: list[torch.Tensor] = []
        self._items = 0
        self._frozen = False

    def reset(self) -> None:
        """Forget everything recorded and record again (call before the loss's forward)."""
        self._sums, self._items, self._frozen = [], 0, False

    def freeze(self) -> None:
        """Ignore further calls (the backward's recomputed blocks) until :meth:`reset`."""
        self._frozen = True

    def add(self, item_bounds: torch.Tensor) -> None:
        """Record one call's per-item bounds ``[n]`` (the counted items of that call)."""
        if not self._frozen:
            self._sums.append(item_bounds.detach().sum().to(torch.float64))
            self._items += int(item_bounds.numel())

    @property
    def items(self) -> int:
        """Counted items recorded since the last :meth:`reset`."""
        return self._items

    def total(self, reduction: str = "mean") -> torch.Tensor:
        """The bound of the loss's ``"mean"`` (per counted item) or ``"sum"`` over the recorded calls."""
        if reduction not in ("mean", "sum"):
            raise XTokenError(f"SummaryBound.total: reduction must be 'mean' or 'sum', got {reduction!r}")
        s = torch.stack(self._sums).sum() if self._sums else torch.zeros((), dtype=torch.float64)
        return s / max(self._items, 1) if reduction == "mean" else s


@dataclass
class HybridPlan:
    """GOLD / H-KL on vocab shards with low traffic: the common set's exchange plan and column masks.

    Built once per (W, tp, padding, teacher permutation); pass it as the ``projection`` of
    :func:`~nemo_xtoken.parallel.vocab_parallel_gold` / ``_h_kl`` (``relaxed`` must match the
    loss).  The common-set KL is exact; the sorted L1 on the remaining columns uses the summary
    (:func:`summary_sorted_l1`, ``bins`` intervals) with its stated error bound.
    """

    relaxed: bool
    pkl: PKLPlan  # on the 0/1 common-set matrix (teacher permutation included)
    student_keep: np.ndarray  # bool [student_padded]: real student ids outside the common set
    teacher_keep: np.ndarray  # bool [teacher_padded], permuted column order: real teacher ids outside it
    teacher_common: np.ndarray  # bool [teacher_padded], permuted column order: common teacher ids
    n_common_teacher: int
    one_to_one: bool
    bins: int = DEFAULT_BINS
    common_set: str = "top1"  # H-KL's common set (nemo_xtoken.losses.reference.COMMON_SETS); GOLD: "top1" (its exact set)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def tp(self) -> int:
        return self.pkl.tp

    @property
    def shape(self) -> tuple[int, int]:
        return (self.pkl.student_vocab_size, self.pkl.teacher_vocab_size)

    @property
    def teacher_padded(self) -> int:
        """The padded teacher width the plan was built for (a cached teacher is materialized to it)."""
        return self.pkl.teacher_padded

    @property
    def teacher_perm(self) -> np.ndarray | None:
        """The teacher permutation the plan was built with (column ``j`` holds teacher id ``teacher_perm[j]``), or None."""
        return self.pkl.teacher_perm

    @staticmethod
    def build(
        projection: Any,
        tp: int,
        student_padded: int | None = None,
        teacher_padded: int | None = None,
        *,
        relaxed: bool,
        teacher_perm: np.ndarray | None = None,
        bins: int = DEFAULT_BINS,
        student_vocab_size: int | None = None,
        teacher_vocab_size: int | None = None,
        common_set: str = "top1",
    ) -> "HybridPlan":
        """The plan for H-KL (``relaxed=True``: ``common_set`` top1 or reference) or GOLD (exact-match common set) on ``tp`` ranks."""
        from nemo_xtoken.losses.reference import choose_common_set, resolve_projection

        if bins < 2:
            raise XTokenError(f"the sorted-L1 summary needs at least 2 bins, got {bins}")
        w = resolve_projection(projection, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
        v_s, v_t = w.shape
        common = choose_common_set(w, relaxed, common_set)
        sid = common.student_ids.cpu().numpy().astype(np.int64)
        tid = common.teacher_ids.cpu().numpy().astype(np.int64)[common.group.cpu().numpy()]  # pair k: (sid[k], tid[k])
        m = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([sid, tid])), torch.ones(sid.size), (v_s, v_t)
        ).coalesce().to_sparse_csr()
        sp = v_s if student_padded is None else int(student_padded)
        tpd = v_t if teacher_padded is None else int(teacher_padded)
        pkl = PKLPlan.build(m, tp, sp, tpd, teacher_perm=teacher_perm)
        order = np.arange(tpd) if teacher_perm is None else np.asarray(teacher_perm, dtype=np.int64)
        s_keep = np.zeros(sp, dtype=bool)
        s_keep[:v_s] = True
        s_keep[sid] = False
        t_common = np.zeros(tpd, dtype=bool)
        t_common[common.teacher_ids.cpu().numpy()] = True
        t_keep = np.zeros(tpd, dtype=bool)
        t_keep[:v_t] = True
        t_keep &= ~t_common
        return HybridPlan(
            relaxed=bool(relaxed), pkl=pkl, student_keep=s_keep, teacher_keep=t_keep[order], teacher_common=t_common[order],
            n_common_teacher=int(common.teacher_ids.numel()), one_to_one=bool(common.one_to_one), bins=int(bins),
            common_set=common_set,
        )

    def masks(self, rank: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(student_keep, teacher_keep, teacher_common)`` column masks on ``device`` (cached)."""
        key = (rank, str(device))
        if key not in self._cache:
            ws, wt = self.student_keep.size // self.tp, self.teacher_keep.size // self.tp
            cut = lambda a, w: torch.from_numpy(np.ascontiguousarray(a[rank * w : (rank + 1) * w])).to(device)  # noqa: E731
            self._cache[key] = (cut(self.student_keep, ws), cut(self.teacher_keep, wt), cut(self.teacher_common, wt))
        return self._cache[key]

    def values_sent_per_token(self) -> np.ndarray:
        """float ``[tp]``: values each rank sends per item: the common-set exchange + the summary's ring all-reduce."""
        tp = self.tp
        ring = 2 * (tp - 1) / tp * summary_values_per_token(self.bins) if tp > 1 else 0.0
        return self.pkl.values_sent_per_token().astype(np.float64) + ring
