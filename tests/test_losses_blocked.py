"""Token-blocked losses (``block_size=``) against the unblocked reference: values and gradients, every option.

Blocks of 1, 2 and 3 positions split every multi-position chunk boundary case of the hand
alignment and of random alignments; the gradients of the student logits, the teacher logits and a
learnable W's parameters must equal the unblocked ones (float64, 1e-12), for every reduction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.align import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import LearnableProjection, p_kl
from nemo_xtoken.losses.blocked import item_blocks
from tests.test_losses_reference import V_S, V_T, call_ref, hand_alignment, logits, make_csr, make_projection

LOSSES = ["kl", "p_kl", "uld", "gold", "h_kl"]


def _grads(out, xs):
    if out.dim() == 1:
        g = torch.Generator().manual_seed(3)
        out = (out * torch.rand(out.shape, generator=g, dtype=out.dtype)).sum()
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def _compare(name, s, t, block_size, **kw):
    want = call_ref(name, s, t, make_csr(), **kw)
    got = call_ref(name, s, t, make_csr(), block_size=block_size, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got, (s, t)), _grads(want, (s, t))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("merge", [None, "chain", "mean", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_blocked_equals_unblocked(name, merge, reduction, block_size):
    v_t = V_S if name == "kl" else V_T
    kw = dict(reduction=reduction, temperature=1.3)
    if merge is None:
        s, t = logits(6, V_S + 2, 1), logits(6, v_t + 1, 2)
        kw["mask"] = torch.tensor([True, False, True, True, False, True])
    else:
        s, t = logits(6, V_S + 2, 1), logits(7, v_t + 1, 2)
        a, _ = hand_alignment()
        if name == "kl":
            a.teacher_targets.clamp_(max=V_S - 1)
        kw.update(alignment=a, merge=merge)
    _compare(name, s, t, block_size, **kw)


@pytest.mark.parametrize("seed", range(12))
def test_blocked_random_alignments(seed):
    rng = np.random.default_rng(seed)
    name = LOSSES[seed % len(LOSSES)]
    n_chunks = int(rng.integers(1, 9))
    s_ids = np.sort(rng.integers(-1, n_chunks, size=int(rng.integers(0, 12))))
    t_ids = np.sort(rng.integers(-1, n_chunks, size=int(rng.integers(0, 12))))
    v_t = V_S if name == "kl" else V_T
    a = AlignedPositions(
        torch.from_numpy(s_ids), torch.from_numpy(t_ids), torch.from_numpy(rng.integers(0, V_S, size=s_ids.size)),
        torch.from_numpy(rng.integers(0, v_t, size=t_ids.size)), n_chunks,
    )
    s, t = logits(s_ids.size, V_S, seed), logits(t_ids.size, v_t, seed + 50)
    _compare(name, s, t, int(rng.integers(1, 5)), alignment=a, merge=str(rng.choice(["chain", "mean", "reference"])),
             reduction=str(rng.choice(["mean", "sum", "none"])))


def test_blocked_learnable_w_gradient():
    lw = LearnableProjection(make_projection())
    with torch.no_grad():
        lw.logits.add_(0.3 * torch.randn(lw.logits.shape, generator=torch.Generator().manual_seed(0)))
    s, t = logits(7, V_S, 3).float(), logits(7, V_T, 4).float()
    want = p_kl(s, t, lw)
    gw = torch.autograd.grad(want, [s, lw.logits])
    got = p_kl(s, t, lw, block_size=2)
    gb = torch.autograd.grad(got, [s, lw.logits])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # float32 sums in another order (blocks)
    for a, b in zip(gb, gw):
        assert b.abs().max() > 1e-4
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_blocked_bf16_inputs_and_gradient_dtype():
    s = logits(9, V_S, 5).bfloat16().detach().requires_grad_(True)
    t = logits(9, V_T, 6).bfloat16()
    want = p_kl(s, t, make_projection())
    (gw,) = torch.autograd.grad(want, s)
    got = p_kl(s, t, make_projection(), block_size=4)
    (gb,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32 and gb.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 sums in another order (blocks)
    torch.testing.assert_close(gb.float(), gw.float(), rtol=1e-2, atol=1e-4)


def test_blocks_keep_chunks_whole_and_bound_positions():
    a = AlignedPositions(
        torch.tensor([0, 0, 1, -1, 2, 2, 2, 3]), torch.tensor([0, 1, 1, 1, 1, 2, 3, -1]),
        torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), 5,
    )
    blocks = item_blocks(8, 8, a, 3)
    # chunk 1 has 4 teacher positions (a block of its own); chunk 2 fills a block with its 3 student positions
    assert [b[3] for b in blocks] == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 5)]
    for rs, rt, sub, items in blocks:
        assert sub.n_chunks == items.stop - items.start
        assert torch.equal(a.student_chunk_ids[rs] - items.start, sub.student_chunk_ids)
        assert torch.equal(a.teacher_chunk_ids[rt] - items.start, sub.teacher_chunk_ids)
    covered = torch.cat([rs for rs, _, _, _ in blocks]).tolist()
    assert covered == [0, 1, 2, 4, 5, 6, 7]  # every position in a chunk, once; -1 positions in none
    with pytest.raises(XTokenError, match="block_size"):
        item_blocks(8, 8, a, 0)
    with pytest.raises(XTokenError, match="alignment covers"):
        item_blocks(7, 8, a, 3)


def test_blocked_memory_holds_one_block(monkeypatch):
    """The largest tensor the blocked P-KL allocates besides the gradient buffer is one block wide."""
    import nemo_xtoken.losses.reference as R

    sizes = []
    orig = R._log_probs

    def spy(x, real, temperature, dtype):
        sizes.append(x.shape[0])
        return orig(x, real, temperature, dtype)

    monkeypatch.setattr(R, "_log_probs", spy)
    s, t = logits(64, V_S, 7), logits(64, V_T, 8)
    out = p_kl(s, t, make_csr(), block_size=16)
    out.backward()
    assert sizes and max(sizes) == 16 and len(sizes) == 2 * 4 * 2  # both sides, 4 blocks, forward + recompute


@pytest.mark.parametrize("scheme", ["ce", "entropy", "max_prob"])
def test_teacher_scores_by_row_blocks(scheme):
    from nemo_xtoken.parallel import vocab_parallel_teacher_score

    t = logits(11, V_T + 2, 9).detach().float()
    tg = torch.randint(0, V_T, (11,), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    a = vocab_parallel_teacher_score(t, scheme, vocab_size=V_T, positions=pos, targets=tg)
    b = vocab_parallel_teacher_score(t, scheme, vocab_size=V_T, positions=pos, targets=tg, block_rows=3)
    torch.testing.assert_close(a, b)
