"""The cheap column masks of ``vocab_parallel_log_softmax``: a padded tail as a prefix length.

Padding is a tail of columns, so the log-softmax fills it with a slice instead of a masked fill
(several times cheaper on a CPU), and a teacher's real-column mask read on the host becomes a
prefix length when it is one.  Both forms must give exactly (bit for bit) what the bool mask gives,
values and gradients, and a mask that is not a prefix must stay a mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.parallel.primitives import _fill_invalid, prefix_or_mask, real_prefix, vocab_parallel_log_softmax


def test_prefix_or_mask_forms():
    assert prefix_or_mask(None) is None
    assert prefix_or_mask(np.array([True, True, False, False])) == 2
    assert prefix_or_mask(np.array([True, True, True])) is None  # every column real
    assert prefix_or_mask(np.array([False, False])) == 0  # a shard of padding only
    m = prefix_or_mask(np.array([True, False, True, False]))  # not a prefix: stays a mask
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.tolist() == [True, False, True, False]
    t = torch.tensor([True, False, True])
    assert prefix_or_mask(t) is t


def test_real_prefix_per_shard():
    # vocabulary of 10 ids padded to 16 on 4 ranks (width 4): ranks hold 4, 4, 2, 0 real columns
    assert [real_prefix(4, r, 10) for r in range(4)] == [None, None, 2, 0]
    assert real_prefix(4, 0, None) is None


@pytest.mark.parametrize("valid_np", [
    np.array([True] * 5 + [False] * 3),  # a padded tail (the prefix form)
    np.array([True, False, True, True, False, True, True, False]),  # permuted: a mask
    np.array([False] * 8),  # nothing real in this shard
    np.array([True] * 8),
])
def test_prefix_form_equals_mask_bit_for_bit(valid_np):
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(6, 8, generator=g)).requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    mask = torch.from_numpy(valid_np)
    form = prefix_or_mask(valid_np)
    if valid_np.all():
        assert form is None
    elif valid_np[: valid_np.sum()].all():
        assert isinstance(form, int)
    else:
        assert isinstance(form, torch.Tensor)
    if not valid_np.any():  # no finite real column: the check refuses it in either form
        with pytest.raises(Exception, match="no finite real column"):
            vocab_parallel_log_softmax(z, valid=mask)
        with pytest.raises(Exception, match="no finite real column"):
            vocab_parallel_log_softmax(z2, valid=form)
        return
    a = vocab_parallel_log_softmax(z, valid=mask)
    b = vocab_parallel_log_softmax(z2, valid=form) if form is not None else vocab_parallel_log_softmax(z2)
    assert torch.equal(a, b)
    assert torch.isinf(a[:, ~mask]).all() and torch.isfinite(a[:, mask]).all()
    w = torch.randn(6, 8, generator=g)
    w = torch.where(mask, w, torch.zeros(()))  # a finite upstream gradient (padded entries are -inf)
    (a.masked_fill(~mask, 0) * w).sum().backward()
    (b.masked_fill(~mask, 0) * w).sum().backward()
    assert torch.equal(z.grad, z2.grad)
    assert (z.grad[:, ~mask] == 0).all()


def test_vocab_size_padding_is_a_slice_fill_bit_for_bit():
    # vocab_size → the prefix form; the old form (an explicit bool mask) gives the same bits
    z = torch.randn(5, 16)
    a = vocab_parallel_log_softmax(z, vocab_size=11)
    b = vocab_parallel_log_softmax(z, valid=torch.arange(16) < 11)
    assert torch.equal(a, b) and torch.isinf(a[:, 11:]).all()


def test_fill_invalid_leaves_its_input_alone():
    x = torch.randn(3, 6)
    keep = x.clone()
    y = _fill_invalid(x, 4, float("-inf"))
    assert torch.equal(x, keep) and torch.isinf(y[:, 4:]).all() and torch.equal(y[:, :4], x[:, :4])
    assert _fill_invalid(x, 6, 0.0) is x and _fill_invalid(x, None, 0.0) is x
