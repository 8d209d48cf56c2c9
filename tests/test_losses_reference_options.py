"""Options that follow the public reference code (issue 25): each against a hand computation of its rule.

- ``uld_tail="truncate"``: NeMo-RL's gold path sorts both uncommon sides and keeps
  ``min(n_S, n_T, uncommon_topk)`` entries (``loss_functions.py`` at 7ea279a, lines 2572-2617);
- ``common_set="reference"``: NeMo-RL's relaxed exact map (``x_token/loss_utils.py``,
  ``build_exact_token_map(xtoken_loss=True)``, lines 924-992), ported below line by line;
- ``teacher_top_k``: NeMo-RL's P-KL subset (``select_teacher_topk_indices``, ``loss_utils.py`` 267-291,
  and ``_compute_p_kl``, ``loss_functions.py`` 2338-2398);
- ``kd_scale_max``: a cap on the dynamic scale (neither reference caps it).

Everything in float64 against loops / a port; the tensor-parallel parity of the same options at
tp 1/2/4 on gloo reuses tests/test_parallel.py's rank runner.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_xtoken.align.merge import positions_from_token_chunks
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import reference as ref
from nemo_xtoken.losses.total import dynamic_scale, total_loss
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_MULTI, Projection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_parallel as tpar  # noqa: E402  (the spawn helpers and the small W of the parity tests)

# ---- a hand-made W (student 8 ids → teacher 6 ids) with every case of the reference common set ----
ROWS = {
    0: {0: 1.0},  # exact
    1: {0: 1.0},  # exact on the same teacher id: tie at weight 1 → the lower row (0) wins
    2: {1: 0.7, 2: 0.3},  # candidate on 1 (0.7) ...
    3: {1: 0.8, 3: 0.2},  # ... beaten by this one (0.8)
    4: {2: 0.5, 3: 0.5},  # top weight 0.5 < 0.6: not common
    5: {3: 0.6, 4: 0.4},  # exactly 0.6: common
    6: {},  # empty
    7: {5: 0.59, 4: 0.41},  # just below 0.6
}
V_S, V_T = 8, 6
EXPECTED_REFERENCE_PAIRS = [(0, 0), (3, 1), (5, 3)]


def hand_w() -> Projection:
    indptr, indices, data, kind = [0], [], [], []
    for s in range(V_S):
        row = ROWS[s]
        for t, v in row.items():
            indices.append(t), data.append(v)
        kind.append(ROW_EXACT if list(row.values()) == [1.0] else ROW_MULTI if row else ROW_EMPTY)
        indptr.append(len(indices))
    return Projection(
        indptr=np.asarray(indptr, dtype=np.int64), indices=np.asarray(indices, dtype=np.int32),
        data=np.asarray(data, dtype=np.float32), row_kind=np.asarray(kind, dtype=np.uint8),
        student_vocab_size=V_S, teacher_vocab_size=V_T, student_fingerprint="s", teacher_fingerprint="t",
    )


def dense_w(w: Projection) -> np.ndarray:
    out = np.zeros((w.student_vocab_size, w.teacher_vocab_size))
    for s in range(w.student_vocab_size):
        for k in range(w.indptr[s], w.indptr[s + 1]):
            out[s, w.indices[k]] = w.data[k]
    return out


def nemo_rl_relaxed_exact_map(w: Projection) -> list[tuple[int, int]]:
    """``build_exact_token_map(xtoken_loss=True)`` of NeMo-RL (loss_utils.py 920-985) on W's dense top-k form."""
    top_k = max(int(np.diff(w.indptr).max()), 2)
    indices = torch.full((w.student_vocab_size, top_k), -1, dtype=torch.long)
    likelihoods = torch.zeros((w.student_vocab_size, top_k))
    for s in range(w.student_vocab_size):
        a, b = w.indptr[s], w.indptr[s + 1]
        indices[s, : b - a] = torch.from_numpy(w.indices[a:b].astype(np.int64))
        likelihoods[s, : b - a] = torch.from_numpy(w.data[a:b])
    v_student, v_teacher = indices.shape[0], w.teacher_vocab_size
    sorted_values, sorted_in_topk = torch.sort(likelihoods, dim=-1, descending=True)
    has_exact_map = sorted_values[:, 0] >= 0.6
    s_candidates = torch.where(has_exact_map)[0]
    t_candidates = indices[s_candidates, sorted_in_topk[s_candidates, 0]]
    prob_candidates = sorted_values[s_candidates, 0]
    in_bounds = (t_candidates >= 0) & (t_candidates < v_teacher)
    s_vec, t_vec, prob_vec = s_candidates[in_bounds], t_candidates[in_bounds], prob_candidates[in_bounds]
    max_prob_per_t = torch.full((v_teacher,), float("-inf"), dtype=prob_vec.dtype)
    max_prob_per_t.scatter_reduce_(0, t_vec, prob_vec, reduce="amax", include_self=True)
    eligible = prob_vec >= max_prob_per_t[t_vec]
    sentinel = torch.tensor(v_student, dtype=s_vec.dtype)
    eligible_s = torch.where(eligible, s_vec, sentinel.expand_as(s_vec))
    min_s_per_t = torch.full((v_teacher,), v_student, dtype=s_vec.dtype)
    min_s_per_t.scatter_reduce_(0, t_vec, eligible_s, reduce="amin", include_self=True)
    winner_mask = eligible & (s_vec == min_s_per_t[t_vec])
    cs, ct = s_vec[winner_mask], t_vec[winner_mask]
    perm = torch.argsort(cs)
    return list(zip(cs[perm].tolist(), ct[perm].tolist()))


def _pairs(c: ref.CommonSet) -> list[tuple[int, int]]:
    return [(int(s), int(c.teacher_ids[g])) for s, g in zip(c.student_ids, c.group)]


def test_reference_common_set_is_nemo_rls_relaxed_exact_map():
    w = ref.resolve_projection(hand_w())
    got = ref.reference_common_set(w)
    assert _pairs(got) == EXPECTED_REFERENCE_PAIRS == nemo_rl_relaxed_exact_map(hand_w())
    assert got.one_to_one
    assert _pairs(ref.top1_common_set(w)) != EXPECTED_REFERENCE_PAIRS  # ours differs: a test that can fail
    # the parity tests' W (exact rows sharing a teacher id, multi-token rows colliding on one id)
    big = tpar.random_projection()
    assert _pairs(ref.reference_common_set(ref.resolve_projection(big))) == nemo_rl_relaxed_exact_map(big)
    with pytest.raises(XTokenError, match=r"common_set must be one of \['top1', 'reference'\].*distill.common_set"):
        ref.choose_common_set(w, True, "exact")
    with pytest.raises(XTokenError, match="common_set applies to H-KL only"):
        ref.choose_common_set(w, False, "reference")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _sorted_l1_hand(a: list[float], b: list[float], tail: str, top_k: int = 8192) -> float:
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    if tail == "pad":
        n = max(len(a), len(b))
        a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    else:
        n = min(len(a), len(b), top_k)
        a, b = a[:n], b[:n]
    return sum(abs(x - y) for x, y in zip(a, b))


def _hybrid_hand(s: np.ndarray, t: np.ndarray, pairs: list[tuple[int, int]], tail: str, top_k: int = 8192) -> float:
    """Mean over rows of Σ_(s,t)∈C p_T[t](log p_T[t] − log p_S[s]) + sortedL1(rest)."""
    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = _softmax(s[i]), _softmax(t[i])
        kl = sum(pt[b] * (math.log(pt[b]) - math.log(ps[a])) for a, b in pairs)
        cs, ct = {a for a, _ in pairs}, {b for _, b in pairs}
        rest_s = [ps[k] for k in range(len(ps)) if k not in cs]
        rest_t = [pt[k] for k in range(len(pt)) if k not in ct]
        total += kl + _sorted_l1_hand(rest_s, rest_t, tail, top_k)
    return total / s.shape[0]


@pytest.fixture(scope="module")
def logits64():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, V_S, generator=g, dtype=torch.float64) * 2, torch.randn(5, V_T, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("tail,top_k", [("pad", 8192), ("truncate", 8192), ("truncate", 3)])
def test_h_kl_reference_common_set_and_tail_by_hand(logits64, tail, top_k):
    s, t = logits64
    got = ref.h_kl(s, t, hand_w(), common_set="reference", uld_tail=tail, uld_top_k=top_k)
    want = _hybrid_hand(s.numpy(), t.numpy(), EXPECTED_REFERENCE_PAIRS, tail, top_k)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))


@pytest.mark.parametrize("tail,top_k", [("truncate", 8192), ("truncate", 2)])
def test_gold_and_uld_truncate_by_hand(logits64, tail, top_k):
    s, t = logits64
    # GOLD's strict set on the hand W: rows 0 and 1 are exact on teacher 0, the lower row kept
    got = ref.gold(s, t, hand_w(), uld_tail=tail, uld_top_k=top_k)
    want = _hybrid_hand(s.numpy(), t.numpy(), [(0, 0)], tail, top_k)
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))
    got_uld = ref.uld(s, t, uld_tail=tail, uld_top_k=top_k)
    want_uld = np.mean([
        _sorted_l1_hand(list(_softmax(a)), list(_softmax(b)), tail, top_k) for a, b in zip(s.numpy(), t.numpy())
    ])
    assert abs(float(got_uld) - want_uld) < 1e-12
    # the zero-padded tail differs on unequal widths (8 vs 6 ids): the option is not a no-op
    assert abs(float(ref.uld(s, t)) - float(got_uld)) > 1e-3


def test_uld_tail_bad_values_refused(logits64):
    s, t = logits64
    with pytest.raises(XTokenError, match=r"uld_tail must be one of \['pad', 'truncate'\].*distill.uld_tail"):
        ref.uld(s, t, uld_tail="cut")
    with pytest.raises(XTokenError, match=r"uld_top_k must be an integer >= 1.*distill.uld_top_k"):
        ref.gold(s, t, hand_w(), uld_tail="truncate", uld_top_k=0)


def _pkl_top_k_hand(s: np.ndarray, t: np.ndarray, w: np.ndarray, k: int, rows: list[int], renormalize: bool) -> float:
    """NeMo-RL's subset: importance = each teacher id's largest logit over ALL rows (masked ones too)."""
    imp = t.max(axis=0)
    keep = sorted(np.argsort(-imp, kind="stable")[:k].tolist())
    total = 0.0
    for i in rows:
        pt = _softmax(t[i, keep])
        q = (_softmax(s[i]) @ w)[keep]
        if renormalize:  # merge="reference": q / (Σ_K q + 1e-10), log(· + 1e-10)
            log_q = np.log(q / (q.sum() + 1e-10) + 1e-10)
        else:
            log_q = np.log(np.maximum(q, 1e-12))
        total += float((pt * (np.log(pt) - log_q)).sum())
    return total / len(rows)


@pytest.mark.parametrize("k", [1, 3, 5, 6, 100])
def test_p_kl_teacher_top_k_by_hand(logits64, k):
    s, t = logits64
    w = dense_w(hand_w())
    mask = torch.tensor([True, False, True, True, False])
    got = ref.p_kl(s, t, hand_w(), mask=mask, teacher_top_k=k)
    want = _pkl_top_k_hand(s.numpy(), t.numpy(), w, k, [0, 2, 3], renormalize=False)
    assert abs(float(got) - want) < 1e-10 * max(1.0, abs(want))
    # one-position chunks (position i predicts chunk i + 1; the last predicts none): merge="reference"
    # renormalizes the projection over the k ids, as NeMo-RL; the importance still reads every row
    n = s.shape[0]
    al = positions_from_token_chunks(torch.arange(n), torch.arange(n), torch.zeros(n, dtype=torch.long),
                                     torch.zeros(n, dtype=torch.long), n)
    got_r = ref.p_kl(s, t, hand_w(), alignment=al, merge="reference", teacher_top_k=k)
    want_r = _pkl_top_k_hand(s.numpy(), t.numpy(), w, k, list(range(n - 1)), renormalize=True)
    assert abs(float(got_r) - want_r) < 1e-9 * max(1.0, abs(want_r))
    if k < V_T:
        assert abs(float(got) - float(ref.p_kl(s, t, hand_w(), mask=mask))) > 1e-6


def test_p_kl_teacher_top_k_refusals(logits64):
    s, t = logits64
    for bad in (0, -3, 2.5, True):
        with pytest.raises(XTokenError, match=r"teacher_top_k must be an integer >= 1.*distill.teacher_top_k"):
            ref.p_kl(s, t, hand_w(), teacher_top_k=bad)


# ---- the dynamic scale's cap ---------------------------------------------------------------------


def test_kd_scale_max_caps_the_scale_and_its_gradient():
    ce = torch.tensor(3.0, dtype=torch.float64)
    for kd_value, cap, scale in ((0.01, 10.0, 10.0), (0.01, None, 300.0), (1.5, 10.0, 2.0), (0.0, 10.0, 0.0)):
        kd = torch.tensor(kd_value, dtype=torch.float64, requires_grad=True)
        total = total_loss(ce, kd, max_scale=cap)
        total.backward()
        assert abs(float(dynamic_scale(ce, kd, cap)) - scale) < 1e-9
        assert abs(float(total) - (scale * kd_value + 3.0)) < 1e-9
        assert abs(float(kd.grad) - scale) < 1e-9
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(XTokenError, match="kd_scale_max must be a positive finite number"):
            dynamic_scale(ce, ce, bad)
    with pytest.raises(XTokenError, match="caps the dynamic scale: with fixed weights use kd_weight"):
        total_loss(ce, ce, mode="fixed", max_scale=10.0)


def test_balancer_logs_the_capped_scale():
    from modelopt.torch.distill.loss_balancers import STUDENT_LOSS_KEY

    from nemo_xtoken.integration.distill import XTokenLossBalancer

    b = XTokenLossBalancer("dynamic", kd_scale_max=10.0)
    kd = torch.tensor(0.01, requires_grad=True)
    out = b({STUDENT_LOSS_KEY: torch.tensor(3.0), "LogitsLoss": kd})
    assert abs(float(out["dynamic_scale"]) - 10.0) < 1e-6
    out["kd_loss"].backward()
    assert abs(float(kd.grad) - 10.0) < 1e-5
    with pytest.raises(XTokenError, match="kd_scale_max caps the dynamic scale"):
        XTokenLossBalancer("fixed", kd_scale_max=10.0)


# ---- tensor-parallel parity (values and gradients) at tp 1/2/4 ------------------------------------


def make_option_cases() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    W = tpar.random_projection()
    VS, VSP, VT, VTP = tpar.VS, tpar.VS_PAD, tpar.VT, tpar.VT_PAD
    al = tpar.random_alignment(rng, VS, VT)
    ns, nt, n = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel(), 12
    mask = torch.ones(n, dtype=torch.bool)
    mask[[2, 5]] = False

    def lg(rows: int, v: int) -> torch.Tensor:
        return torch.randn(rows, v, generator=g) * 3.0

    cases = []

    def add(loss, tag, s, t, opts, **extra):
        kw = dict(student_vocab_size=VS, teacher_vocab_size=VT) if loss == "uld" else {}
        cases.append(dict(loss=loss, vs=VS, vt=VT, kw=kw, tag=tag, s=s, t=t, opts=opts, W=None if loss == "uld" else W, **extra))

    trunc = dict(uld_tail="truncate")
    add("uld", "truncate", lg(n, VSP), lg(n, VTP), trunc)
    add("uld", "truncate-k7-chain", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, uld_tail="truncate", uld_top_k=7))
    add("gold", "truncate-mask-sum", lg(n, VSP), lg(n, VTP), dict(mask=mask, reduction="sum", **trunc))
    add("gold", "truncate-blocked-chain", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, block_size=3, **trunc))
    add("h_kl", "reference-set", lg(n, VSP), lg(n, VTP), dict(common_set="reference"))
    add("h_kl", "reference-set-truncate-chain", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, common_set="reference", uld_tail="truncate", uld_top_k=9))
    add("h_kl", "reference-set-adaptive-blocked", lg(n, VSP), lg(n, VTP),
        dict(common_set="reference", matched_weight=None, unmatched_weight=None, block_size=5))
    add("p_kl", "top-k", lg(n, VSP), lg(n, VTP), dict(mask=mask, teacher_top_k=9))
    add("p_kl", "top-k-1", lg(n, VSP), lg(n, VTP), dict(teacher_top_k=1))  # on tp 4 three ranks keep no column
    add("p_kl", "top-k-chain-none", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, reduction="none", teacher_top_k=11),
        weights=torch.rand(al.n_chunks, generator=g))
    add("p_kl", "top-k-reference-merge", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, merge="reference", teacher_top_k=13))
    add("p_kl", "top-k-reference-merge-permuted", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, merge="reference", teacher_top_k=13), permute=True)
    add("p_kl", "top-k-blocked-chain", lg(ns, VSP), lg(nt, VTP), dict(alignment=al, block_size=3, teacher_top_k=10))
    return cases


@pytest.fixture(scope="module")
def option_cases():
    return make_option_cases()


@pytest.fixture(scope="module")
def option_references(option_cases):
    return [tpar._reference(c) for c in option_cases]


@pytest.mark.parametrize("tp", (1, 2, 4))
def test_options_tensor_parallel_parity(tp, option_cases, option_references):
    """Every option on vocab shards: the reference value on every rank, the reference gradient sliced."""
    from nemo_xtoken.testing import run_distributed

    per_rank = run_distributed(tpar._rank_run, tp, option_cases, timeout=600)
    for i, case in enumerate(option_cases):
        rv, rg = option_references[i]
        for rank in range(tp):
            torch.testing.assert_close(per_rank[rank][i][0], rv, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{case['loss']}/{case['tag']} tp={tp} rank {rank}: {m}")
        grad = torch.cat([per_rank[r][i][1] for r in range(tp)], dim=1)
        assert rg.abs().max() > 1e-4, case["tag"]
        torch.testing.assert_close(grad, rg, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case['loss']}/{case['tag']} tp={tp} gradient: {m}")


def test_the_options_change_the_value(option_cases, option_references):
    """Against the default of each loss (so the parity above cannot pass with the options ignored)."""
    for case, (rv, _) in zip(option_cases, option_references):
        plain = dict(case, opts={k: v for k, v in case["opts"].items() if k not in ("uld_tail", "uld_top_k", "common_set", "teacher_top_k")})
        if case["tag"] == "top-k-1" or case["opts"].get("reduction") == "none":
            continue
        dv, _ = tpar._reference(plain)
        assert not torch.allclose(rv, dv, rtol=1e-4, atol=1e-6), case["tag"]


def test_low_traffic_paths_refuse_what_they_cannot_do():
    import nemo_xtoken.parallel as P
    from nemo_xtoken.parallel.summary import HybridPlan

    W = tpar.random_projection()
    s, t = torch.randn(4, tpar.VS_PAD), torch.randn(4, tpar.VT_PAD)
    with pytest.raises(XTokenError, match="uld_tail='truncate'.*no low-traffic summary.*tp_exchange: exact"):
        P.vocab_parallel_uld(s, t, student_vocab_size=tpar.VS, teacher_vocab_size=tpar.VT, summary_bins=16, uld_tail="truncate")
    plan = HybridPlan.build(W, 1, tpar.VS_PAD, tpar.VT_PAD, relaxed=True, bins=16)
    with pytest.raises(XTokenError, match="uld_tail='truncate'.*no low-traffic summary"):
        P.vocab_parallel_h_kl(s, t, plan, uld_tail="truncate")
    with pytest.raises(XTokenError, match="built with common_set='top1' but the loss asks for 'reference'"):
        P.vocab_parallel_h_kl(s, t, plan, common_set="reference")
    ref_plan = HybridPlan.build(W, 1, tpar.VS_PAD, tpar.VT_PAD, relaxed=True, bins=16, common_set="reference")
    assert ref_plan.n_common_teacher == ref.reference_common_set(ref.resolve_projection(W)).teacher_ids.numel()
    # its common-set KL is exact and the summary's bound holds: within bound of the exact reference value
    from nemo_xtoken.parallel.summary import SummaryBound

    bound = SummaryBound()
    low = P.vocab_parallel_h_kl(s, t, ref_plan, common_set="reference", bound_out=bound)
    exact = ref.h_kl(s, t, W, common_set="reference")
    assert 0.0 <= float(exact - low) + 1e-5 and float(exact - low) <= float(bound.total("mean")) + 1e-5


# ---- the config keys and `xtoken distill --check` --------------------------------------------------


def _cfg(tmp_path, distill: dict, loss: str = "h_kl", top: dict | None = None, **teacher):
    import yaml

    from nemo_xtoken.integration.config import load_config

    d = {
        "student": {"tokenizer": "s.json", "seq_length": 32},
        "teachers": [{"name": "t", "tokenizer": "t.json", "projection": "w.safetensors", "loss": loss, **teacher}],
        "train": {"train_iters": 20, "global_batch_size": 4, "micro_batch_size": 2},
        "distill": distill,
        **(top or {}),
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_config(p)


@pytest.mark.parametrize(
    "distill,loss,teacher,pattern",
    [
        ({"uld_tail": "cut"}, "h_kl", {}, r"distill.uld_tail: 'cut' is not one of \['pad', 'truncate'\]"),
        ({"uld_top_k": 0}, "gold", {}, r"distill.uld_top_k: must be ≥ 1"),
        ({"common_set": "exact"}, "h_kl", {}, r"distill.common_set: 'exact' is not one of \['top1', 'reference'\]"),
        ({"kd_scale_max": 0}, "p_kl", {}, r"distill.kd_scale_max: must be a positive finite number"),
        ({"kd_scale_max": ".inf"}, "p_kl", {}, r"distill.kd_scale_max"),
        ({"kd_scale_max": 10, "kd_scaling": "fixed"}, "p_kl", {}, r"distill.kd_scale_max: caps the dynamic scale but distill.kd_scaling is 'fixed'"),
        ({"teacher_top_k": 0}, "p_kl", {}, r"distill.teacher_top_k: must be ≥ 1 or null"),
        ({"teacher_top_k": "many"}, "p_kl", {}, r"distill.teacher_top_k must be an integer"),
        ({"teacher_top_k": 8192}, "p_kl", {"cache": "c", "tokenizer": ""}, r"distill.teacher_top_k: teacher t is cached"),
        ({"uld_tail": "truncate"}, "gold", {}, None),  # tp 1: exact, accepted
    ],
)
def test_config_rows(tmp_path, distill, loss, teacher, pattern):
    from nemo_xtoken.integration.config import ConfigError

    if "kd_scale_max" in distill and distill["kd_scale_max"] == ".inf":
        distill = dict(distill, kd_scale_max=float("inf"))
    if pattern is None:
        cfg = _cfg(tmp_path, distill, loss, **teacher)
        assert cfg.distill.uld_tail == "truncate"
        return
    with pytest.raises(ConfigError, match=pattern):
        _cfg(tmp_path, distill, loss, **teacher)


def test_config_truncate_refused_on_the_summary_exchange(tmp_path):
    from nemo_xtoken.integration.config import ConfigError, loss_options

    with pytest.raises(ConfigError, match=r"distill.uld_tail: truncate has no low-traffic summary.*teachers \['t'\].*tp_exchange: exact"):
        _cfg(tmp_path, {"uld_tail": "truncate"}, "h_kl", top={"parallel": {"tensor_model_parallel_size": 2}})
    import yaml

    from nemo_xtoken.integration.config import load_config

    p = tmp_path / "tp2.yaml"
    p.write_text(yaml.safe_dump({
        "student": {"tokenizer": "s.json", "seq_length": 32},
        "teachers": [{"name": "t", "tokenizer": "t.json", "projection": "w", "loss": "h_kl"}],
        "parallel": {"tensor_model_parallel_size": 2},
        "distill": {"uld_tail": "truncate", "tp_exchange": "exact", "common_set": "reference", "teacher_top_k": 16},
    }))
    cfg = load_config(p)
    assert loss_options(cfg.distill, "h_kl") == {"uld_tail": "truncate", "uld_top_k": 8192, "common_set": "reference"}
    assert loss_options(cfg.distill, "p_kl") == {"teacher_top_k": 16}
    assert loss_options(cfg.distill, "kl") == {}


def test_check_prints_the_chosen_options(capsys):
    import json

    from nemo_xtoken.cli.main import main

    conf = str(Path(__file__).resolve().parents[1] / "conf" / "llama32_1b__phi4mini_hkl.yaml")
    assert main(["distill", "--config", conf, "--check", "--no-resources", "distill.common_set=reference",
                 "distill.uld_tail=truncate", "distill.uld_top_k=4096", "distill.tp_exchange=exact", "distill.kd_scale_max=100"]) == 0
    out = capsys.readouterr()
    assert "kd options: uld_tail truncate (top 4096, NeMo-RL); common_set reference" in out.err
    assert "kd_scale_max 100.0" in out.err and "teacher_top_k none" in out.err
    report = json.loads(out.out)
    opts = report["kd_options"]
    assert opts["kd_scale_max"] == 100.0
    assert any(v.get("common_set") == "reference" and v.get("uld_top_k") == 4096 for v in opts["teachers"].values())


def test_criterion_refuses_truncate_on_the_summary_exchange():
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss

    W = tpar.random_projection()
    spec = TeacherSpec(name="t", loss="h_kl", projection=W, teacher_vocab_size=tpar.VT, options={"uld_tail": "truncate"})
    with pytest.raises(XTokenError, match="teacher t: uld_tail 'truncate' has no low-traffic summary.*tp_exchange 'exact'"):
        XTokenLogitsLoss([spec], student_vocab_size=tpar.VS, student_padded=tpar.VS_PAD, teacher_padded=[tpar.VT_PAD], tp=2)
    crit = XTokenLogitsLoss([spec], student_vocab_size=tpar.VS, student_padded=tpar.VS_PAD, teacher_padded=[tpar.VT_PAD],
                            tp=2, tp_exchange="exact")
    assert crit.exchanges == ["all-gather"]
