"""partition_kl on vocab shards (gloo, tp ∈ {1, 2, 4}) against the reference: values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.losses import partition_kl
from nemo_xtoken.testing import run_distributed
from nemo_xtoken.testing.string_world import World, concat

TPS = (1, 2, 4)
PATTERNS = {"1:N": ((3, 1), (1, 1, 1, 1)), "N:1": ((1, 1, 1, 1), (2, 2)), "M:N": ((2, 2), (1, 2, 1))}


def _pad(v: int) -> int:
    return -(-v // 8) * 8 + 4  # divisible by 1, 2, 4, with padded columns


def make_cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for name, pat in PATTERNS.items():
        w = World.random(*pat, seed=1)
        sp = w.spellings()
        s, t, al = concat([w.batch(x)[:3] for x in ("abca$", "cabb$", "bbac$")])
        vs, vt = sp.shape
        ps, pt = _pad(vs), _pad(vt)

        def logits(n, v, vp):
            x = torch.randn(n, vp, generator=g) * 2.0
            return x

        base_s = torch.cat([s.float().clamp(min=-40), torch.zeros(s.shape[0], ps - vs)], 1) + logits(s.shape[0], vs, ps) * 0.3
        base_t = torch.cat([t.float().clamp(min=-40), torch.zeros(t.shape[0], pt - vt)], 1)
        n = 6
        mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
        for tag, st, tt, opts in (
            ("aligned", base_s, base_t, dict(alignment=al)),
            ("aligned-none-T2", base_s, base_t, dict(alignment=al, reduction="none", temperature=2.0)),
            ("blocked", base_s, base_t, dict(alignment=al, block_size=3)),
            ("random-logits", logits(s.shape[0], vs, ps), logits(t.shape[0], vt, pt), dict(alignment=al, reduction="sum")),
            ("positions-mask", logits(n, vs, ps), logits(n, vt, pt), dict(mask=mask)),
        ):
            cases.append(dict(tag=f"{name}-{tag}", s=st, t=tt, opts=opts, sp=sp, weights=torch.rand(al.n_chunks if "none" in tag else 1, generator=g)))
    return cases


def _objective(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (loss * weights).sum() if loss.dim() else loss * weights[0]


def _rank_fn(rank: int, world: int, cases: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from nemo_xtoken.parallel import PartitionTPPlan, vocab_parallel_partition_kl

    out = []
    for c in cases:
        s, t = c["s"], c["t"]
        ws, wt = s.shape[1] // world, t.shape[1] // world
        plan = PartitionTPPlan.build(c["sp"], world, s.shape[1], t.shape[1])
        x = s[:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
        loss = vocab_parallel_partition_kl(x, t[:, rank * wt : (rank + 1) * wt], plan, **c["opts"])
        _objective(loss, c["weights"]).backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("tp", TPS)
def test_tensor_parallel_equals_reference(tp):
    cases = make_cases()
    refs = []
    for c in cases:
        x = c["s"].clone().requires_grad_(True)
        loss = partition_kl(x, c["t"], c["sp"], **c["opts"])
        _objective(loss, c["weights"]).backward()
        refs.append((loss.detach(), x.grad))
    results = run_distributed(_rank_fn, tp, cases)
    for rank, res in enumerate(results):
        w = cases[0]["s"].shape[1] // tp
        for c, (rv, rg), (v, g) in zip(cases, refs, res):
            ws = c["s"].shape[1] // tp
            assert torch.allclose(v, rv, rtol=1e-5, atol=1e-6), (c["tag"], rank, v, rv)
            assert torch.allclose(g, rg[:, rank * ws : (rank + 1) * ws], rtol=1e-4, atol=1e-6), (c["tag"], rank)
        assert w > 0


def test_traffic_counted_like_pkl():
    """Level 1 exchanges what two P-KL plans send; no all-gather of a vocabulary row."""
    from nemo_xtoken.parallel import PartitionTPPlan
    from nemo_xtoken.parallel.partition import partition_values_per_token
    from nemo_xtoken.parallel.traffic import all_gather_values

    w = World.random((3, 1), (1, 1, 1, 1))
    plan = PartitionTPPlan.build(w.spellings(), 2, 64, 32)
    sent = partition_values_per_token(plan, buckets_per_chunk=10)
    assert sent.shape == (2,) and bool((sent < all_gather_values(64 + 32, 2)).all())
    assert np.allclose(sent - partition_values_per_token(plan, 0), 2 * 0.5 * 10)
