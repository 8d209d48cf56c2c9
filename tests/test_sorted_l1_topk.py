"""The parallel ULD/GOLD/H-KL rank-sorted L1 takes a top-k of the wider side (issue 12's demo time):
it must equal the zero-padded full sort — values and gradients — for every width order."""

from __future__ import annotations

import pytest
import torch

from nemo_xtoken.losses.reference import _sorted_l1 as _full_sort  # the reference: both sides sorted in full, zero-padded
from nemo_xtoken.parallel.losses import _sorted_l1


def _probs(n: int, w: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, w, generator=g, dtype=torch.float64) * scale).softmax(-1)


@pytest.mark.parametrize("ws, wt", [(1000, 94), (94, 1000), (300, 7), (7, 300), (50, 50), (40, 1), (1, 40)])
def test_topk_sorted_l1_equals_the_padded_full_sort(ws, wt):
    ps0, pt0 = _probs(64, ws, 1), _probs(64, wt, 2)
    out = []
    for fn in (_sorted_l1, _full_sort):
        ps, pt = ps0.clone().requires_grad_(True), pt0.clone().requires_grad_(True)
        v = fn(ps, pt)
        (v * torch.linspace(0.5, 2.0, v.shape[0], dtype=v.dtype)).sum().backward()
        out.append((v.detach(), ps.grad, pt.grad))
    (v, gs, gt), (v_ref, gs_ref, gt_ref) = out
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, gs_ref, rtol=0, atol=0)  # signs, exactly
    torch.testing.assert_close(gt, gt_ref, rtol=0, atol=0)


def test_topk_sorted_l1_empty_narrow_side_and_ties():
    ps = _probs(8, 30, 3)
    empty = ps.new_zeros(8, 0)
    torch.testing.assert_close(_sorted_l1(ps, empty), ps.sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(_sorted_l1(empty, ps), ps.sum(1), rtol=1e-12, atol=0)
    # ties (equal probabilities, exact zeros): same values as the full sort
    tied = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    narrow = torch.tensor([[0.6, 0.4], [0.25, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(_sorted_l1(tied, narrow), _full_sort(tied, narrow), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(_sorted_l1(narrow, tied), _full_sort(narrow, tied), rtol=1e-12, atol=1e-15)
    # fp32, the demo's dtype
    a, b = _probs(16, 500, 4).float(), _probs(16, 60, 5).float()
    torch.testing.assert_close(_sorted_l1(a, b), _full_sort(a, b), rtol=1e-5, atol=1e-6)
