"""Issue 12's loss items: the floor keeps a gradient, a perfect student scores 0, the public merge.

* far student: where the projected student probability lies below the value floor EPS = 1e-12,
  the gradient is still that of ``log p̃_S`` (a student trained on P-KL / H-KL alone from there
  learns), in the reference and the tensor-parallel paths;
* perfect student: with the chain merge the teacher's chunk distribution is normalized, so a
  student equal to the teacher wherever it can be scores 0 (it scored ``C·log C < 0`` before);
* ``merge="reference"``: equal to a direct transcription of the published formula (NeMo-RL's
  X-Token ``CrossTokenizerDistillationLossFn._compute_p_kl``, on the full vocabulary).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.losses import EPS, gold, h_kl, kl, p_kl, resolve_projection, total_loss, uld
from nemo_xtoken.losses.reference import grad_floor, top1_common_set
from nemo_xtoken.testing import run_distributed
from tests.test_parallel import VS, VS_PAD, VT, VT_PAD, random_projection

FAR = -50.0  # student logit offset of the rows that feed the teacher's token: p ≈ e^-50 ≈ 2e-22 < EPS


def _dense_w(W) -> torch.Tensor:
    w = resolve_projection(W)
    d = torch.zeros(w.shape, dtype=torch.float64)
    d.index_put_((w.rows, w.cols), w.values.double(), accumulate=True)
    return d


def far_case(loss: str, n: int = 4, seed: int = 0):
    """Teacher sure of one token per row; the student rows that reach it sit FAR below the others."""
    W = random_projection()
    w = resolve_projection(W)
    rng = np.random.default_rng(seed)
    if loss == "p_kl":
        reach = np.unique(w.cols.numpy())
        links = {int(t): w.rows[w.cols == t].numpy() for t in reach}
    else:  # h_kl: the teacher token's top-1 group
        c = top1_common_set(w)
        reach = c.teacher_ids.numpy()
        links = {int(t): c.student_ids[c.group == k].numpy() for k, t in enumerate(reach)}
    t_star = rng.choice(reach, size=n)
    t = torch.zeros(n, VT_PAD, dtype=torch.float64)
    s = torch.zeros(n, VS_PAD, dtype=torch.float64)
    for i, ts in enumerate(t_star):
        t[i, ts] = 20.0
        s[i, links[int(ts)]] = FAR
    return W, s, t


def unfloored(loss: str, W, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mean of ``Σ_t p_T (log p_T − log q)`` with no floor at all (float64, dense W), for the gradient."""
    ps = torch.softmax(s[:, :VS].double(), 1)
    pt = torch.softmax(t[:, :VT].double(), 1)
    if loss == "p_kl":
        w = _dense_w(W)
        reach = w.sum(0) > 0  # teacher tokens no student row reaches: infinite value, no gradient
        q = (ps @ w)[:, reach]
        return (pt[:, reach] * (pt[:, reach].log() - q.log())).sum(1).mean()
    c = top1_common_set(resolve_projection(W))
    q = torch.zeros(ps.shape[0], c.teacher_ids.numel(), dtype=ps.dtype).index_add(1, c.group, ps[:, c.student_ids])
    ptc = pt[:, c.teacher_ids]
    return (ptc * (ptc.log() - q.log())).sum(1).mean()  # the KL part: the ULD part has no floor


# ---- (a) the floor bounds the value only --------------------------------------------------------------


@pytest.mark.parametrize("loss", ["p_kl", "h_kl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_far_student_gradient_is_that_of_the_unfloored_log(loss, dtype):
    W, s0, t = far_case(loss)
    s = s0.to(dtype).requires_grad_(True)
    fn = p_kl if loss == "p_kl" else lambda *a, **k: h_kl(*a, unmatched_weight=0.0, **k)
    val = fn(s, t.to(dtype), W)
    # the value is floored: -log(EPS) per row (the teacher is sure of its token)
    assert float(val.detach()) == pytest.approx(-np.log(EPS), rel=1e-3)
    (g,) = torch.autograd.grad(val, s)
    s64 = s0.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(unfloored(loss, W, s64, t), s64)
    assert want.abs().max() > 0.1  # the unfloored gradient is strong: O(p_T), not O(q / EPS)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g[:, :VS].double(), want[:, :VS], **tol)
    assert torch.all(g[:, VS:] == 0)


def test_grad_floor_cannot_overflow():
    # q = 0 exactly (every linked student probability underflowed) with a large upstream gradient: finite.
    q = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    from nemo_xtoken.losses.reference import floored_log

    (g,) = torch.autograd.grad((floored_log(q) * -1e7).sum(), q)
    assert torch.isfinite(g).all() and float(g[0]) == pytest.approx(-1e7 / grad_floor(torch.float32), rel=1e-6)
    assert float(floored_log(q.detach())[0]) == pytest.approx(np.log(EPS))


def train_far_student(loss: str, steps: int = 120, fn=None) -> tuple[float, float]:
    """Adam on the student logits alone, P-KL / H-KL as the only loss; (KD at start, KD at the end)."""
    W, s0, t = far_case(loss)
    z = s0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.5)
    if fn is None:
        fn = p_kl if loss == "p_kl" else h_kl
    first = last = None
    for _ in range(steps):
        val = fn(z, t.float(), W)
        opt.zero_grad()
        val.backward()
        opt.step()
        first = float(val.detach()) if first is None else first
        last = float(val.detach())
    return first, last


@pytest.mark.parametrize("loss", ["p_kl", "h_kl"])
def test_far_student_learns(loss):
    first, last = train_far_student(loss)
    assert first > 25  # starts below the floor (the floored value is -log EPS ≈ 27.6 per item)
    assert last < 0.1 * first, (first, last)  # with a zero gradient under the floor it stayed at ≈ 27.6


# ---- (b) a perfect student scores 0 -------------------------------------------------------------------


def chunked(n_chunks: int = 5, seed: int = 0) -> AlignedPositions:
    """The student predicts each chunk with one position; the teacher with 2-3 (continuation C_T < 1)."""
    rng = np.random.default_rng(seed)
    t_len = rng.integers(2, 4, size=n_chunks)
    s_ids = torch.arange(n_chunks)
    t_ids = torch.from_numpy(np.repeat(np.arange(n_chunks), t_len))
    return AlignedPositions(s_ids, t_ids, torch.zeros(n_chunks, dtype=torch.long), torch.from_numpy(rng.integers(0, 40, size=t_ids.numel())), n_chunks)


def perfect_student(a: AlignedPositions, t: torch.Tensor, merge: str) -> torch.Tensor:
    """Student logits whose chunk distribution is the teacher's normalized chunk distribution."""
    lt = torch.log_softmax(t, 1)
    rows = []
    for k in range(a.n_chunks):
        pos = torch.nonzero(a.teacher_chunk_ids == k)[:, 0]
        rows.append(lt[pos[0]] if merge == "chain" else torch.logsumexp(lt[pos], 0) - np.log(len(pos)))
    return torch.stack(rows)


def identity_w(v: int) -> torch.Tensor:
    return torch.eye(v, dtype=torch.float64).to_sparse_csr()


@pytest.mark.parametrize("merge", ["chain", "mean"])
@pytest.mark.parametrize("loss", ["kl", "p_kl", "uld", "gold", "h_kl"])
def test_perfect_student_scores_zero(loss, merge):
    a = chunked()
    g = torch.Generator().manual_seed(1)
    v = 40
    t = 3 * torch.randn(a.teacher_chunk_ids.numel(), v, generator=g, dtype=torch.float64)
    s = perfect_student(a, t, merge)
    fns = {"kl": kl, "uld": uld, "p_kl": lambda *x, **k: p_kl(*x[:2], identity_w(v), **k),
           "gold": lambda *x, **k: gold(*x[:2], identity_w(v), **k), "h_kl": lambda *x, **k: h_kl(*x[:2], identity_w(v), **k)}
    val = fns[loss](s, t, alignment=a, merge=merge)
    assert abs(float(val)) < 1e-12, float(val)
    if merge == "chain" and loss in ("kl", "p_kl"):  # before: Σ C·log C / n < 0 (the teacher's continuation)
        c = torch.stack([torch.log_softmax(t, 1)[a.teacher_chunk_ids == k][1:, :].gather(1, a.teacher_targets[a.teacher_chunk_ids == k][1:, None]).sum() for k in range(a.n_chunks)])
        assert float((c.exp() * c).mean()) < -1e-3  # the offset the old merge added is not negligible


def perfect_pkl_case(seed: int = 2):
    """A real (random) W: teacher first-position distributions in the image of Wᵀ, the student at their preimage."""
    W = random_projection()
    w = _dense_w(W)
    a = chunked(seed=seed)
    g = torch.Generator().manual_seed(seed)
    n_t = a.teacher_chunk_ids.numel()
    t = 3 * torch.randn(n_t, VT_PAD, generator=g, dtype=torch.float64)
    empty = w.sum(1) == 0
    s = 2 * torch.randn(a.n_chunks, VS_PAD, generator=g, dtype=torch.float64)
    s[:, :VS][:, empty] = -1e4  # no mass on rows that project nowhere
    s[:, VS:] = 0.0  # padded columns: ignored
    q = torch.softmax(s[:, :VS], 1) @ w
    for k in range(a.n_chunks):
        first = int(torch.nonzero(a.teacher_chunk_ids == k)[0, 0])
        t[first, :VT] = torch.where(q[k] > 0, q[k].clamp(min=1e-300).log(), torch.full_like(q[k], -1e4))
    return W, s, t, a


def test_perfect_student_scores_zero_under_a_real_w():
    W, s, t, a = perfect_pkl_case()
    # 0 up to W's float32 rounding (its rows sum to 1 ± 6e-8: the KL is then -log Σ q)
    assert float(p_kl(s, t, W, alignment=a)) == pytest.approx(0.0, abs=4 * torch.finfo(torch.float32).eps)  # |1 - Σ of ≤ 4 float32 weights|
    # a student off that point scores > 0, and the chain KL is never negative
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s2 = s + 0.5 * torch.randn(s.shape, generator=g, dtype=s.dtype)
        assert float(p_kl(s2, t, W, alignment=a)) > 0
        assert float(p_kl(3 * torch.randn(s.shape, generator=g, dtype=s.dtype), t, W, alignment=a)) > 0


def test_dynamic_scale_balances_against_a_nonnegative_kd():
    # Chain KD now measures what the student can change: near the teacher it is small and positive,
    # so the scale CE/|KD| grows smoothly instead of crossing a zero it could not reach.
    W, s, t, a = perfect_pkl_case()
    ce = torch.tensor(2.0, dtype=torch.float64)
    for eps in (1.0, 0.3, 0.1, 0.01):
        g = torch.Generator().manual_seed(4)
        s2 = (s + eps * torch.randn(s.shape, generator=g, dtype=s.dtype)).requires_grad_(True)
        kd = p_kl(s2, t, W, alignment=a)
        assert float(kd.detach()) > 0
        tot = total_loss(ce, kd)
        assert float(tot.detach()) == pytest.approx(2 * float(ce))  # sg(CE/|KD|)·KD + CE, KD > 0: the KD term = CE
        (gk,) = torch.autograd.grad(tot, s2, retain_graph=True)
        (gd,) = torch.autograd.grad(kd, s2)
        torch.testing.assert_close(gk, float(ce) / float(kd.detach()) * gd)  # the KD gradient scaled, never flipped


# ---- (c) merge="reference": the published formula, transcribed -----------------------------------------


def published_p_kl(student_logits, teacher_logits, w_dense, s_chunk, t_chunk, n_chunks, T, log_eps_in_gradient=True):
    """NeMo-RL X-Token ``_compute_p_kl`` (gold_loss=False), transcribed with the whole teacher vocabulary.

    ``student_probs = exp(log_softmax(z/T))``; ``projected = M.t() @ probs``; chunk-average both sides
    with a one-hot ``bmm`` (``sums / (sizes + 1e-10)``): the projected student probabilities and the
    teacher's ``log_softmax(logits/T)``; ``proj = proj / (proj.sum(-1) + 1e-10)``;
    ``log(proj + 1e-10)``; ``kl_div(proj_log, tgt_log, log_target=True).sum(-1)`` per chunk; the sum over
    valid chunks (both sides non-empty) divided by their number, times ``T²``.
    ``log_eps_in_gradient=False``: the same value, but the log's gradient without the ε (``1/q``).
    """
    eps = 1e-10
    sp = torch.log_softmax(student_logits / T, dim=-1).exp()[None]  # [1, T_s, V_s]
    projected = torch.matmul(sp, w_dense)  # [1, T_s, V_t]
    tlp = torch.log_softmax(teacher_logits / T, dim=-1)[None]

    def chunk_average(x, cid):
        mask = (cid[None, :, None] == torch.arange(n_chunks)[None, None, :])  # [1, T, C]
        sums = torch.bmm(mask.transpose(1, 2).to(x.dtype), x)
        sizes = mask.sum(dim=1).to(x.dtype)
        return sums / (sizes.unsqueeze(-1) + eps), sizes

    proj_chunks, ps = chunk_average(projected, s_chunk)
    tgt_log_chunks, ts = chunk_average(tlp, t_chunk)
    proj_chunks = proj_chunks / (proj_chunks.sum(dim=-1, keepdim=True) + eps)
    proj_log_chunks = (proj_chunks + eps).log()
    if not log_eps_in_gradient:
        exact = torch.where(proj_chunks > 0, proj_chunks.clamp(min=1e-300).log(), proj_log_chunks)
        proj_log_chunks = exact + (proj_log_chunks - exact).detach()
    valid = ((ps > 0) & (ts > 0)).to(proj_log_chunks.dtype)
    per_chunk = torch.nn.functional.kl_div(proj_log_chunks, tgt_log_chunks, reduction="none", log_target=True).sum(-1)
    return (per_chunk * valid).sum() / valid.sum().clamp(min=1.0) * (T * T)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_merge_equals_the_published_formula(T, seed):
    rng = np.random.default_rng(seed)
    W = random_projection(seed)
    n_chunks = 6
    s_len, t_len = rng.integers(1, 4, size=n_chunks), rng.integers(1, 4, size=n_chunks)
    t_len[4] = 0  # a one-sided chunk: not counted
    s_chunk = torch.from_numpy(np.concatenate([[-1], np.repeat(np.arange(n_chunks), s_len)]))
    t_chunk = torch.from_numpy(np.repeat(np.arange(n_chunks), t_len))
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(s_chunk.numel(), VS, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(t_chunk.numel(), VT, generator=g, dtype=torch.float64)
    a = AlignedPositions(s_chunk, t_chunk, torch.zeros_like(s_chunk), torch.zeros_like(t_chunk), n_chunks)
    ours = p_kl(s, t, W, alignment=a, merge="reference", temperature=T, scale_by_temperature_squared=True)
    want = published_p_kl(s, t, _dense_w(W), s_chunk, t_chunk, n_chunks, T)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-12)  # the published value (its chunk-size ε: 1e-10 relative)
    (g1,) = torch.autograd.grad(ours, s)
    # the gradient: that of the published formula where its log has no ε (our floor bounds the value only) ...
    (g2,) = torch.autograd.grad(published_p_kl(s, t, _dense_w(W), s_chunk, t_chunk, n_chunks, T, log_eps_in_gradient=False), s)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    # ... which is the published gradient up to the relative size of ε = 1e-10 against the projected probabilities
    (g3,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g3, rtol=1e-2, atol=1e-6)
    # and it is not the chain or the mean merge
    assert abs(float(p_kl(s, t, W, alignment=a, merge="mean", temperature=T, scale_by_temperature_squared=True)) - float(want)) > 1e-3


# ---- the same in the tensor-parallel path ------------------------------------------------------------


def _tp_fidelity(rank: int, world: int) -> dict:
    import nemo_xtoken.parallel as P

    out: dict = {}

    def shard(x, width):
        w = width // world
        return x[:, rank * w : (rank + 1) * w]

    for loss in ("p_kl", "h_kl"):
        W, s0, t = far_case(loss)
        s = shard(s0.float(), VS_PAD).clone().requires_grad_(True)
        fn = P.vocab_parallel_p_kl if loss == "p_kl" else lambda *x, **k: P.vocab_parallel_h_kl(*x, unmatched_weight=0.0, **k)
        val = fn(s, shard(t.float(), VT_PAD), W)
        val.backward()
        out[f"far/{loss}"] = (val.detach(), s.grad)
        # train on P-KL / H-KL alone from the far point, sharded
        z = shard(s0.float(), VS_PAD).clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.5)
        plan = P.PKLPlan.build(W, world, VS_PAD, VT_PAD) if loss == "p_kl" else W
        hist = []
        for _ in range(120):
            v = (P.vocab_parallel_p_kl if loss == "p_kl" else P.vocab_parallel_h_kl)(z, shard(t.float(), VT_PAD), plan)
            opt.zero_grad()
            v.backward()
            opt.step()
            hist.append(float(v))
        out[f"train/{loss}"] = (hist[0], hist[-1])
    # perfect students (chain and mean) with an identity W, and under the real W
    a = chunked()
    g = torch.Generator().manual_seed(1)
    v = 40
    t = 3 * torch.randn(a.teacher_chunk_ids.numel(), v, generator=g, dtype=torch.float64)
    eye = identity_w(v)
    for merge in ("chain", "mean"):
        s = perfect_student(a, t, merge).float()
        for name, fn in (("kl", P.vocab_parallel_kl), ("uld", P.vocab_parallel_uld)):
            out[f"perfect/{name}/{merge}"] = fn(shard(s, v), shard(t.float(), v), alignment=a, merge=merge)
        for name, fn in (("p_kl", P.vocab_parallel_p_kl), ("gold", P.vocab_parallel_gold), ("h_kl", P.vocab_parallel_h_kl)):
            out[f"perfect/{name}/{merge}"] = fn(shard(s, v), shard(t.float(), v), eye, alignment=a, merge=merge)
    W, s, t, a = perfect_pkl_case()
    out["perfect/p_kl/real-W"] = P.vocab_parallel_p_kl(shard(s, VS_PAD), shard(t, VT_PAD), W, alignment=a)
    return out


@pytest.mark.parametrize("tp", (1, 2))
def test_tensor_parallel_far_and_perfect_students(tp):
    per_rank = run_distributed(_tp_fidelity, tp, timeout=900)
    for loss in ("p_kl", "h_kl"):
        W, s0, t = far_case(loss)
        s = s0.float().requires_grad_(True)
        fn = p_kl if loss == "p_kl" else lambda *x, **k: h_kl(*x, unmatched_weight=0.0, **k)
        val = fn(s, t.float(), W)
        (g,) = torch.autograd.grad(val, s)
        assert g.abs().max() > 0.1
        grad = torch.cat([per_rank[r][f"far/{loss}"][1] for r in range(tp)], dim=1)
        torch.testing.assert_close(grad, g, rtol=1e-5, atol=1e-6)
        for r in range(tp):
            torch.testing.assert_close(per_rank[r][f"far/{loss}"][0], val.detach(), rtol=1e-5, atol=1e-6)
            first, last = per_rank[r][f"train/{loss}"]
            assert first > 25 and last < 0.1 * first, (loss, first, last)
    for r in range(tp):
        for key, val in per_rank[r].items():
            if key.startswith("perfect/"):
                assert abs(float(val)) < 1e-5, (key, float(val))


def test_the_config_accepts_every_merge():
    from nemo_xtoken.align.merge import MERGES
    from nemo_xtoken.integration.config import MERGES as CONFIG_MERGES

    assert CONFIG_MERGES == MERGES
