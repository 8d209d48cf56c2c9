"""Learnable W in the tensor-parallel P-KL: values and gradients (student logits and W) = the reference.

The plan is built once from the sparsity pattern; each call fills it with the module's current
weights, and W's gradient (each non-zero lives in one rank's matrices) is summed over the group,
so every rank holds the full gradient of its replicated W.  Checked at tp 1, 2, 4 on gloo, with
and without a permuted teacher, for positions and chunks; and W's weights after a few
optimizer steps equal the single-device run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.losses import LearnableProjection, p_kl
from nemo_xtoken.testing import run_distributed
from tests.test_parallel import VS, VS_PAD, VT, VT_PAD, random_alignment, random_projection


def _inputs():
    g = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    al = random_alignment(rng, VS, VT)
    return dict(
        s=3 * torch.randn(12, VS_PAD, generator=g), t=3 * torch.randn(12, VT_PAD, generator=g),
        s_al=3 * torch.randn(al.student_chunk_ids.numel(), VS_PAD, generator=g),
        t_al=3 * torch.randn(al.teacher_chunk_ids.numel(), VT_PAD, generator=g), al=al,
        logits=0.5 * torch.randn(random_projection().indices.size, generator=g),  # W moved away from the built one
    )


def _learnable(inp) -> LearnableProjection:
    lw = LearnableProjection(random_projection())
    with torch.no_grad():
        lw.logits.add_(inp["logits"])
    return lw


def _steps(fn, inp, n_steps: int = 3):
    """(values, grads of the student logits, grads of W's logits) of a few Adam steps on W and the logits."""
    out = []
    lw = _learnable(inp)
    s = inp["s"].clone().requires_grad_(True)
    s_al = inp["s_al"].clone().requires_grad_(True)
    opt = torch.optim.Adam([lw.logits, s, s_al], lr=0.05)
    for _ in range(n_steps):
        opt.zero_grad()
        v1 = fn(s, inp["t"], lw, {})
        v2 = fn(s_al, inp["t_al"], lw, dict(alignment=inp["al"], merge="chain"))
        (v1 + 0.5 * v2).backward()
        out.append((v1.detach(), v2.detach(), s.grad.clone(), s_al.grad.clone(), lw.logits.grad.clone()))
        opt.step()
    return out, lw.weights().detach()


def _rank(rank: int, world: int, inp: dict, permute: bool) -> tuple:
    import nemo_xtoken.parallel as P

    ws, wt = VS_PAD // world, VT_PAD // world
    perm = P.teacher_permutation(random_projection(), world, VS_PAD, VT_PAD) if permute else None
    plan_holder: dict = {}

    def fn(s, t, lw, kw):
        if "plan" not in plan_holder:  # built once from the pattern, keeps the module
            plan_holder["plan"] = P.PKLPlan.build(lw, world, VS_PAD, VT_PAD, teacher_perm=perm)
        plan = plan_holder["plan"]
        assert plan.learnable is lw
        if perm is not None:
            t = t[:, torch.from_numpy(perm)]
        return P.vocab_parallel_p_kl(s_shard(s), t[:, rank * wt : (rank + 1) * wt], plan, **kw)

    def s_shard(s):  # a differentiable view: the shard's gradient lands in the full tensor's slice
        return s[:, rank * ws : (rank + 1) * ws]

    out, w = _steps(fn, inp)
    return [(v1, v2, g1[:, rank * ws : (rank + 1) * ws], g2[:, rank * ws : (rank + 1) * ws], gw) for v1, v2, g1, g2, gw in out], w


@pytest.fixture(scope="module")
def inputs():
    return _inputs()


@pytest.fixture(scope="module")
def reference(inputs):
    return _steps(lambda s, t, lw, kw: p_kl(s, t, lw, **kw), inputs)


@pytest.mark.parametrize("tp,permute", [(1, False), (2, False), (2, True), (4, True)])
def test_learnable_w_tensor_parallel_equals_reference(tp, permute, inputs, reference):
    ref_steps, ref_w = reference
    per_rank = run_distributed(_rank, tp, inputs, permute, timeout=900)
    ws = VS_PAD // tp
    for step, (v1, v2, g1, g2, gw) in enumerate(ref_steps):
        assert gw.abs().max() > 1e-4  # W's gradient is meaningful
        for rank in range(tp):
            pv1, pv2, pg1, pg2, pgw = per_rank[rank][0][step]
            torch.testing.assert_close(pv1, v1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pv2, v2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pg1, g1[:, rank * ws : (rank + 1) * ws], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(pg2, g2[:, rank * ws : (rank + 1) * ws], rtol=1e-4, atol=1e-6)
            # the full W gradient on every rank (not a per-rank part, not tp times it)
            torch.testing.assert_close(pgw, gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} rank {rank} W grad: {m}")
    for rank in range(tp):
        torch.testing.assert_close(per_rank[rank][1], ref_w, rtol=1e-4, atol=1e-6)
