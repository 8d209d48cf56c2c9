"""Partition-KL: the KL of the two chunk distributions over strings, decomposed along the observed text.

Reference implementation (the specification; the tensor-parallel version in
:mod:`nemo_xtoken.parallel.partition` is tested against it).  Definition (docs/losses.md, section
"Partition-KL"), per aligned chunk with the student's tokens ``s_1..s_m`` and the teacher's
``t_1..t_n`` (both spell the chunk's text ``x``):

* the **fine side** F is the side with more tokens in the chunk (the teacher on ties), the
  **coarse side** C the other; every C token ``v`` has a *spelling* ``σ(v)`` in F's tokens
  (:class:`~nemo_xtoken.vocab.spellings.Spellings`);
* **level 1** (F's first position): the buckets are F's tokens; C's token ``v`` falls in the
  bucket of its first piece ``σ(v)_1``.  Term: ``KL(teacher's bucket masses ‖ student's)`` —
  a P-KL with a 0/1 first-piece W when the teacher is F, the teacher's first-piece masses
  against the student's distribution when the student is F;
* **level r > 1** (F's r-th position, conditional on the observed prefix ``f_1..f_{r-1}``): C's
  tokens whose spelling extends the prefix, renormalized; bucket = their r-th piece; a C token
  whose spelling *is* the prefix goes to the **rest** bucket (its continuation is decided by a C
  position that the observed text never reaches); F's buckets are the same F tokens, F's rest is
  the mass on every other token.  Term: the KL over those buckets plus rest;
* a chunk's value is the sum of its levels: the KL, along the observed path, of the two
  distributions over the chain of partitions — zero when the student's string distribution
  equals the teacher's there (tested on worlds where both are derived from one string
  distribution);
* **M:N chunks** (both sides ≥ 2 tokens: neither side's boundaries contain the other's): the
  binary KL of the chunk's string likelihood (each side's chain of its observed tokens, as ALM
  compares them): ``KL(Bern(P_T(x)) ‖ Bern(P_S(x)))``.

Logs of the student's bucket masses are floored in value only (:func:`floored_log`); the teacher's
empty buckets contribute 0.  Without an alignment, position ``i`` against position ``i`` is a
1:1 chunk (level 1 only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.vocab.spellings import Spellings

__all__ = ["PartitionPlan", "build_partition_plan", "partition_kl", "partition_terms"]


@dataclass
class PartitionPlan:
    """Which logits entries each level of each chunk reads (built on the host from the alignment's ids).

    All arrays are int64 numpy; positions index the flattened ``[N, V]`` logits of each side.
    """

    n_chunks: int
    counted: np.ndarray  # bool [n_chunks]
    # level 1 of every 1:1, 1:N and N:1 chunk: (chunk, student's first position, teacher's first position)
    l1_chunk: np.ndarray
    l1_s_pos: np.ndarray
    l1_t_pos: np.ndarray
    # levels r > 1: one row per level
    lvl_chunk: np.ndarray
    lvl_f_teacher: np.ndarray  # bool: F is the teacher
    lvl_f_pos: np.ndarray
    lvl_c_pos: np.ndarray
    # buckets of those levels (the last bucket of every level is its rest, token -1)
    cell_level: np.ndarray
    cell_tok: np.ndarray  # F's token, -1 for rest
    # C's tokens feeding the buckets
    ent_cell: np.ndarray
    ent_tok: np.ndarray
    # M:N chunks: the observed tokens of both sides
    mn_chunk: np.ndarray
    mn_s_item: np.ndarray
    mn_s_pos: np.ndarray
    mn_s_tok: np.ndarray
    mn_t_item: np.ndarray
    mn_t_pos: np.ndarray
    mn_t_tok: np.ndarray

    @property
    def n_levels(self) -> int:
        return int(self.l1_chunk.size + self.lvl_chunk.size)

    def sizes(self) -> dict[str, int]:
        """Counts for reports: chunks per kind, levels, buckets beyond level 1."""
        return {
            "chunks": int(self.counted.sum()),
            "level1": int(self.l1_chunk.size),
            "deeper_levels": int(self.lvl_chunk.size),
            "deeper_buckets": int(self.cell_tok.size),
            "m_to_n_chunks": int(self.mn_chunk.size),
        }


def _i64(x: list[int]) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def build_partition_plan(alignment: AlignedPositions | None, spellings: Spellings, *, n_positions: int | None = None) -> PartitionPlan:
    """The partition of every counted chunk of ``alignment`` (or of ``n_positions`` 1:1 positions)."""
    if alignment is None:
        if n_positions is None:
            raise XTokenError("build_partition_plan needs an alignment or n_positions")
        pos = np.arange(n_positions, dtype=np.int64)
        e = np.zeros(0, dtype=np.int64)
        return PartitionPlan(n_positions, np.ones(n_positions, dtype=bool), pos, pos, pos.copy(), e, np.zeros(0, bool),
                             e, e, e, e, e, e, e, e, e, e, e, e, e)
    sid = alignment.student_chunk_ids.detach().cpu().numpy().astype(np.int64)
    tid = alignment.teacher_chunk_ids.detach().cpu().numpy().astype(np.int64)
    stg = alignment.student_targets.detach().cpu().numpy().astype(np.int64)
    ttg = alignment.teacher_targets.detach().cpu().numpy().astype(np.int64)
    K = int(alignment.n_chunks)

    def by_chunk(ids: np.ndarray) -> list[np.ndarray]:
        pos = np.flatnonzero(ids >= 0)
        order = np.lexsort((pos, ids[pos]))
        pos = pos[order]
        bounds = np.searchsorted(ids[pos], np.arange(K + 1))
        return [pos[bounds[k] : bounds[k + 1]] for k in range(K)]

    sp, tp = by_chunk(sid), by_chunk(tid)
    counted = np.array([sp[k].size > 0 and tp[k].size > 0 for k in range(K)], dtype=bool)
    l1: tuple[list[int], list[int], list[int]] = ([], [], [])
    rep_s, rep_t, n_s, n_t = spellings.level1()
    lvl: tuple[list[int], list[bool], list[int], list[int]] = ([], [], [], [])
    cell_level: list[int] = []
    cell_tok: list[int] = []
    ent_cell: list[np.ndarray] = []
    ent_tok: list[np.ndarray] = []
    mn = ([], [], [], [], [], [], [])
    for k in np.flatnonzero(counted).tolist():
        s_pos, t_pos = sp[k], tp[k]
        m, n = s_pos.size, t_pos.size
        if m >= 2 and n >= 2:
            item = len(mn[0])
            mn[0].append(k)
            for p in s_pos.tolist():
                mn[1].append(item); mn[2].append(p); mn[3].append(int(stg[p]))
            for p in t_pos.tolist():
                mn[4].append(item); mn[5].append(p); mn[6].append(int(ttg[p]))
            continue
        l1[0].append(k); l1[1].append(int(s_pos[0])); l1[2].append(int(t_pos[0]))
        f_teacher = n >= m
        if f_teacher:
            f_pos, f_tg, c_pos, c_side = t_pos, ttg, int(s_pos[0]), "student"
        else:
            f_pos, f_tg, c_pos, c_side = s_pos, stg, int(t_pos[0]), "teacher"
        if f_pos.size < 2:
            continue
        # F's first token must be its level-1 bucket's only F token: then that bucket is the event
        # "F's first token is f_1", on which the next levels condition
        f1 = int(f_tg[f_pos[0]])
        bucket = int(rep_t[f1]) if f_teacher else int(rep_s[f1])
        if bucket < 0 or (n_t[bucket] if f_teacher else n_s[bucket]) != 1:
            continue
        ext = spellings.extensions(c_side)
        prefix: tuple[int, ...] = ()
        for r in range(1, f_pos.size):
            prefix = prefix + (int(f_tg[f_pos[r - 1]]),)
            hit = ext.get(prefix)
            if hit is None:  # no C token spells this prefix: nothing left to compare on this chunk
                break
            toks, nxt = hit
            level = len(lvl[0])
            lvl[0].append(k); lvl[1].append(f_teacher); lvl[2].append(int(f_pos[r])); lvl[3].append(c_pos)
            buckets = np.unique(nxt[nxt >= 0])
            base = len(cell_tok)
            cell_level.extend([level] * (buckets.size + 1))
            cell_tok.extend(buckets.tolist() + [-1])
            where = np.where(nxt >= 0, np.searchsorted(buckets, np.maximum(nxt, 0)), buckets.size)
            ent_cell.append(base + where)
            ent_tok.append(toks)
    cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64))
    return PartitionPlan(
        K, counted, _i64(l1[0]), _i64(l1[1]), _i64(l1[2]),
        _i64(lvl[0]), np.asarray(lvl[1], dtype=bool), _i64(lvl[2]), _i64(lvl[3]), _i64(cell_level), _i64(cell_tok),
        cat(ent_cell), cat(ent_tok), *(_i64(x) for x in mn),
    )


# ---- the terms, from per-side lookups (shared by the reference and the tensor-parallel path) ----


def _bucket_kl(p_t: torch.Tensor, p_s: torch.Tensor, group_of: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group ``Σ p_T (log p_T − log⌊p_S⌋)`` over its buckets; empty teacher buckets contribute 0."""
    from nemo_xtoken.losses.reference import floored_log

    live = p_t > 0
    one = torch.ones((), dtype=p_t.dtype, device=p_t.device)
    terms = torch.where(live, p_t * (torch.log(torch.where(live, p_t, one)) - floored_log(p_s)), torch.zeros_like(p_t))
    return p_t.new_zeros(n_groups).index_add(0, group_of, terms)


def partition_terms(
    plan: PartitionPlan,
    f_cell_prob: torch.Tensor,
    c_cell_mass: torch.Tensor,
    mn_s_logp: torch.Tensor,
    mn_t_logp: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """Per chunk ``[n_chunks]``: the levels r > 1 and the M:N terms from their looked-up values.

    ``f_cell_prob [n_cells]``: F's probability of every bucket's token (0 for rest buckets);
    ``c_cell_mass [n_cells]``: C's summed probability per bucket (rest included);
    ``mn_*_logp``: per M:N item, each side's log-likelihood of the chunk's observed tokens.
    """
    from nemo_xtoken.losses.reference import floored_log

    out = torch.zeros(plan.n_chunks, dtype=f_cell_prob.dtype, device=device)
    n_lvl = int(plan.lvl_chunk.size)
    if n_lvl:
        lv = torch.from_numpy(plan.cell_level).to(device)
        is_rest = torch.from_numpy(plan.cell_tok < 0).to(device)
        f_sum = f_cell_prob.new_zeros(n_lvl).index_add(0, lv, f_cell_prob)
        f_p = torch.where(is_rest, (1.0 - f_sum).clamp(min=0.0)[lv], f_cell_prob)
        z = c_cell_mass.new_zeros(n_lvl).index_add(0, lv, c_cell_mass)
        c_p = c_cell_mass / z[lv]
        f_teacher = torch.from_numpy(plan.lvl_f_teacher).to(device)[lv]
        p_t = torch.where(f_teacher, f_p, c_p).detach()
        p_s = torch.where(f_teacher, c_p, f_p)
        per_level = _bucket_kl(p_t, p_s, lv, n_lvl)
        out = out.index_add(0, torch.from_numpy(plan.lvl_chunk).to(device), per_level)
    if plan.mn_chunk.size:
        lt = mn_t_logp.detach()
        ls = mn_s_logp
        pt = lt.exp()
        one_m_pt = -torch.expm1(lt)
        one_m_ps = -torch.expm1(ls)
        t1 = pt * (lt - _floor_logv(ls))
        live = one_m_pt > 0
        t2 = torch.where(live, one_m_pt * (torch.log(torch.where(live, one_m_pt, torch.ones_like(one_m_pt))) - floored_log(one_m_ps)),
                         torch.zeros_like(one_m_pt))
        out = out.index_add(0, torch.from_numpy(plan.mn_chunk).to(device), t1 + t2)
    return out


def _floor_logv(logq: torch.Tensor) -> torch.Tensor:
    """A log-probability floored at log EPS in value only (gradient of the log itself)."""
    from nemo_xtoken.losses.reference import EPS

    return logq + (logq.clamp(min=float(np.log(EPS))) - logq).detach()


# ---- the reference loss -------------------------------------------------------------------------


def _t(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def partition_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spellings: Spellings,
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
    plan: PartitionPlan | None = None,
) -> torch.Tensor:
    """Partition-KL per chunk (module doc): the chain-rule KL of the two string distributions along the text.

    ``spellings`` (:func:`~nemo_xtoken.vocab.spellings.build_spellings`) plays W's role.  ``merge``
    is accepted for a uniform signature and ignored: the loss defines its own use of every
    position of the chunk.  Reductions, temperature, padding and bad-input checks as the other
    losses (docs/losses.md).
    """
    from nemo_xtoken.losses.reference import (
        _check_common,
        _compute_dtype,
        _log_probs,
        _reduce,
        _width,
        floored_log,
    )
    from nemo_xtoken.losses.sparse import dense_teacher

    if not isinstance(spellings, Spellings):
        raise XTokenError(f"partition_kl needs the tokens' spellings (nemo_xtoken.vocab.spellings.Spellings), got {type(spellings).__name__}")
    teacher_logits = dense_teacher(teacher_logits)
    v_s, v_t = spellings.shape
    for name, want, have in (("student", student_vocab_size, v_s), ("teacher", teacher_vocab_size, v_t)):
        if want is not None and int(want) != have:
            raise XTokenError(f"partition_kl: the spellings were built for a {name} vocabulary of {have} ids, not {want}: rebuild them for this pair")
    if block_size is not None:
        from nemo_xtoken.losses.blocked import run_blocked

        def call(s, t, a, m, red, params):
            return partition_kl(s, t, spellings, alignment=a, mask=m, reduction=red, temperature=temperature,
                                scale_by_temperature_squared=scale_by_temperature_squared)

        return run_blocked(call, student_logits, teacher_logits, (), block_size=block_size, alignment=alignment, mask=mask, reduction=reduction)
    s, t, m = _check_common(student_logits, teacher_logits, v_s, v_t, alignment, mask, merge, temperature, reduction, (v_s, v_t))
    dt = _compute_dtype(s, t)
    dev = s.device
    if plan is None:
        plan = build_partition_plan(alignment, spellings, n_positions=s.shape[0])
        if alignment is None and m is not None:
            plan.counted = m.cpu().numpy().astype(bool)
            keep = np.flatnonzero(plan.counted)
            plan.l1_chunk, plan.l1_s_pos, plan.l1_t_pos = keep, keep, keep.copy()
    ls = _log_probs(s, v_s, temperature, dt)
    lt = _log_probs(t, v_t, temperature, dt).detach()
    out = torch.zeros(plan.n_chunks, dtype=dt, device=dev) + ls[:, :0].sum()  # on the graph even when nothing counts
    # level 1: KL over the buckets both first positions can measure (Spellings.level1)
    if plan.l1_chunk.size:
        rep_s, rep_t, _, _ = spellings.level1()
        s_tok = np.flatnonzero(rep_s >= 0)
        pt = lt.index_select(0, _t(plan.l1_t_pos, dev)).exp()
        ps = ls.index_select(0, _t(plan.l1_s_pos, dev)).exp()
        qt = pt.new_zeros(pt.shape[0], v_t).index_add(1, _t(rep_t, dev), pt)
        qs = ps.new_zeros(ps.shape[0], v_t).index_add(1, _t(rep_s[s_tok], dev), ps.index_select(1, _t(s_tok, dev)))
        live = qt > 0
        one = torch.ones((), dtype=qt.dtype, device=dev)
        term = torch.where(live, qt * (torch.log(torch.where(live, qt, one)) - floored_log(qs)), torch.zeros_like(qt)).sum(1)
        out = out.index_add(0, _t(plan.l1_chunk, dev), term)
    # levels r > 1 and M:N chunks
    f_prob, c_mass = _cell_values(plan, ls, lt, dev)
    mn_s = ls.new_zeros(plan.mn_chunk.size).index_add(0, _t(plan.mn_s_item, dev), ls[_t(plan.mn_s_pos, dev), _t(plan.mn_s_tok, dev)])
    mn_t = lt.new_zeros(plan.mn_chunk.size).index_add(0, _t(plan.mn_t_item, dev), lt[_t(plan.mn_t_pos, dev), _t(plan.mn_t_tok, dev)])
    out = out + partition_terms(plan, f_prob, c_mass, mn_s, mn_t, dev)
    counted = _t(plan.counted, dev)
    return _reduce(out, counted, reduction, temperature**2 if scale_by_temperature_squared else 1.0)


def _pick(ls: torch.Tensor, lt: torch.Tensor, teacher: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``lt[pos, tok]`` where ``teacher`` else ``ls[pos, tok]`` (each side indexed only where it is read)."""
    out = ls.new_zeros(pos.shape[0])
    if bool(teacher.any()):
        out = out.index_put((torch.nonzero(teacher, as_tuple=True)[0],), lt[pos[teacher], tok[teacher]])
    if bool((~teacher).any()):
        out = out.index_put((torch.nonzero(~teacher, as_tuple=True)[0],), ls[pos[~teacher], tok[~teacher]])
    return out


def _cell_values(plan: PartitionPlan, ls: torch.Tensor, lt: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """F's probability per bucket token and C's mass per bucket, from full (unsharded) log-probabilities."""
    n_cells = int(plan.cell_tok.size)
    if not n_cells:
        z = ls.new_zeros(0)
        return z, z
    lv = _t(plan.cell_level, dev)
    f_teacher = _t(plan.lvl_f_teacher, dev)
    rest = _t(plan.cell_tok < 0, dev)
    f_lp = _pick(ls, lt, f_teacher[lv], _t(plan.lvl_f_pos, dev)[lv], _t(np.maximum(plan.cell_tok, 0), dev))
    f_prob = torch.where(rest, torch.zeros_like(f_lp), f_lp.exp())
    ec = _t(plan.ent_cell, dev)
    elv = lv[ec]
    c_lp = _pick(ls, lt, ~f_teacher[elv], _t(plan.lvl_c_pos, dev)[elv], _t(plan.ent_tok, dev))  # C is the teacher where F is the student
    c_mass = c_lp.new_zeros(n_cells).index_add(0, ec, c_lp.exp())
    return f_prob, c_mass
