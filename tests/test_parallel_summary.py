"""Low-traffic ULD / GOLD / H-KL (nemo_xtoken.parallel.summary) against the references.

* the sorted-L1 summary brackets the exact sorted L1 with its stated bound (``value ≤ exact ≤
  value + bound``), equals it (value and gradient) where the bound is 0, and is additive: the
  sharded value equals the single-device one;
* at tp 1/2/4 on gloo (teacher permuted or not): the common-set KL is exactly the reference's
  (values and gradients), the whole loss is within the bound of the reference, and every rank's
  value and gradient equal the single-device low-traffic loss (the sharding changes nothing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import reference as ref
from nemo_xtoken.parallel.losses import _sorted_l1
from nemo_xtoken.parallel.plan import teacher_permutation
from nemo_xtoken.parallel.summary import HybridPlan, summary_sorted_l1
from nemo_xtoken.testing import run_distributed
from tests.test_parallel import VS, VS_PAD, VT, VT_PAD, random_alignment, random_projection

BINS = 2048


def _exact_grads(ps, pt):
    ps = ps.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_sorted_l1(ps, pt).sum(), ps)
    return g


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("widths", [(50, 70), (700, 300), (3000, 4500)])
def test_summary_brackets_the_exact_sorted_l1(scale, widths):
    g = torch.Generator().manual_seed(int(scale * 10) + widths[0])
    ps = torch.softmax(torch.randn(6, widths[0], generator=g, dtype=torch.float64) * scale, 1)
    pt = torch.softmax(torch.randn(6, widths[1], generator=g, dtype=torch.float64) * scale, 1)
    pt[0, : widths[1] // 2] = 0.0  # exact zeros (masked columns) take no part
    exact = _sorted_l1(ps, pt)
    ps_ = ps.clone().requires_grad_(True)
    value, bound = summary_sorted_l1(ps_, pt, bins=BINS)
    assert bool((value <= exact + 1e-12).all()) and bool((exact <= value + bound + 1e-12).all())
    assert bool((bound < 0.5 * exact).all())  # the bound is informative, not trivial
    # the gradient is the exact one (±1 by sorted position) for almost every probability
    (gv,) = torch.autograd.grad(value.sum(), ps_)
    agree = (gv - _exact_grads(ps, pt)).abs() < 1e-9
    assert agree[ps > 0].double().mean() > 0.9


def test_summary_is_exact_where_the_counts_cannot_cross():
    """At most one probability per interval (both sides): the counts' difference cannot change sign
    inside an interval, so the bound is 0 and value and gradient are exact."""
    ps = torch.zeros(2, 40, dtype=torch.float64)
    pt = torch.zeros(2, 30, dtype=torch.float64)
    ps[:, [3, 17, 29, 30]] = torch.tensor([0.55, 0.3, 0.1, 0.05], dtype=torch.float64)
    pt[:, [0, 8, 21]] = torch.tensor([0.5, 0.35, 0.15], dtype=torch.float64)
    ps_ = ps.clone().requires_grad_(True)
    value, bound = summary_sorted_l1(ps_, pt, bins=BINS)
    assert float(bound.abs().max()) == 0.0
    torch.testing.assert_close(value, _sorted_l1(ps, pt), rtol=1e-12, atol=1e-12)
    (gv,) = torch.autograd.grad(value.sum(), ps_)
    pos = ps > 0  # zeros tie with each other in the sort: their exact gradient depends on the tie order
    torch.testing.assert_close(gv[pos], _exact_grads(ps, pt)[pos])


def test_summary_is_additive_over_column_shards():
    """The value is a function of per-column sums: any split of the columns gives the same summary."""
    g = torch.Generator().manual_seed(5)
    ps = torch.softmax(torch.randn(4, 96, generator=g, dtype=torch.float64) * 2, 1)
    pt = torch.softmax(torch.randn(4, 64, generator=g, dtype=torch.float64) * 2, 1)
    v1, b1 = summary_sorted_l1(ps, pt, bins=BINS)
    perm_s, perm_t = torch.randperm(96, generator=g), torch.randperm(64, generator=g)
    v2, b2 = summary_sorted_l1(ps[:, perm_s], pt[:, perm_t], bins=BINS)
    torch.testing.assert_close(v2, v1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-12)


def test_hybrid_plan_refuses_wrong_loss_and_sizes():
    import nemo_xtoken.parallel as P

    W = random_projection()
    plan = HybridPlan.build(W, 1, VS_PAD, VT_PAD, relaxed=True)
    s, t = torch.zeros(3, VS_PAD), torch.zeros(3, VT_PAD)
    with pytest.raises(XTokenError, match="built for H-KL"):
        P.vocab_parallel_gold(s, t, plan)
    with pytest.raises(XTokenError, match="expects padded vocabularies"):
        P.vocab_parallel_h_kl(torch.zeros(3, 40), t, plan)
    with pytest.raises(XTokenError, match="at least 2 bins"):
        HybridPlan.build(W, 1, VS_PAD, VT_PAD, relaxed=True, bins=1)


# ---- tensor-parallel parity ---------------------------------------------------------------------
def make_cases() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)

    def logits(n: int, v: int, scale: float = 3.0) -> torch.Tensor:
        return torch.randn(n, v, generator=g) * scale

    cases = []
    for name in ("h_kl", "gold", "uld"):
        al = random_alignment(rng, VS, VT)
        ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
        mask = torch.ones(10, dtype=torch.bool)
        mask[[1, 6]] = False
        for tag, s, t, opts, permute in (
            ("plain", logits(10, VS_PAD), logits(10, VT_PAD), {}, False),
            ("mask-sum-T2", logits(10, VS_PAD), logits(10, VT_PAD, 1.0), dict(mask=mask, reduction="sum", temperature=2.0, scale_by_temperature_squared=True), False),
            ("chain-permuted", logits(ns, VS_PAD), logits(nt, VT_PAD), dict(alignment=al), True),
            ("mean-none", logits(ns, VS_PAD), logits(nt, VT_PAD), dict(alignment=al, merge="mean", reduction="none"), False),
            ("adaptive", logits(10, VS_PAD), logits(10, VT_PAD), dict(matched_weight=None, unmatched_weight=None), True),
            ("blocked", logits(ns, VS_PAD), logits(nt, VT_PAD), dict(alignment=al, block_size=3), False),
        ):
            if name == "uld" and (permute or "matched_weight" in opts):
                continue
            cases.append(dict(loss=name, tag=tag, s=s, t=t, opts=opts, permute=permute))
    return cases


def _weights(val: torch.Tensor) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, val.numel()).reshape(val.shape) if val.dim() else torch.ones(())


def _low_traffic(case: dict, rank: int, world: int, matched_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    import nemo_xtoken.parallel as P

    s_full, t_full = case["s"], case["t"]
    ws, wt = VS_PAD // world, VT_PAD // world
    opts = dict(case["opts"])
    if matched_only:
        opts.update(unmatched_weight=0.0, matched_weight=1.0)
    if case["loss"] == "uld":
        fn, args = P.vocab_parallel_uld, ()
        opts.update(student_vocab_size=VS, teacher_vocab_size=VT, summary_bins=BINS)
    else:
        perm = teacher_permutation(random_projection(), world, VS_PAD, VT_PAD) if case["permute"] else None
        if perm is not None:
            t_full = t_full[:, torch.from_numpy(perm)]
        plan = HybridPlan.build(random_projection(), world, VS_PAD, VT_PAD, relaxed=case["loss"] == "h_kl", teacher_perm=perm, bins=BINS)
        fn, args = (P.vocab_parallel_h_kl if case["loss"] == "h_kl" else P.vocab_parallel_gold), (plan,)
    s = s_full[:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
    t = t_full[:, rank * wt : (rank + 1) * wt].clone()
    val = fn(s, t, *args, **opts)
    (val * _weights(val)).sum().backward()
    return val.detach(), s.grad


def _rank_run(rank: int, world: int, cases: list[dict]) -> list:
    out = []
    for case in cases:
        full = _low_traffic(case, rank, world)
        matched = _low_traffic(case, rank, world, matched_only=True) if case["loss"] != "uld" else None
        out.append((full, matched))
    return out


def _reference(case: dict, matched_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    s = case["s"].clone().requires_grad_(True)
    opts = dict(case["opts"])
    opts.pop("block_size", None)
    if matched_only:
        opts.update(unmatched_weight=0.0, matched_weight=1.0)
    if case["loss"] == "uld":
        val = ref.uld(s, case["t"], student_vocab_size=VS, teacher_vocab_size=VT, **opts)
    else:
        val = ref.LOSSES[case["loss"]](s, case["t"], random_projection(), **opts)
    (val * _weights(val)).sum().backward()
    return val.detach(), s.grad


@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module")
def single_device(cases):
    return [(_low_traffic(c, 0, 1), _low_traffic(c, 0, 1, True) if c["loss"] != "uld" else None) for c in cases]


def test_single_device_common_set_exact_and_sorted_l1_within_bound(cases, single_device):
    for case, (full, matched) in zip(cases, single_device):
        if matched is not None:  # the common-set KL through the exchange: exactly the reference's
            rv, rg = _reference(case, matched_only=True)
            torch.testing.assert_close(matched[0], rv, rtol=1e-5, atol=1e-6, msg=f"{case['loss']} {case['tag']}")
            torch.testing.assert_close(matched[1], rg, rtol=1e-5, atol=1e-6, msg=f"{case['loss']} {case['tag']}")
        rv, rg = _reference(case)
        # the whole loss: within a few per cent of the reference here (tiny vocabularies: coarse counts)
        torch.testing.assert_close(full[0], rv, rtol=0.03, atol=1e-3, msg=f"{case['loss']} {case['tag']}")
        assert float(torch.nn.functional.cosine_similarity(full[1].flatten(), rg.flatten(), dim=0)) > 0.9


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_equals_single_device(tp, cases, single_device):
    per_rank = run_distributed(_rank_run, tp, cases, timeout=900)
    w = VS_PAD // tp
    for r, results in enumerate(per_rank):
        for case, (full, matched), (sfull, smatched) in zip(cases, results, single_device):
            msg = f"{case['loss']} {case['tag']} tp={tp} rank={r}"
            torch.testing.assert_close(full[0], sfull[0], rtol=1e-5, atol=1e-6, msg=msg)
            torch.testing.assert_close(full[1], sfull[1][:, r * w : (r + 1) * w], rtol=1e-5, atol=1e-6, msg=msg)
            if matched is not None:
                torch.testing.assert_close(matched[0], smatched[0], rtol=1e-5, atol=1e-6, msg=msg)
                torch.testing.assert_close(matched[1], smatched[1][:, r * w : (r + 1) * w], rtol=1e-5, atol=1e-6, msg=msg)
