"""Learnable W under P-KL: starts at the built W, keeps its pattern and row sums, trains, saves."""

from __future__ import annotations

import pytest
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import LearnableProjection, p_kl
from tests import test_losses_bruteforce as bf
from tests.test_losses_reference import ROWS, V_S, V_T, hand_alignment, logits, make_csr, make_projection

EPS32 = torch.finfo(torch.float32).eps


def test_initial_weights_reproduce_the_built_w():
    lw = LearnableProjection(make_projection())
    assert lw.shape == (V_S, V_T) and lw.nnz == sum(len(r) for r in ROWS)
    dense = lw.to_sparse_csr().to_dense()
    torch.testing.assert_close(dense.double(), bf.dense_w(ROWS, V_S, V_T), rtol=16 * EPS32, atol=EPS32)  # softmax(log w) in float32: a few ulps
    s, t = logits(5, V_S + 1, 0), logits(5, V_T, 1)
    a = p_kl(s, t, lw)
    b = p_kl(s, t, make_projection())
    torch.testing.assert_close(a, b, rtol=16 * EPS32, atol=1e-7)  # W's float32 ulps, relative
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(ga, gb, rtol=16 * EPS32, atol=1e-7)


def test_constraints_hold_for_any_parameter_values():
    lw = LearnableProjection(make_csr())
    with torch.no_grad():
        lw.logits.copy_(torch.randn(lw.nnz, generator=torch.Generator().manual_seed(0)) * 5)
    w = lw.weights()
    assert torch.all(w >= 0)
    sums = torch.zeros(V_S, dtype=w.dtype).index_add(0, lw.rows, w)
    nonempty = torch.tensor([len(r) > 0 for r in ROWS])
    torch.testing.assert_close(sums[nonempty], torch.ones(int(nonempty.sum()), dtype=w.dtype))
    assert float(sums[~nonempty].sum().detach()) == 0.0  # the empty row stays empty
    dense = lw.to_sparse_csr().to_dense()
    pattern = bf.dense_w(ROWS, V_S, V_T) != 0
    assert torch.all(dense[~pattern] == 0)  # sparsity pattern fixed


def test_gradient_into_w_matches_bruteforce_and_training_lowers_the_loss():
    lw = LearnableProjection(make_csr()).double()
    with torch.no_grad():
        lw.logits.add_(0.3 * torch.randn(lw.nnz, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    a, chunks = hand_alignment()
    chunks["merge"] = "chain"
    s, t = logits(6, V_S, 2), logits(7, V_T, 3)
    got = p_kl(s, t, lw, alignment=a)
    # Brute force: the softmax over each row's entries, written out, then the dense P-KL.
    w_dense = torch.zeros(V_S, V_T, dtype=torch.float64)
    for r in range(V_S):
        idx = [k for k in range(lw.nnz) if int(lw.rows[k]) == r]
        if idx:
            z = torch.stack([lw.logits[k] for k in idx])
            e = torch.exp(z)
            for k, x in zip(idx, e / e.sum()):
                w_dense = w_dense.index_put((torch.tensor([r]), lw.cols[k : k + 1]), x.reshape(1), accumulate=True)
    its = bf.items(s, t, V_S, V_T, 1.0, chunks, None)
    vals = [bf.pkl_item(ps, pt, w_dense) for ps, pt, c in its if c]
    want = sum(vals) / len(vals)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(got, lw.logits)
    (g2,) = torch.autograd.grad(want, lw.logits)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    # A few optimizer steps on W alone lower the loss.
    opt = torch.optim.SGD(lw.parameters(), lr=0.5)
    s, t = s.detach(), t.detach()
    before = float(p_kl(s, t, lw, alignment=a))
    for _ in range(20):
        opt.zero_grad()
        p_kl(s, t, lw, alignment=a).backward()
        opt.step()
    assert float(p_kl(s, t, lw, alignment=a)) < before - 1e-3


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    lw = LearnableProjection(make_projection())
    with torch.no_grad():
        lw.logits.mul_(1.7)
    save_file(lw.state_dict(), str(tmp_path / "w.safetensors"))
    other = LearnableProjection(make_projection())
    assert not torch.allclose(other.weights(), lw.weights())
    other.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    torch.testing.assert_close(other.weights(), lw.weights())
    assert set(lw.state_dict()) == {"logits", "rows", "cols", "exact_rows", "size"}
    # A checkpoint of another W is refused, with the reason.
    other_rows = [list(r) for r in ROWS]
    other_rows[4] = [(5, 1.0)]
    rows_csr = make_csr(other_rows)
    with pytest.raises(XTokenError, match="sparsity pattern"):
        LearnableProjection(rows_csr).load_state_dict(lw.state_dict())
    with pytest.raises(XTokenError, match=r"shape \(7, 6\).*\(7, 8\)"):
        LearnableProjection(make_csr(v_t=8)).load_state_dict(lw.state_dict())


def test_bad_input():
    with pytest.raises(XTokenError, match="Projection or a torch sparse CSR"):
        LearnableProjection(torch.eye(3))
    neg = torch.tensor([[1.0, -0.5]]).to_sparse_csr()
    with pytest.raises(XTokenError, match="negative"):
        LearnableProjection(neg)
    lw = LearnableProjection(make_projection())
    with pytest.raises(XTokenError, match="other tokenizers"):
        p_kl(logits(2, V_S, 0), logits(2, V_T + 1, 1), lw, teacher_vocab_size=V_T + 1)
