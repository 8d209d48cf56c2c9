"""Vocab-parallel losses on gloo (tp ∈ {1, 2, 4}) against the single-device references.

Every case runs on spawned gloo ranks, each holding its Megatron-layout vocabulary shard; the
loss value must equal the reference on every rank and each rank's gradient on its shard must be
exactly the slice of the reference gradient (the TP convention of the README: not tp
times it).  All cases of one tp run in one spawn to keep the file fast.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nemo_xtoken.align.merge import AlignedPositions, positions_from_token_chunks
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import reference as ref
from nemo_xtoken.parallel import PKLPlan, teacher_permutation
from nemo_xtoken.testing import run_distributed
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_MULTI, Projection

VS, VS_PAD = 50, 64  # student: real ids, padded model vocabulary (divisible by 1, 2, 4)
VT, VT_PAD = 70, 80
VK, VK_PAD = 60, 64  # same-tokenizer KL
TPS = (1, 2, 4)
LOSS_NAMES = ("kl", "p_kl", "uld", "gold", "h_kl")
_IMPORTED_IN_PID = os.getpid()  # which process executed this module (see test_ranks_fork_from_a_server_that_imported_the_test_module)


def random_projection(seed: int = 0) -> Projection:
    """A small W with exact rows (two sharing one teacher id), multi-token rows and empty rows."""
    rng = np.random.default_rng(seed)
    targets = rng.permutation(VT)
    indptr, indices, data, kind = [0], [], [], []
    for s in range(VS):
        if s < 30:
            t = int(targets[s]) if s != 7 else int(targets[3])  # rows 3 and 7: exact on one teacher id
            indices.append(t), data.append(1.0), kind.append(ROW_EXACT)
        elif s < 45:
            L = int(rng.integers(2, 5))
            ts = rng.choice(targets[30:-1], size=L, replace=False)
            ts[1] = targets[-1]  # a hub teacher token (like a digit): partial sums beat sending rows
            w = 0.9 * 0.1 ** np.arange(L)
            w = w / w.sum()
            indices.extend(int(x) for x in ts), data.extend(float(x) for x in w), kind.append(ROW_MULTI)
        else:
            kind.append(ROW_EMPTY)
        indptr.append(len(indices))
    return Projection(
        indptr=np.asarray(indptr, dtype=np.int64), indices=np.asarray(indices, dtype=np.int32),
        data=np.asarray(data, dtype=np.float32), row_kind=np.asarray(kind, dtype=np.uint8),
        student_vocab_size=VS, teacher_vocab_size=VT, student_fingerprint="test-s", teacher_fingerprint="test-t",
    )


def random_alignment(rng: np.random.Generator, vs: int, vt: int) -> AlignedPositions:
    """Two sequences with multi-token chunks on both sides, a one-sided chunk and a masked position."""
    parts = []
    for _ in range(2):
        k = 5
        ls, lt = rng.integers(1, 4, size=k), rng.integers(1, 4, size=k)
        lt[2] = 0  # chunk 2 one-sided (student only): never counts
        sc = np.repeat(np.arange(k), ls)
        tc = np.repeat(np.arange(k), lt)
        sids = torch.from_numpy(rng.integers(0, vs, size=sc.size))
        tids = torch.from_numpy(rng.integers(0, vt, size=tc.size))
        lm = torch.ones(sc.size, dtype=torch.bool)
        lm[1] = False
        parts.append(positions_from_token_chunks(torch.from_numpy(sc), torch.from_numpy(tc), sids, tids, k, student_loss_mask=lm))
    return AlignedPositions.concat(parts)


def make_cases() -> list[dict]:
    """Full (unsharded) inputs and options; the parent computes references, ranks the sharded losses."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    W = random_projection()
    cases: list[dict] = []

    def logits(n: int, v: int, scale: float = 3.0) -> torch.Tensor:
        return torch.randn(n, v, generator=g) * scale

    for name in LOSS_NAMES:
        same = name in ("kl",)
        vs, vsp, vt, vtp = (VK, VK_PAD, VK, VK_PAD) if same else (VS, VS_PAD, VT, VT_PAD)
        base = dict(loss=name, vs=vs, vt=vt)
        if name in ("kl", "uld"):
            base["kw"] = dict(student_vocab_size=vs, teacher_vocab_size=vt)
        else:
            base["kw"] = {}
        n = 12
        al = random_alignment(rng, vs, vt)
        ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
        mask = torch.ones(n, dtype=torch.bool)
        mask[[2, 5]] = False
        variants = [
            dict(tag="plain", s=logits(n, vsp), t=logits(n, vtp), opts=dict()),
            dict(tag="mask-sum-T2", s=logits(n, vsp), t=logits(n, vtp), opts=dict(mask=mask, reduction="sum", temperature=2.0, scale_by_temperature_squared=True)),
            dict(tag="none", s=logits(n, vsp), t=logits(n, vtp), opts=dict(reduction="none"), weights=torch.rand(n, generator=g)),
            dict(tag="chain", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al)),
            dict(tag="mean-merge-none", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al, merge="mean", reduction="none"), weights=torch.rand(al.n_chunks, generator=g)),
            dict(tag="reference-merge", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al, merge="reference")),
            # token-blocked (the reference below runs unblocked): chunks kept whole, recomputed in the backward
            dict(tag="blocked-chain", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al, block_size=3)),
            dict(tag="blocked-mask-none", s=logits(n, vsp), t=logits(n, vtp), opts=dict(mask=mask, reduction="none", block_size=5), weights=torch.rand(n, generator=g)),
            dict(tag="empty", s=logits(0, vsp), t=logits(0, vtp), opts=dict()),
            dict(tag="all-masked", s=logits(4, vsp), t=logits(4, vtp), opts=dict(mask=torch.zeros(4, dtype=torch.bool))),
            dict(tag="bf16", s=logits(n, vsp).bfloat16(), t=logits(n, vtp).bfloat16(), opts=dict(temperature=1.5)),
        ]
        if not same and name != "uld":
            variants.append(dict(tag="csr-W", s=logits(n, vsp), t=logits(n, vtp), opts=dict(), csr=True))
            if name in ("gold", "h_kl"):
                variants.append(dict(tag="adaptive", s=logits(n, vsp), t=logits(n, vtp), opts=dict(matched_weight=None, unmatched_weight=None)))
        if name == "p_kl":
            variants.append(dict(tag="permuted-teacher", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al), permute=True))
            variants.append(dict(tag="columns-only-plan", s=logits(ns, vsp), t=logits(nt, vtp), opts=dict(alignment=al), columns_only=True))
        for v in variants:
            cases.append({**base, **v, "W": W if name in ("p_kl", "gold", "h_kl") else None})
    return cases


def _reference(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    s = case["s"].clone().requires_grad_(True)
    fn = ref.LOSSES[case["loss"]]
    opts = dict(case["opts"])
    opts.pop("block_size", None)  # the specification: unblocked
    args = (s, case["t"])
    if case["W"] is not None:
        W = case["W"].to_torch(student_padded=VS_PAD, teacher_padded=VT_PAD) if case.get("csr") else case["W"]
        if case.get("csr"):
            opts.update(student_vocab_size=VS, teacher_vocab_size=VT)
        args = args + (W,)
    val = fn(*args, **case["kw"], **opts)
    (val * case["weights"]).sum().backward() if "weights" in case else val.backward()
    return val.detach().float(), s.grad.float()


def _rank_run(rank: int, world: int, cases: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """On one rank: slice the shards, run every parallel loss, back-propagate this rank's copy."""
    import nemo_xtoken.parallel as P

    fns = {"kl": P.vocab_parallel_kl, "p_kl": P.vocab_parallel_p_kl, "uld": P.vocab_parallel_uld,
           "gold": P.vocab_parallel_gold, "h_kl": P.vocab_parallel_h_kl}
    out = []
    for case in cases:
        s_full, t_full = case["s"], case["t"]
        ws, wt = s_full.shape[1] // world, t_full.shape[1] // world
        opts = dict(case["opts"])
        W = case["W"]
        if case.get("permute"):
            perm = teacher_permutation(W, world, VS_PAD, VT_PAD)
            t_full = t_full[:, torch.from_numpy(perm)]  # the teacher's output rows permuted once
            W = PKLPlan.build(W, world, VS_PAD, VT_PAD, teacher_perm=perm)
        elif case["loss"] == "p_kl" and not case.get("csr"):
            W = PKLPlan.build(W, world, VS_PAD, VT_PAD, partial_sums=not case.get("columns_only"))
        elif case.get("csr"):
            W = W.to_torch(student_padded=VS_PAD, teacher_padded=VT_PAD)
            opts.update(student_vocab_size=VS, teacher_vocab_size=VT)
        s = s_full[:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
        t = t_full[:, rank * wt : (rank + 1) * wt].clone()
        args = (s, t) if W is None else (s, t, W)
        val = fns[case["loss"]](*args, **case["kw"], **opts)
        (val * case["weights"]).sum().backward() if "weights" in case else val.backward()
        out.append((val.detach().float(), s.grad.float()))
    # bad input on every rank alike (raises before any collective)
    errors = []
    W0 = case["W"] if case["W"] is not None else random_projection()
    s0, t0 = torch.zeros(3, VS_PAD // world), torch.zeros(3, VT_PAD // world)
    for bad in (
        lambda: P.vocab_parallel_p_kl(s0, t0, PKLPlan.build(W0, world * 2 if world < 4 else 1, VS_PAD, VT_PAD)),
        lambda: P.vocab_parallel_p_kl(torch.zeros(3, 40 // world), t0, W0),
        lambda: P.vocab_parallel_gold(s0, torch.zeros(3, 60 // world), W0),
        lambda: P.vocab_parallel_p_kl(s0, torch.zeros(4, VT_PAD // world), W0),
    ):
        try:
            bad()
            errors.append(None)
        except XTokenError as e:
            errors.append(str(e))
    out.append(errors)
    return out


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return make_cases()


@pytest.fixture(scope="module")
def references(cases):
    return [_reference(c) for c in cases]


_RESULTS: dict[int, list] = {}


def results_for(tp: int, cases) -> list:
    if tp not in _RESULTS:
        _RESULTS[tp] = run_distributed(_rank_run, tp, cases, timeout=900)
    return _RESULTS[tp]


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_parity_values_and_gradients(tp, loss, cases, references):
    """Value on every rank = reference; concatenated shard gradients = reference gradient."""
    per_rank = results_for(tp, cases)
    checked = 0
    for i, case in enumerate(cases):
        if case["loss"] != loss:
            continue
        rv, rg = references[i]
        bf16 = case["s"].dtype == torch.bfloat16
        for rank in range(tp):
            val, _ = per_rank[rank][i]
            assert torch.isfinite(val).all(), (case["tag"], rank)
            torch.testing.assert_close(val, rv, rtol=1e-5, atol=1e-6, msg=lambda m: f"{loss}/{case['tag']} tp={tp} rank {rank}: {m}")
        grad = torch.cat([per_rank[r][i][1] for r in range(tp)], dim=1)
        tol = dict(rtol=1e-2, atol=1e-4) if bf16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, rg, **tol, msg=lambda m: f"{loss}/{case['tag']} tp={tp} gradient: {m}")
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("tp", (2, 4))
def test_tp_gradient_convention(tp, cases, references):
    """Each rank's shard gradient is the reference slice itself, not tp times it (ModelOpt's TopK bug)."""
    per_rank = results_for(tp, cases)
    for i, case in enumerate(cases):
        if case["tag"] != "plain":
            continue
        _, rg = references[i]
        w = rg.shape[1] // tp
        for rank in range(tp):
            mine = per_rank[rank][i][1]
            ref_slice = rg[:, rank * w : (rank + 1) * w]
            assert ref_slice.abs().max() > 1e-4  # a meaningful check
            torch.testing.assert_close(mine, ref_slice, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(mine, tp * ref_slice, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tp", TPS)
def test_empty_and_all_masked_give_zero(tp, cases):
    per_rank = results_for(tp, cases)
    for i, case in enumerate(cases):
        if case["tag"] in ("empty", "all-masked"):
            val, grad = per_rank[0][i]
            assert float(val) == 0.0 and torch.count_nonzero(grad) == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("tp", TPS)
def test_bad_input_errors_on_ranks(tp, cases):
    """Bad input raises XTokenError naming the tensor/plan and the shapes (on every rank alike)."""
    for rank_out in results_for(tp, cases):
        plan_tp, narrow_s, narrow_t, rows = rank_out[-1]
        assert plan_tp is not None and "tp" in plan_tp
        assert narrow_s is not None and "student_logits" in narrow_s
        assert narrow_t is not None and "teacher_logits" in narrow_t
        assert rows is not None and "positions" in rows


def test_plan_rejects_tp_not_dividing_padded_vocab():
    W = random_projection()
    with pytest.raises(XTokenError, match=r"student padded vocabulary \(64\) is not divisible .* 3"):
        PKLPlan.build(W, 3, VS_PAD, VT_PAD)
    with pytest.raises(XTokenError, match=r"W has shape \(50, 70\)"):
        PKLPlan.build(W, 2, 40, VT_PAD)
    with pytest.raises(XTokenError, match="teacher_perm"):
        PKLPlan.build(W, 2, VS_PAD, VT_PAD, teacher_perm=np.zeros(VT_PAD, dtype=np.int64))


def _max_matching_size(edges: list[tuple[int, int]]) -> int:
    """Independent check: Kuhn's algorithm, recursive, on a small bipartite graph."""
    adj: dict[int, list[int]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
    match: dict[int, int] = {}

    def try_(u: int, seen: set) -> bool:
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                if v not in match or try_(match[v], seen):
                    match[v] = u
                    return True
        return False

    return sum(try_(u, set()) for u in adj)


def _dense_w() -> np.ndarray:
    W = random_projection()
    dense = np.zeros((VS, VT))
    for s in range(VS):
        for t, w in W.row(s):
            dense[s, t] = w
    return dense


def test_plan_columns_only_sends_exactly_the_needed_columns():
    """partial_sums=False: the (r → r') lists equal the brute-force set of rows linked to r's teacher shard."""
    W, dense = random_projection(), _dense_w()
    for tp in (2, 4):
        plan = PKLPlan.build(W, tp, VS_PAD, VT_PAD, partial_sums=False)
        ws, wt = VS_PAD // tp, VT_PAD // tp
        for r in range(tp):
            rp = plan.ranks[r]
            assert rp.n_partial == 0
            off = np.cumsum([0] + rp.send_splits)  # the diagonal (kept local) has split 0
            assert rp.send_splits[r] == 0
            for r2 in range(tp):
                if r2 == r:
                    continue
                got = rp.send_cols[off[r2] : off[r2 + 1]] + r * ws
                block = dense[r * ws : min((r + 1) * ws, VS), r2 * wt : min((r2 + 1) * wt, VT)]
                want = np.nonzero(block.any(axis=1))[0] + r * ws if block.size else np.zeros(0)
                assert np.array_equal(np.sort(got), want)


def test_plan_partial_sums_send_a_minimum_vertex_cover():
    """Default plan: per rank pair, as many values as a maximum matching (König: the optimum), fewer than rows."""
    W, dense = random_projection(), _dense_w()
    for tp in (2, 4):
        plain = PKLPlan.build(W, tp, VS_PAD, VT_PAD, partial_sums=False)
        plan = PKLPlan.build(W, tp, VS_PAD, VT_PAD)
        ws, wt = VS_PAD // tp, VT_PAD // tp
        for r in range(tp):
            for r2 in range(tp):
                if r == r2:
                    continue
                block = dense[r * ws : min((r + 1) * ws, VS), r2 * wt : min((r2 + 1) * wt, VT)]
                edges = [(int(a), int(b)) for a, b in zip(*np.nonzero(block))]
                assert plan.sent[r, r2] == _max_matching_size(edges)
        assert plan.values_sent_per_token().sum() < plain.values_sent_per_token().sum()
        assert any(rp.n_partial > 0 for rp in plan.ranks)  # the partial-sum path is exercised by the parity tests


def test_teacher_permutation_is_a_permutation_that_localizes():
    W = random_projection()
    for tp in (2, 4):
        perm = teacher_permutation(W, tp, VS_PAD, VT_PAD)
        assert np.array_equal(np.sort(perm), np.arange(VT_PAD))
        plain = PKLPlan.build(W, tp, VS_PAD, VT_PAD).values_sent_per_token().sum()
        permuted = PKLPlan.build(W, tp, VS_PAD, VT_PAD, teacher_perm=perm).values_sent_per_token().sum()
        assert permuted < plain


# ---- multi-teacher, CE and the total loss --------------------------------------------------------
WEIGHTING_SCHEMES = ("static", "ce", "entropy", "max_prob")


def make_combine_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    n = 10
    al = random_alignment(rng, VS, VT)
    return dict(
        s=torch.randn(n, VS_PAD, generator=g) * 2,
        s_al=torch.randn(al.student_chunk_ids.numel(), VS_PAD, generator=g) * 2,
        t1=torch.randn(n, VT_PAD, generator=g) * 2,
        t1_al=torch.randn(al.teacher_chunk_ids.numel(), VT_PAD, generator=g) * 2,
        t2=torch.randn(n, VS_PAD, generator=g) * 2,  # a same-tokenizer teacher (KL)
        targets=torch.from_numpy(rng.integers(0, VS, size=n)),
        t1_targets=torch.from_numpy(rng.integers(0, VT, size=n)),
        t2_targets=torch.from_numpy(rng.integers(0, VS, size=n)),
        mask=torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
        al=al,
    )


def _combine_ref(inp: dict, scheme: str, world: int | None, rank: int = 0):
    """Reference (world None) or parallel (on a rank) multi-teacher + CE + dynamic total; value and grad."""
    from nemo_xtoken.losses import Teacher, multi_teacher, total_loss

    import nemo_xtoken.parallel as P

    W = random_projection()
    def shard(x, v):
        if world is None:
            return x
        w = v // world
        return x[:, rank * w : (rank + 1) * w]

    s = shard(inp["s"], VS_PAD).clone().requires_grad_(True)
    t1 = shard(inp["t1"], VT_PAD)
    t2 = shard(inp["t2"], VS_PAD)
    if world is None:
        teachers = [Teacher("p_kl", W, 0.7), Teacher("kl", None, 0.3, dict(student_vocab_size=VS, teacher_vocab_size=VS))]
        out = multi_teacher(s, [t1, t2], teachers, mask=inp["mask"], weighting=scheme,
                            teacher_targets=[inp["t1_targets"], inp["t2_targets"]], temperature=1.3)
        ce = torch.nn.functional.cross_entropy(s[:, :VS][inp["mask"]], inp["targets"][inp["mask"]])
        tot = total_loss(ce, out.loss)
    else:
        plan = PKLPlan.build(W, world, VS_PAD, VT_PAD)
        teachers = [Teacher("p_kl", plan, 0.7), Teacher("kl", None, 0.3, dict(student_vocab_size=VS, teacher_vocab_size=VS))]
        out = P.vocab_parallel_multi_teacher(s, [t1, t2], teachers, mask=inp["mask"], weighting=scheme,
                                             teacher_targets=[inp["t1_targets"], inp["t2_targets"]], temperature=1.3)
        ce = P.vocab_parallel_cross_entropy(s, inp["targets"], vocab_size=VS, mask=inp["mask"])
        tot = P.total_loss(ce, out.loss)
    tot.backward()
    return tot.detach(), out.alphas, ce.detach(), s.grad


def _rank_run_combine(rank: int, world: int, inp: dict) -> list:
    return [_combine_ref(inp, scheme, world, rank) for scheme in WEIGHTING_SCHEMES]


@pytest.mark.parametrize("tp", (2, 4))
def test_multi_teacher_ce_and_total_parity(tp):
    """Multi-teacher (static and the three adaptive weightings), CE and the dynamic total = reference."""
    inp = make_combine_inputs()
    refs = [_combine_ref(inp, scheme, None) for scheme in WEIGHTING_SCHEMES]
    per_rank = run_distributed(_rank_run_combine, tp, inp, timeout=900)
    for k, scheme in enumerate(WEIGHTING_SCHEMES):
        tot, alphas, ce, grad = refs[k]
        for rank in range(tp):
            ptot, palphas, pce, _ = per_rank[rank][k]
            torch.testing.assert_close(palphas, alphas, rtol=1e-5, atol=1e-6, msg=lambda m: f"{scheme}: alphas {m}")
            torch.testing.assert_close(pce, ce, rtol=1e-5, atol=1e-6, msg=lambda m: f"{scheme}: ce {m}")
            torch.testing.assert_close(ptot, tot, rtol=1e-5, atol=1e-6, msg=lambda m: f"{scheme}: total {m}")
        pgrad = torch.cat([per_rank[r][k][3] for r in range(tp)], dim=1)
        torch.testing.assert_close(pgrad, grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{scheme}: gradient {m}")
    assert len({round(float(r[1][0]), 6) for r in refs}) > 1  # adaptive weights differ from static


def _where_imported(rank: int, world: int) -> dict:
    return {"module": _IMPORTED_IN_PID, "rank": os.getpid(), "server": os.getppid()}


def test_ranks_fork_from_a_server_that_imported_the_test_module():
    """The fork server preloads the calling test module, found on pytest's sys.path (Python 3.12.1's forkserver
    ignores the sys_path it is handed: the preload failed silently and every rank imported the module and what it
    imports, e.g. modelopt, again).  A fresh server is started by this call, so this module is the one it preloads."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # every earlier rank was joined; the next call starts a new server
    (r,) = run_distributed(_where_imported, 1)
    assert r["module"] == r["server"] != r["rank"], r
