"""Reference losses against the dense brute force (values and gradients, float64), plus edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nemo_xtoken.align import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import gold, h_kl, kl, p_kl, resolve_projection, uld
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_MULTI, Projection
from tests import test_losses_bruteforce as bf

# Small W (7 student ids, 6 teacher ids) with every case a hybrid loss meets:
# exact rows, two exact rows on one teacher token (GOLD keeps the lower), multi-token rows,
# a multi-token row sharing its top-1 with exact rows (H-KL sums them), an empty row.
V_S, V_T = 7, 6
ROWS: list[list[tuple[int, float]]] = [
    [(0, 1.0)],
    [(2, 1.0)],
    [(2, 1.0)],
    [(1, 0.7), (3, 0.3)],
    [],
    [(2, 0.6), (4, 0.3), (5, 0.1)],
    [(3, 1.0)],
]
KINDS = [ROW_EXACT, ROW_EXACT, ROW_EXACT, ROW_MULTI, ROW_EMPTY, ROW_MULTI, ROW_EXACT]


def make_projection(rows=ROWS, kinds=KINDS, v_t=V_T) -> Projection:
    """A :class:`Projection` written by hand (fingerprints are placeholders)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.array([t for r in rows for t, _ in r], dtype=np.int32)
    data = np.array([w for r in rows for _, w in r], dtype=np.float32)
    return Projection(indptr, indices, data, np.array(kinds, dtype=np.uint8), len(rows), v_t, "s" * 64, "t" * 64)


def make_csr(rows=ROWS, v_s=V_S, v_t=V_T, dtype=torch.float64) -> torch.Tensor:
    crow = torch.tensor([0] + list(np.cumsum([len(r) for r in rows])), dtype=torch.int64)
    col = torch.tensor([t for r in rows for t, _ in r], dtype=torch.int64)
    val = torch.tensor([w for r in rows for _, w in r], dtype=dtype)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=(v_s, v_t), check_invariants=False)


def hand_alignment(merge_targets_seed: int = 0) -> tuple[AlignedPositions, dict]:
    """6 student and 7 teacher positions; multi-position chunks on both sides; chunk 3 is student-only,
    chunk 4 has no position at all, so only chunks 0-2 count."""
    g = torch.Generator().manual_seed(merge_targets_seed)
    s_ids = [0, 1, 1, -1, 2, 3]
    t_ids = [0, 0, 1, 2, 2, 2, -1]
    s_tg = torch.randint(0, V_S, (6,), generator=g).tolist()
    t_tg = torch.randint(0, V_T, (7,), generator=g).tolist()
    s_tg[3] = -100  # outside every chunk: never read
    a = AlignedPositions(torch.tensor(s_ids), torch.tensor(t_ids), torch.tensor(s_tg), torch.tensor(t_tg), 5)
    return a, {"n_chunks": 5, "s_ids": s_ids, "t_ids": t_ids, "s_tg": s_tg, "t_tg": t_tg}


def bf_loss(name, s_logits, t_logits, *, v_s, v_t, temperature, chunks, mask, reduction, mw=1.0, uw=1.0):
    its = bf.items(s_logits, t_logits, v_s, v_t, temperature, chunks, mask)
    w = bf.dense_w(ROWS, V_S, V_T)
    values = []
    for ps, pt, counted in its:
        if not counted:
            values.append(s_logits.new_zeros(()))
            continue
        if name == "kl":
            values.append(bf.kl_item(ps[:v_s], pt[:v_t]))
        elif name == "p_kl":
            values.append(bf.pkl_item(ps[:V_S], pt[:V_T], w, renormalize=chunks is not None and chunks["merge"] == "reference"))
        elif name == "uld":
            values.append(bf.sorted_l1(ps[:v_s], pt[:v_t]))
        elif name == "gold":
            groups = {t: [s] for s, t in bf.gold_pairs(ROWS, [k == ROW_EXACT for k in KINDS])}
            values.append(bf.hybrid_item(ps[:V_S], pt[:V_T], groups, V_S, V_T, mw, uw))
        elif name == "h_kl":
            values.append(bf.hybrid_item(ps[:V_S], pt[:V_T], bf.top1_groups(ROWS), V_S, V_T, mw, uw))
    return bf.reduce(values, [c for _, _, c in its], reduction, s_logits)


def call_ref(name, s, t, w, **kw):
    if name == "kl":
        return kl(s, t, student_vocab_size=V_S, teacher_vocab_size=V_S, **kw)
    if name == "uld":
        return uld(s, t, student_vocab_size=V_S, teacher_vocab_size=V_T, **kw)
    return {"p_kl": p_kl, "gold": gold, "h_kl": h_kl}[name](s, t, w, **kw)


def logits(n, width, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, width, generator=g, dtype=torch.float64)).requires_grad_(True)


def grads(out, s, t, seed=7):
    if out.dim() == 1:  # "none": a random weighting checks every item's gradient
        g = torch.Generator().manual_seed(seed)
        out = (out * torch.rand(out.shape, generator=g, dtype=out.dtype)).sum()
    g = torch.autograd.grad(out, (s, t), allow_unused=True)
    return tuple(torch.zeros_like(x) if gx is None else gx for x, gx in zip((s, t), g))  # unused = zero gradient


@pytest.mark.parametrize("name", ["kl", "p_kl", "uld", "gold", "h_kl"])
@pytest.mark.parametrize("align", [None, "chain", "mean", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pad", [False, True])
def test_matches_bruteforce(name, align, reduction, pad):
    v_t = V_S if name == "kl" else V_T
    ws, wt = (V_S + 2, v_t + 3) if pad else (V_S, v_t)
    temperature = 1.7 if pad else 1.0
    n_s, n_t = (6, 7) if align else (6, 6)
    s, t = logits(n_s, ws, 1), logits(n_t, wt, 2)
    chunks = mask = alignment = None
    kw = dict(reduction=reduction, temperature=temperature)
    if align:
        alignment, chunks = hand_alignment()
        chunks["merge"] = align
        if name == "kl":
            alignment.teacher_targets.clamp_(max=V_S - 1)
            chunks["t_tg"] = alignment.teacher_targets.tolist()
        kw.update(alignment=alignment, merge=align)
    else:
        mask = [True, False, True, True, False, True]
        kw.update(mask=torch.tensor(mask))
    got = call_ref(name, s, t, make_csr(), **kw)
    want = bf_loss(name, s, t, v_s=V_S, v_t=v_t, temperature=temperature, chunks=chunks, mask=mask, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got, g_want = grads(got, s, t), grads(want, s, t)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if pad:  # padded columns carry no gradient
        assert torch.all(g_got[0][:, V_S:] == 0) and torch.all(g_got[1][:, v_t:] == 0)


@pytest.mark.parametrize("name", ["gold", "h_kl"])
def test_hybrid_weights_and_trl_adaptive(name):
    s, t = logits(5, V_S, 3), logits(5, V_T, 4)
    got = call_ref(name, s, t, make_csr(), matched_weight=0.3, unmatched_weight=2.0)
    want = bf_loss(name, s, t, v_s=V_S, v_t=V_T, temperature=1.0, chunks=None, mask=None, reduction="mean", mw=0.3, uw=2.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    n_common = 3 if name == "gold" else 4  # teacher tokens {0,2,3} / {0,1,2,3}
    got = call_ref(name, s, t, make_csr(), matched_weight=None, unmatched_weight=None)
    mw = n_common / V_T
    want = bf_loss(name, s, t, v_s=V_S, v_t=V_T, temperature=1.0, chunks=None, mask=None, reduction="mean", mw=mw, uw=1 - mw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(XTokenError, match="both"):
        call_ref(name, s, t, make_csr(), matched_weight=None)


@pytest.mark.parametrize("name", ["p_kl", "gold", "h_kl"])
def test_projection_object_equals_csr_tensor(name):
    s, t = logits(4, V_S + 1, 5), logits(4, V_T + 1, 6)
    a = call_ref(name, s, t, make_projection())
    b = call_ref(name, s, t, make_csr(dtype=torch.float32))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # A CSR padded to the logits' widths plus the real sizes is the same W.
    pw = make_projection().to_torch(student_padded=V_S + 1, teacher_padded=V_T + 1)
    c = call_ref(name, s, t, pw, student_vocab_size=V_S, teacher_vocab_size=V_T)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_temperature_squared_scaling_and_3d_input():
    s, t = logits(6, V_S, 8), logits(6, V_T, 9)
    a = p_kl(s, t, make_csr(), temperature=2.0)
    b = p_kl(s, t, make_csr(), temperature=2.0, scale_by_temperature_squared=True)
    torch.testing.assert_close(b, 4 * a)
    c = p_kl(s.reshape(2, 3, V_S), t.reshape(2, 3, V_T), make_csr(), temperature=2.0, mask=torch.ones(2, 3))
    torch.testing.assert_close(c, a)
    assert p_kl(s.reshape(2, 3, V_S), t.reshape(2, 3, V_T), make_csr(), reduction="none").shape == (6,)


def test_kl_is_zero_for_equal_distributions_and_pkl_identity_is_kl():
    s = logits(4, 5, 10)
    assert float(kl(s, s.detach().clone()).detach()) == pytest.approx(0.0, abs=1e-14)
    t = logits(4, 5, 11)
    ident = torch.eye(5, dtype=torch.float64).to_sparse_csr()
    torch.testing.assert_close(p_kl(s, t, ident), kl(s, t))
    # With a one-to-one exact W, GOLD and H-KL have no remainder: they are the KL too.
    torch.testing.assert_close(gold(s, t, ident), kl(s, t))
    torch.testing.assert_close(h_kl(s, t, ident), kl(s, t))


def test_pkl_lost_mass_and_eps_floor():
    # Student row 1 is empty: its mass is lost.  Teacher token 2 is never reached: log floor EPS.
    rows = [[(0, 1.0)], [], [(1, 0.5), (0, 0.5)]]
    w = make_csr(rows, 3, 3)
    s = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.5, 0.0, -0.5]], dtype=torch.float64)
    ps, pt = torch.softmax(s, 1)[0], torch.softmax(t, 1)[0]
    q = torch.stack([ps[0] + 0.5 * ps[2], 0.5 * ps[2], ps.new_zeros(())])
    want = (pt * (pt.log() - torch.log(q.clamp(min=1e-12)))).sum()
    got = p_kl(s, t, w)
    torch.testing.assert_close(got, want)
    assert float(q.sum()) < 1.0  # mass lost, not renormalized
    assert float(got) > float(pt[2]) * 27.0  # the EPS floor dominates: -log(1e-12) ≈ 27.6 times p_T[2]
    (g,) = torch.autograd.grad(got, s)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["kl", "p_kl", "uld", "gold", "h_kl"])
def test_empty_and_all_masked_give_zero_loss_zero_grads(name):
    v_t = V_S if name == "kl" else V_T
    cases = []
    s, t = logits(0, V_S, 1), logits(0, v_t, 2)
    cases.append((s, t, {}))
    s, t = logits(4, V_S, 1), logits(4, v_t, 2)
    cases.append((s, t, {"mask": torch.zeros(4)}))
    s, t = logits(3, V_S, 1), logits(3, v_t, 2)
    only_student = AlignedPositions(torch.tensor([0, 0, 1]), torch.tensor([-1, -1, -1]), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)
    cases.append((s, t, {"alignment": only_student}))
    s, t = logits(0, V_S, 1), logits(0, v_t, 2)
    z = torch.zeros(0, dtype=torch.long)
    for merge in ("chain", "mean", "reference"):
        cases.append((s, t, {"alignment": AlignedPositions(z, z, z, z, 2), "merge": merge}))
    for s, t, kw in cases:
        for reduction in ("mean", "sum"):
            out = call_ref(name, s, t, make_csr(), reduction=reduction, **kw)
            assert out.shape == () and float(out) == 0.0 and not torch.isnan(out)
            gs, gt = torch.autograd.grad(out, (s, t))
            assert torch.all(gs == 0) and torch.all(gt == 0)
        none = call_ref(name, s, t, make_csr(), reduction="none", **kw)
        assert torch.all(none == 0)


def test_bf16_inputs_computed_in_float32():
    s, t = logits(5, V_S, 12), logits(5, V_T, 13)
    ref = p_kl(s, t, make_csr())
    low = p_kl(s.detach().bfloat16(), t.detach().bfloat16(), make_projection())
    assert low.dtype == torch.float32
    assert abs(float(low) - float(ref)) < 3e-2 * max(1.0, float(ref))


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    s, t = logits(3, V_S, 1), logits(3, V_T, 2)
    w = make_csr()
    with pytest.raises(XTokenError, match=r"student_logits \(3, 5\).*narrower"):
        p_kl(s[:, :5], t, w)
    with pytest.raises(XTokenError, match=r"teacher_logits \(3, 4\).*narrower"):
        gold(s, t[:, :4], w)
    with pytest.raises(XTokenError, match=r"other tokenizers"):
        p_kl(s, t, make_projection(), student_vocab_size=V_S + 1)
    with pytest.raises(XTokenError, match=r"other tokenizers"):
        h_kl(s, t, w, teacher_vocab_size=V_T + 2)
    bad = s.detach().clone()
    bad[1, 2] = float("nan")
    with pytest.raises(XTokenError, match=r"student_logits \(3, 7\) holds 1 NaN/inf.*row 1"):
        p_kl(bad, t, w)
    badt = t.detach().clone()
    badt[2, 0] = float("inf")
    with pytest.raises(XTokenError, match=r"teacher_logits \(3, 6\) holds 1 NaN/inf"):
        uld(s, badt)
    with pytest.raises(XTokenError, match="different numbers of positions"):
        p_kl(s, t[:2], w)
    with pytest.raises(XTokenError, match="one tokenizer"):
        kl(s, t)
    with pytest.raises(XTokenError, match=r"mask \(2,\)"):
        kl(s, s.detach(), mask=torch.ones(2))
    with pytest.raises(XTokenError, match="reduction"):
        kl(s, s.detach(), reduction="avg")
    with pytest.raises(XTokenError, match="temperature"):
        kl(s, s.detach(), temperature=0.0)
    with pytest.raises(XTokenError, match="projection must be"):
        p_kl(s, t, w.to_dense())
    a, _ = hand_alignment()
    with pytest.raises(XTokenError, match="do not match"):
        p_kl(s, t, w, alignment=a)
    with pytest.raises(XTokenError, match="mask cannot be combined"):
        p_kl(logits(6, V_S, 1), logits(7, V_T, 2), w, alignment=a, mask=torch.ones(6))
    a.teacher_targets[0] = V_T + 5
    with pytest.raises(XTokenError, match=r"teacher_targets hold token ids outside \[0, 6\)"):
        p_kl(logits(6, V_S, 1), logits(7, V_T, 2), w, alignment=a)


def test_resolve_projection_exact_rows_and_top1():
    w = resolve_projection(make_csr())
    assert w.exact_rows.tolist() == [True, True, True, False, False, False, True]
    assert w.top1().tolist() == [0, 2, 2, 1, -1, 2, 3]
    p = resolve_projection(make_projection())
    assert p.exact_rows.tolist() == w.exact_rows.tolist() and p.top1().tolist() == w.top1().tolist()


@pytest.mark.parametrize("name", ["p_kl", "gold", "h_kl"])
def test_resolved_sparse_w_is_accepted_and_caches_common_sets(name):
    s, t = logits(4, V_S, 14), logits(4, V_T, 15)
    sw = resolve_projection(make_projection())
    torch.testing.assert_close(call_ref(name, s, t, sw), call_ref(name, s, t, make_projection()))
    if name != "p_kl":
        first = sw.cache["exact_common_set" if name == "gold" else "top1_common_set"]
        call_ref(name, s, t, sw)
        assert sw.cache["exact_common_set" if name == "gold" else "top1_common_set"] is first
    with pytest.raises(XTokenError, match="other tokenizers"):
        call_ref(name, s, t, sw, student_vocab_size=V_S - 1)


@pytest.mark.parametrize("name", ["p_kl", "gold", "h_kl"])
def test_memory_invariant_no_dense_w_no_n_vs_vt(name):
    """Largest single allocation stays at the size of the logits / W's non-zeros, far from V_S × V_T."""
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(0)
    v_s, v_t, n = 20_000, 30_000, 4
    rows = []
    for i in range(v_s):
        k = int(rng.integers(0, 4))
        cols = rng.choice(v_t, size=k, replace=False)
        rows.append([(int(c), 1.0 / k) for c in cols])
    kinds = [ROW_EXACT if len(r) == 1 else ROW_MULTI if r else ROW_EMPTY for r in rows]
    w = make_projection(rows, kinds, v_t)
    s = torch.randn(n, v_s + 64, requires_grad=True)
    t = torch.randn(n, v_t + 64)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call_ref(name, s, t, w).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    dense_w_bytes = v_s * v_t * 4
    print(f"{name}: largest single allocation {biggest} bytes, dense W {dense_w_bytes} bytes")
    assert 0 < biggest < 64 * 2**20 < dense_w_bytes // 32, (biggest, dense_w_bytes)


# ---- random W, random sizes (hypothesis) ------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def random_case(draw):
    v_s = draw(st.integers(2, 6))
    v_t = draw(st.integers(2, 6))
    rows = []
    for _ in range(v_s):
        k = draw(st.integers(0, min(3, v_t)))
        cols = draw(st.lists(st.integers(0, v_t - 1), min_size=k, max_size=k, unique=True))
        ws = draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k))
        total = sum(ws)
        rows.append([(c, x / total) for c, x in zip(cols, ws)])
    n = draw(st.integers(0, 4))
    pad_s, pad_t = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    temperature = draw(st.sampled_from([0.5, 1.0, 3.0]))
    return v_s, v_t, rows, n, pad_s, pad_t, seed, temperature


@settings(max_examples=40, deadline=None)
@given(random_case(), st.sampled_from(["p_kl", "h_kl", "gold"]))
def test_random_w_matches_bruteforce(case, name):
    v_s, v_t, rows, n, pad_s, pad_t, seed, temperature = case
    s, t = logits(n, v_s + pad_s, seed), logits(n, v_t + pad_t, seed + 1)
    w = make_csr(rows, v_s, v_t)
    got = {"p_kl": p_kl, "h_kl": h_kl, "gold": gold}[name](s, t, w, temperature=temperature, reduction="sum")
    dense = bf.dense_w(rows, v_s, v_t)
    exact = [len(r) == 1 and r[0][1] == 1.0 for r in rows]
    want = s.new_zeros(())
    for i in range(n):
        ps, pt = bf.probs(s[i], v_s, temperature)[:v_s], bf.probs(t[i], v_t, temperature)[:v_t]
        if name == "p_kl":
            want = want + bf.pkl_item(ps, pt, dense)
        elif name == "h_kl":
            want = want + bf.hybrid_item(ps, pt, bf.top1_groups(rows), v_s, v_t, 1.0, 1.0)
        else:
            groups = {tt: [ss] for ss, tt in bf.gold_pairs(rows, exact)}
            want = want + bf.hybrid_item(ps, pt, groups, v_s, v_t, 1.0, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if n:
        for a, b in zip(grads(got, s, t), grads(want, s, t)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def _random_alignment_case(seed: int):
    """A random W, loss, sizes, padding, temperature, reduction and a random monotone alignment."""
    import random

    r = random.Random(seed)
    name = r.choice(["kl", "p_kl", "uld", "gold", "h_kl"])
    v_s = r.randint(2, 6)
    v_t = v_s if name == "kl" else r.randint(2, 6)
    rows = []
    for _ in range(v_s):
        cols = r.sample(range(v_t), r.randint(0, min(3, v_t)))
        ws = [r.uniform(0.05, 1.0) for _ in cols]
        rows.append([(c, x / sum(ws)) for c, x in zip(cols, ws)])
    k = r.randint(1, 4)

    def chunk_ids(n):
        out, c = [], 0
        for _ in range(n):
            if r.random() < 0.2:
                out.append(-1)
                continue
            if r.random() < 0.4:
                c = min(k - 1, c + 1)
            out.append(c)
        return out

    n_s, n_t = r.randint(0, 6), r.randint(0, 6)
    chunks = {
        "n_chunks": k, "s_ids": chunk_ids(n_s), "t_ids": chunk_ids(n_t),
        "s_tg": [r.randrange(v_s) for _ in range(n_s)], "t_tg": [r.randrange(v_t) for _ in range(n_t)],
        "merge": r.choice(["chain", "mean", "reference"]),
    }
    return name, v_s, v_t, rows, chunks, r.choice([0.7, 1.0, 2.0]), r.randint(0, 2), r.randint(0, 2), r.choice(REDUCTIONS_ALL)


REDUCTIONS_ALL = ["mean", "sum", "none"]


@pytest.mark.parametrize("seed", range(40))
def test_random_alignments_match_bruteforce(seed):
    name, v_s, v_t, rows, ch, temperature, pad_s, pad_t, reduction = _random_alignment_case(seed)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    a = AlignedPositions(long(ch["s_ids"]), long(ch["t_ids"]), long(ch["s_tg"]), long(ch["t_tg"]), ch["n_chunks"])
    s = logits(len(ch["s_ids"]), v_s + pad_s, seed)
    t = logits(len(ch["t_ids"]), v_t + pad_t, seed + 1000)
    kw = dict(alignment=a, merge=ch["merge"], temperature=temperature, reduction=reduction)
    if name in ("kl", "uld"):
        got = {"kl": kl, "uld": uld}[name](s, t, student_vocab_size=v_s, teacher_vocab_size=v_t, **kw)
    else:
        got = {"p_kl": p_kl, "gold": gold, "h_kl": h_kl}[name](s, t, make_csr(rows, v_s, v_t), **kw)
    dense = bf.dense_w(rows, v_s, v_t)
    exact = [len(x) == 1 and x[0][1] == 1.0 for x in rows]
    its = bf.items(s, t, v_s, v_t, temperature, ch, None)
    vals = []
    for ps, pt, counted in its:
        if not counted:
            vals.append(s.new_zeros(()))
            continue
        ps, pt = ps[:v_s], pt[:v_t]
        if name == "kl":
            vals.append(bf.kl_item(ps, pt))
        elif name == "uld":
            vals.append(bf.sorted_l1(ps, pt))
        elif name == "p_kl":
            vals.append(bf.pkl_item(ps, pt, dense, renormalize=ch["merge"] == "reference"))
        elif name == "h_kl":
            vals.append(bf.hybrid_item(ps, pt, bf.top1_groups(rows), v_s, v_t, 1.0, 1.0))
        else:
            vals.append(bf.hybrid_item(ps, pt, {tt: [ss] for ss, tt in bf.gold_pairs(rows, exact)}, v_s, v_t, 1.0, 1.0))
    want = bf.reduce(vals, [c for _, _, c in its], reduction, s)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    g_want = grads(want, s, t) if want.requires_grad else (torch.zeros_like(s), torch.zeros_like(t))
    for x, y in zip(grads(got, s, t), g_want):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11)
