"""A teacher distribution kept sparse: top-k ids, their log-probabilities and the exact log-mass of the rest.

An offline (cached) teacher is stored per teacher position as ``ids [k]`` (its top-k tokens, plus
the actual next token when that is outside the top-k), ``log_probs [k]`` (exact log-softmax values
over the teacher's real vocabulary) and ``rest_log_mass`` (the exact log of the probability of all
other tokens, from the full log-sum-exp, not ``1 - Σ top-k``).

**The rest rule.**  Every loss takes a :class:`SparseTeacher` in place of teacher logits.  At the
loss entry point it is *materialized* into dense teacher log-probabilities: the stored entries
exactly, and the rest mass spread uniformly over the ``V - k`` teacher tokens outside them
(``rest_log_mass - log(V - k)`` each).  The result is a normalized distribution over the real
vocabulary, so ``log_softmax`` leaves it unchanged (up to rounding), temperature acts as on the
live teacher's logits, and every loss, merge and tensor-parallel path runs unchanged.  With
``k = V`` it *is* the live teacher's distribution.  Its distance to the live one is bounded by the
rest mass: ``TV(p_T, p̂_T) = ½ Σ_rest |p_T[v] - r/(V-k)| ≤ r`` (tested).

On a tensor-parallel rank only the rank's columns are materialized (:meth:`SparseTeacher.dense`
with ``start``/``width``, or ``column_ids`` for a permuted teacher), never the full vocabulary.
Padded columns (ids ``≥ V``) get :data:`FLOOR`, a finite log-probability whose ``exp`` is exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nemo_xtoken.errors import XTokenError

__all__ = [
    "FLOOR",
    "SparseTeacher",
    "sparse_from_logits",
    "dense_teacher",
    "padded_vocab_size",
    "is_sparse",
]

#: Log-probability written where there is no mass (padded columns, an empty rest): finite, so no
#: NaN/inf check trips, and ``exp(FLOOR)`` is exactly 0 in float32 and float64.
FLOOR = -1.0e4


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a :class:`SparseTeacher` (rather than teacher logits)."""
    return isinstance(x, SparseTeacher)


@dataclass
class SparseTeacher:
    """Sparse teacher distributions of ``N`` positions over a vocabulary of ``vocab_size`` ids.

    ``ids [N, k]`` (distinct per row, in ``[0, vocab_size)``), ``log_probs [N, k]`` and
    ``rest_log_mass [N]`` (``-inf`` when the entries hold all the mass); ``[B, T, k]`` / ``[B, T]``
    are accepted and flattened by :meth:`flat`.  See the module doc for the rest rule.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    rest_log_mass: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        ids, lp, rest = self.ids, self.log_probs, self.rest_log_mass
        for name, x in (("ids", ids), ("log_probs", lp), ("rest_log_mass", rest)):
            if not isinstance(x, torch.Tensor):
                raise XTokenError(f"SparseTeacher.{name} must be a torch.Tensor, got {type(x).__name__}")
        if ids.shape != lp.shape or ids.dim() < 1 or rest.shape != ids.shape[:-1]:
            raise XTokenError(
                f"SparseTeacher: ids {tuple(ids.shape)}, log_probs {tuple(lp.shape)} and rest_log_mass {tuple(rest.shape)} "
                "must be [..., k], [..., k] and [...]"
            )
        if ids.is_floating_point() or not lp.is_floating_point() or not rest.is_floating_point():
            raise XTokenError(f"SparseTeacher: ids must be integers and log-probabilities floats (got {ids.dtype}, {lp.dtype}, {rest.dtype})")
        self.vocab_size = int(self.vocab_size)
        if self.k > self.vocab_size or self.vocab_size < 1:
            raise XTokenError(f"SparseTeacher: {self.k} entries per position for a vocabulary of {self.vocab_size} ids")

    @property
    def k(self) -> int:
        """Entries per position."""
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Positions shape (``ids.shape[:-1]``)."""
        return tuple(self.ids.shape[:-1])

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def flat(self) -> "SparseTeacher":
        """The same positions as ``[N, k]`` / ``[N]``."""
        if self.ids.dim() == 2:
            return self
        return SparseTeacher(self.ids.reshape(-1, self.k), self.log_probs.reshape(-1, self.k), self.rest_log_mass.reshape(-1), self.vocab_size)

    def to(self, device: Any) -> "SparseTeacher":
        """Moved to ``device``."""
        return SparseTeacher(self.ids.to(device), self.log_probs.to(device), self.rest_log_mass.to(device), self.vocab_size)

    def detach(self) -> "SparseTeacher":
        """No gradient (the teacher is frozen)."""
        return SparseTeacher(self.ids.detach(), self.log_probs.detach(), self.rest_log_mass.detach(), self.vocab_size)

    def check(self, name: str = "sparse teacher") -> "SparseTeacher":
        """Refuse ids outside the vocabulary, repeated ids in a row and NaN/+inf log-probabilities."""
        f = self.flat()
        if f.ids.numel():
            lo, hi = int(f.ids.min()), int(f.ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise XTokenError(f"{name}: token ids must lie in [0, {self.vocab_size}), found {lo if lo < 0 else hi}")
            srt = torch.sort(f.ids, dim=1).values
            dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
            if bool(dup.any()):
                raise XTokenError(f"{name}: position {int(torch.nonzero(dup)[0])} lists a token id twice")
        bad = torch.isnan(f.log_probs).any(dim=1) | (f.log_probs > 1e-3).any(dim=1) | torch.isnan(f.rest_log_mass) | (f.rest_log_mass > 1e-3)
        if bool(bad.any()):
            raise XTokenError(f"{name}: position {int(torch.nonzero(bad)[0])} has NaN or positive log-probabilities")
        return self

    def rest_log_prob(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N]``: the log-probability each of the ``V - k`` other tokens gets (the rest rule), ≥ :data:`FLOOR`."""
        f = self.flat()
        n_rest = self.vocab_size - self.k
        if n_rest <= 0:
            return torch.full(f.rest_log_mass.shape, FLOOR, dtype=dtype, device=self.device)
        v = f.rest_log_mass.to(dtype) - math.log(n_rest)
        return torch.nan_to_num(v, nan=FLOOR, neginf=FLOOR).clamp(min=FLOOR)

    def dense(
        self,
        *,
        start: int = 0,
        width: int | None = None,
        column_ids: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Dense teacher log-probabilities ``[N, width]`` of columns ``start … start+width-1`` (default: all real ids).

        ``column_ids [width]`` instead names the teacher id of every column (a permuted teacher's
        shard).  Columns whose id is ``≥ vocab_size`` (padding) get :data:`FLOOR`.  ``dtype``:
        float32, or float64 when the log-probabilities are.
        """
        if dtype is None:
            dtype = torch.float64 if self.log_probs.dtype == torch.float64 else torch.float32
        f = self.flat()
        n = f.ids.shape[0]
        if column_ids is not None:
            cols = column_ids.to(self.device).long()
            width = int(cols.numel())
        else:
            width = self.vocab_size - start if width is None else int(width)
            cols = None
        out = self.rest_log_prob(dtype).unsqueeze(1).expand(n, width).clone() if n else torch.empty(0, width, dtype=dtype, device=self.device)
        if cols is None:
            pad_from = max(self.vocab_size - start, 0)
            if pad_from < width:
                out[:, pad_from:] = FLOOR
            local = f.ids.long() - start
            inside = (local >= 0) & (local < width)
        else:
            out[:, cols >= self.vocab_size] = FLOOR
            hi = max(int(cols.max()) + 1 if cols.numel() else 0, self.vocab_size)
            inv = torch.full((hi,), -1, dtype=torch.long, device=self.device)
            inv[cols] = torch.arange(width, device=self.device)
            local = inv[f.ids.long()]
            inside = local >= 0
        if n and bool(inside.any()):
            rows = torch.arange(n, device=self.device).unsqueeze(1).expand_as(local)
            out[rows[inside], local[inside]] = f.log_probs[inside].to(dtype)
        return out

    def select(self, index: torch.Tensor) -> "SparseTeacher":
        """The positions ``index`` (rows of the flattened teacher)."""
        f = self.flat()
        return SparseTeacher(f.ids[index], f.log_probs[index], f.rest_log_mass[index], self.vocab_size)

    def truncate(self, k: int) -> "SparseTeacher":
        """The first ``k`` entries of every row, the dropped ones moved into the rest mass (exactly)."""
        if not 1 <= k <= self.k:
            raise XTokenError(f"truncate: k must be in [1, {self.k}], got {k}")
        f = self.flat()
        dropped = torch.cat([f.log_probs[:, k:].double(), f.rest_log_mass.double().unsqueeze(1)], dim=1)
        rest = torch.logsumexp(dropped, dim=1).to(f.rest_log_mass.dtype)
        return SparseTeacher(f.ids[:, :k], f.log_probs[:, :k], rest, self.vocab_size)


@torch.no_grad()
def sparse_from_logits(
    logits: torch.Tensor,
    k: int,
    *,
    vocab_size: int | None = None,
    targets: torch.Tensor | None = None,
) -> SparseTeacher:
    """Top-``k`` of ``log_softmax(logits[:, :vocab_size])`` per row, plus the exact log-mass of the rest.

    ``targets [N]`` (optional; ``-1`` = none): each row's actual next token is stored as an extra
    entry when it is outside the top-k (else the ``k+1``-th most likely token is), so a row holds
    ``k + 1`` entries and the chain merge's target probability is exact.  Entries are sorted by
    decreasing probability, the extra one last.  Computed in float32 (float64 kept).
    """
    x = logits.reshape(-1, logits.shape[-1])
    v = x.shape[-1] if vocab_size is None else int(vocab_size)
    if v > x.shape[-1]:
        raise XTokenError(
            f"the teacher's logits have {x.shape[-1]} columns but its tokenizer has {v} ids: the model and the tokenizer "
            "do not belong together"
        )
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x[:, :v].to(dt)  # a view when the logits are already float32 and unpadded
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    extra = targets is not None
    if int(k) < 1:
        raise XTokenError(f"top-k must be ≥ 1, got {k}")
    kk = min(int(k) + (1 if extra else 0), v)
    top = torch.topk(z, kk, dim=-1, sorted=True)  # the order of the logits is the order of the log-probabilities
    ids, vals = top.indices, top.values - lse
    if extra and kk > int(k):
        tg = targets.reshape(-1).to(x.device).long()
        if tg.shape[0] != x.shape[0]:
            raise XTokenError(f"targets {tuple(targets.shape)} do not match the {x.shape[0]} rows of the logits")
        has = (tg >= 0) & (tg < v)
        in_top = (ids[:, : int(k)] == tg.unsqueeze(1)).any(dim=1)
        swap = has & ~in_top
        tgs = torch.where(swap, tg, torch.zeros_like(tg))
        ids[:, -1] = torch.where(swap, tgs, ids[:, -1])
        vals[:, -1] = torch.where(swap, z.gather(1, tgs.unsqueeze(1)).squeeze(1) - lse.squeeze(1), vals[:, -1])
    if kk < v:
        rest = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=-1) - lse.squeeze(1)  # exact: no 1 - Σ top-k
    else:
        rest = torch.full((x.shape[0],), float("-inf"), dtype=dt, device=x.device)
    return SparseTeacher(ids, vals, rest, v)


def padded_vocab_size(vocab_size: int, tp: int = 1, multiple: int = 128) -> int:
    """Megatron's padding of a vocabulary: the next multiple of ``multiple · tp``."""
    m = int(multiple) * int(tp)
    return ((int(vocab_size) + m - 1) // m) * m


def dense_teacher(teacher: Any) -> Any:
    """Loss entry point (single device): a :class:`SparseTeacher` → dense log-probabilities ``[N, V]``; else unchanged."""
    if isinstance(teacher, SparseTeacher):
        return teacher.dense()
    return teacher
