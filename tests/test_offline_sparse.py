"""Sparse (cached) teachers in every loss: k = V equals the live teacher; smaller k is bounded by the rest mass.

Reference losses (KL, ULD, GOLD, P-KL, H-KL; masks, alignments with chain/mean merges,
temperature, reductions; multi-teacher with static and adaptive weights) take a
:class:`SparseTeacher` in place of teacher logits; the vocab-parallel losses take it on every rank
and materialize only the rank's columns (contiguous, or permuted by a P-KL plan).  Parity is
checked on values and on the student's gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import Teacher, multi_teacher
from nemo_xtoken.losses import reference as ref
from nemo_xtoken.offline import FLOOR, SparseTeacher, sparse_from_logits
from nemo_xtoken.parallel import PKLPlan, teacher_permutation
from nemo_xtoken.testing import run_distributed
from tests.test_parallel import VS, VS_PAD, VT, VT_PAD, random_alignment, random_projection

LOSS_NAMES = ("kl", "p_kl", "uld", "gold", "h_kl")


def _logits(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


EPS32 = torch.finfo(torch.float32).eps


def _targets(n: int, v: int, seed: int) -> torch.Tensor:
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


# ---- the sparse distribution itself ---------------------------------------------------------------


def test_entries_and_rest_mass_are_exact():
    x = _logits(20, VT, 1)
    lp = torch.log_softmax(x.double(), -1)
    st = sparse_from_logits(x.double(), 5)
    assert st.k == 5 and st.vocab_size == VT
    top = torch.topk(lp, 5, dim=-1)
    assert torch.equal(st.ids, top.indices)
    torch.testing.assert_close(st.log_probs, top.values, rtol=0, atol=1e-12)
    rest = torch.log1p(-top.values.exp().sum(-1))  # the cancellation-prone formula, for comparison only
    torch.testing.assert_close(st.rest_log_mass, rest, rtol=0, atol=1e-9)
    dense = st.dense()
    assert dense.shape == (20, VT)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)
    # a normalized distribution: log_softmax leaves it as it is
    torch.testing.assert_close(torch.log_softmax(dense, -1), dense, rtol=0, atol=1e-12)


def test_next_token_is_kept_when_outside_the_top_k():
    x = _logits(50, VT, 2)
    tg = _targets(50, VT, 3)
    tg[7] = -1  # no next token (end of a document)
    st = sparse_from_logits(x, 4, targets=tg)
    assert st.k == 5
    lp = torch.log_softmax(x, -1)
    dense = st.dense()
    for i in range(50):
        if i == 7:
            assert torch.equal(st.ids[i], torch.topk(lp[i], 5).indices)
            continue
        assert int(tg[i]) in st.ids[i].tolist()
        # the target's own log-probability (a few float32 ulps of its magnitude, ~10 here), not the rest
        # spread (which differs by O(1)): log_softmax and the sparse path may round differently
        torch.testing.assert_close(dense[i, tg[i]], lp[i, tg[i]], rtol=8 * EPS32, atol=0)
    # a sum of VT float32 probabilities: rounding grows with the number of terms
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(50), rtol=0, atol=VT * EPS32)
    st.check()


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_total_variation_is_bounded_by_the_rest_mass(k):
    """TV(p_T, p̂_T) = ½ Σ_rest |p - r/(V-k)| ≤ r, per position (the documented bound)."""
    x = _logits(64, VT, 4, scale=4.0).double()
    p = torch.softmax(x, -1)
    st = sparse_from_logits(x, k)
    tv = 0.5 * (st.dense().exp() - p).abs().sum(-1)
    r = st.rest_log_mass.exp()
    assert bool((tv <= r + 1e-12).all())
    assert float(tv.max()) > 0  # the bound is not vacuous: the approximation differs


def test_k_equal_to_vocabulary_is_the_live_distribution():
    x = _logits(10, VT, 5)
    st = sparse_from_logits(x, VT)
    assert bool(torch.isneginf(st.rest_log_mass).all())
    torch.testing.assert_close(st.dense(), torch.log_softmax(x, -1), rtol=1e-6, atol=1e-5)
    assert bool((st.rest_log_prob() == FLOOR).all())


def test_shards_and_permuted_columns():
    x = _logits(6, VT, 6)
    st = sparse_from_logits(x, 9)
    full = st.dense()
    padded = st.dense(start=0, width=VT_PAD)
    torch.testing.assert_close(padded[:, :VT], full)
    assert bool((padded[:, VT:] == FLOOR).all())
    assert float(torch.exp(padded[:, VT:]).sum()) == 0.0
    w = VT_PAD // 4
    parts = [st.dense(start=r * w, width=w) for r in range(4)]
    assert torch.equal(torch.cat(parts, 1), padded)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(VT_PAD))
    assert torch.equal(st.dense(column_ids=perm), padded[:, perm])


def test_truncate_moves_mass_exactly():
    x = _logits(8, VT, 7).double()
    a = sparse_from_logits(x, 3)
    b = sparse_from_logits(x, 12).truncate(3)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.rest_log_mass, b.rest_log_mass, rtol=0, atol=1e-12)


def test_bad_sparse_teachers_are_refused():
    ids = torch.tensor([[1, 2], [3, 3]])
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25]]))
    rest = torch.log(torch.tensor([0.25, 0.25]))
    with pytest.raises(XTokenError, match="position 1 lists a token id twice"):
        SparseTeacher(ids, lp, rest, 10).check()
    with pytest.raises(XTokenError, match=r"\[0, 3\)"):
        SparseTeacher(torch.tensor([[1, 2], [0, 3]]), lp, rest, 3).check()
    with pytest.raises(XTokenError, match="rest_log_mass"):
        SparseTeacher(ids, lp, rest[:1], 10)
    with pytest.raises(XTokenError, match="3 entries per position for a vocabulary of 2"):
        SparseTeacher(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), torch.zeros(1), 2)
    with pytest.raises(XTokenError, match="do not belong together"):
        sparse_from_logits(torch.zeros(2, 5), 2, vocab_size=6)


# ---- reference losses: k = V equals the live teacher ---------------------------------------------


def _ref_cases():
    rng = np.random.default_rng(0)
    al = random_alignment(rng, VS, VT)
    al_same = random_alignment(np.random.default_rng(1), VS, VS)
    ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 5]] = False
    W = random_projection()
    out = []
    for name in LOSS_NAMES:
        same = name == "kl"
        vt, vtp = (VS, VS_PAD) if same else (VT, VT_PAD)
        a = al_same if same else al
        kw = dict(student_vocab_size=VS, teacher_vocab_size=vt) if name in ("kl", "uld") else {}
        for tag, n_s, n_t, opts in (
            ("plain", 12, 12, {}),
            ("mask-T2-sum", 12, 12, dict(mask=mask, temperature=2.0, reduction="sum")),
            ("chain", a.student_chunk_ids.numel() if same else ns, a.teacher_chunk_ids.numel() if same else nt, dict(alignment=a)),
            ("mean-none", a.student_chunk_ids.numel() if same else ns, a.teacher_chunk_ids.numel() if same else nt,
             dict(alignment=a, merge="mean", reduction="none")),
        ):
            out.append(dict(loss=name, tag=tag, vt=vt, vtp=vtp, kw=kw, opts=opts, n_s=n_s, n_t=n_t,
                            W=W if name in ("p_kl", "gold", "h_kl") else None, seed=len(out)))
    return out


def _run_ref(case, teacher):
    s = _logits(case["n_s"], VS_PAD, 100 + case["seed"]).requires_grad_(True)
    args = (s, teacher) if case["W"] is None else (s, teacher, case["W"])
    val = ref.LOSSES[case["loss"]](*args, **case["kw"], **case["opts"])
    wts = torch.linspace(0.5, 1.5, val.numel()).reshape(val.shape)
    (val * wts).sum().backward()
    return val.detach(), s.grad


@pytest.mark.parametrize("case", _ref_cases(), ids=lambda c: f"{c['loss']}-{c['tag']}")
def test_reference_losses_full_k_equal_live(case):
    t = _logits(case["n_t"], case["vtp"], 200 + case["seed"])
    live_v, live_g = _run_ref(case, t)
    st = sparse_from_logits(t, case["vt"], vocab_size=case["vt"])
    v, g = _run_ref(case, st)
    torch.testing.assert_close(v, live_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, live_g, rtol=1e-5, atol=1e-6)
    assert float(live_g.abs().max()) > 1e-4


def test_reference_losses_small_k_error_is_small_and_measured():
    """k < V: the loss moves (the approximation is real) but stays close for a peaked teacher."""
    W = random_projection()
    t = _logits(40, VT_PAD, 9, scale=6.0)  # peaked, like a trained LM
    s = _logits(40, VS_PAD, 10, scale=2.0)
    live = ref.p_kl(s, t, W)
    errs = []
    for k in (4, 16, 64):
        st = sparse_from_logits(t, k, vocab_size=VT)
        errs.append(abs(float(ref.p_kl(s, st, W)) - float(live)) / float(live))
    assert errs[0] > 0 and errs[-1] < errs[0]
    assert errs[1] < 0.05  # 16 of 70 tokens of a peaked teacher: within 5 %


def test_multi_teacher_with_a_cached_teacher_equals_live():
    """Mixed live + sparse teachers, static and adaptive weights: k = V equals two live teachers."""
    rng = np.random.default_rng(3)
    al = random_alignment(rng, VS, VT)
    ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
    W = random_projection()
    t1 = _logits(nt, VT_PAD, 11)
    t2 = _logits(nt, VT_PAD, 12)
    teachers = [Teacher("p_kl", W, 0.7), Teacher("h_kl", W, 0.3)]
    for weighting in ("static", "ce", "entropy", "max_prob"):
        outs = []
        for second in (t2, sparse_from_logits(t2, VT, vocab_size=VT, targets=al.teacher_targets)):
            s = _logits(ns, VS_PAD, 13).requires_grad_(True)
            o = multi_teacher(s, [t1, second], teachers, alignments=[al, al], weighting=weighting)
            o.loss.backward()
            outs.append((o.loss.detach(), o.alphas, s.grad))
        for a, b in zip(outs[0], outs[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=weighting)


# ---- tensor parallel: every rank materializes its shard -------------------------------------------


def _tp_cases():
    cases = []
    rng = np.random.default_rng(5)
    al = random_alignment(rng, VS, VT)
    ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
    for name in LOSS_NAMES:
        vt, vtp = (VS, VS_PAD) if name == "kl" else (VT, VT_PAD)
        kw = dict(student_vocab_size=VS, teacher_vocab_size=vt) if name in ("kl", "uld") else {}
        a = None if name == "kl" else al
        n_s, n_t = (12, 12) if a is None else (ns, nt)
        for k in (vt, 7):
            cases.append(dict(loss=name, k=k, vt=vt, vtp=vtp, kw=kw, alignment=a, n_s=n_s, n_t=n_t, seed=len(cases)))
    cases.append(dict(loss="p_kl", k=VT, vt=VT, vtp=VT_PAD, kw={}, alignment=al, n_s=ns, n_t=nt, seed=len(cases), permute=True))
    cases.append(dict(loss="p_kl", k=5, vt=VT, vtp=VT_PAD, kw={}, alignment=al, n_s=ns, n_t=nt, seed=len(cases), permute=True))
    cases.append(dict(loss="multi", k=6, vt=VT, vtp=VT_PAD, kw={}, alignment=al, n_s=ns, n_t=nt, seed=len(cases)))
    for c in cases:
        c["s"] = _logits(c["n_s"], VS_PAD, 300 + c["seed"])
        c["t"] = _logits(c["n_t"], c["vtp"], 400 + c["seed"], scale=5.0)
        targets = None if c["alignment"] is None else c["alignment"].teacher_targets
        c["sparse"] = sparse_from_logits(c["t"], c["k"], vocab_size=c["vt"], targets=targets if c["k"] < c["vt"] else None)
    return cases


def _ref_value(case, teacher):
    s = case["s"].clone().requires_grad_(True)
    W = random_projection()
    if case["loss"] == "multi":
        o = multi_teacher(s, [teacher, teacher], [Teacher("p_kl", W, 0.5), Teacher("gold", W, 0.5)],
                          alignments=[case["alignment"]] * 2, weighting="entropy")
        val = o.loss
    else:
        args = (s, teacher) if case["loss"] in ("kl", "uld") else (s, teacher, W)
        val = ref.LOSSES[case["loss"]](*args, alignment=case["alignment"], **case["kw"])
    val.backward()
    return val.detach(), s.grad


def _tp_rank(rank, world, cases):
    import nemo_xtoken.parallel as P

    W = random_projection()
    out = []
    for c in cases:
        ws = VS_PAD // world
        s = c["s"][:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
        if c["loss"] == "multi":
            plan = PKLPlan.build(W, world, VS_PAD, VT_PAD)
            o = P.vocab_parallel_multi_teacher(s, [c["sparse"], c["sparse"]], [Teacher("p_kl", plan, 0.5), Teacher("gold", W, 0.5)],
                                               alignments=[c["alignment"]] * 2, weighting="entropy")
            val = o.loss
        elif c["loss"] == "p_kl":
            perm = teacher_permutation(W, world, VS_PAD, VT_PAD) if c.get("permute") else None
            plan = PKLPlan.build(W, world, VS_PAD, VT_PAD, teacher_perm=perm)
            val = P.vocab_parallel_p_kl(s, c["sparse"], plan, alignment=c["alignment"])
        else:
            fn = {"kl": P.vocab_parallel_kl, "uld": P.vocab_parallel_uld, "gold": P.vocab_parallel_gold, "h_kl": P.vocab_parallel_h_kl}[c["loss"]]
            args = (s, c["sparse"]) if c["loss"] in ("kl", "uld") else (s, c["sparse"], W)
            val = fn(*args, alignment=c["alignment"], **c["kw"])
        val.backward()
        out.append((val.detach(), s.grad))
    return out


@pytest.fixture(scope="module")
def tp_cases():
    return _tp_cases()


@pytest.mark.parametrize("tp", (1, 2))
def test_parallel_losses_take_sparse_teachers(tp, tp_cases):
    """k = V: equal to the live reference; k < V: equal to the reference on the same sparse teacher."""
    per_rank = [_tp_rank(0, 1, tp_cases)] if tp == 1 else run_distributed(_tp_rank, tp, tp_cases, timeout=300)
    for i, c in enumerate(tp_cases):
        want_v, want_g = _ref_value(c, c["t"] if c["k"] == c["vt"] else c["sparse"])
        tag = f"{c['loss']} k={c['k']}{' permuted' if c.get('permute') else ''} tp={tp}"
        for r in range(tp):
            torch.testing.assert_close(per_rank[r][i][0], want_v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} rank {r}: {m}")
        g = torch.cat([per_rank[r][i][1] for r in range(tp)], dim=1)
        torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} gradient: {m}")
        if c["k"] < c["vt"]:  # the sparse teacher really differs from the live one
            live_v, _ = _ref_value(c, c["t"])
            assert not math.isclose(float(live_v), float(want_v), rel_tol=1e-6), tag
