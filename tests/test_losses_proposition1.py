"""Proposition 1 of the paper: GOLD's common-set KL always pushes uncommon student tokens down; P-KL does not.

On the real Llama-3 → Qwen3 W, Qwen3 splits numerals into digits, so the Llama-3 token ``201`` is
no exact match: under GOLD its logit only ever gets a gradient ≥ 0 from the KL part (pushed down,
whatever the teacher says), while under P-KL a teacher that puts mass on ``2`` pulls it up.
"""

from __future__ import annotations

import pytest
import torch

from nemo_xtoken.losses import exact_common_set, gold, p_kl, resolve_projection
from nemo_xtoken.vocab import canonical_vocab
from tests.test_losses_reference import V_S, V_T, logits, make_csr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gold_common_kl_gradient_on_uncommon_student_logits(seed):
    s, t = logits(3, V_S, seed), logits(3, V_T, seed + 10)
    common = exact_common_set(resolve_projection(make_csr()))
    cs, ct = set(common.student_ids.tolist()), common.teacher_ids
    uncommon = [j for j in range(V_S) if j not in cs]
    assert uncommon == [2, 3, 4, 5]  # the duplicate exact row, the multi-token rows, the empty row
    out = gold(s, t, make_csr(), matched_weight=1.0, unmatched_weight=0.0, reduction="sum")
    (g,) = torch.autograd.grad(out, s)
    p_s, p_t = torch.softmax(s.detach(), 1), torch.softmax(t.detach(), 1)
    m_c = p_t[:, ct].sum(1)  # teacher mass on the common set, per position
    for j in uncommon:
        assert torch.all(g[:, j] >= 0)
        torch.testing.assert_close(g[:, j], p_s[:, j] * m_c, rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def numeral_case(w_llama3_qwen3, llama3, qwen3):
    s_201 = canonical_vocab(llama3).lookup("201")
    t_2 = canonical_vocab(qwen3).lookup("2")
    assert len(s_201) == 1 and len(t_2) == 1
    s_201, t_2 = s_201[0], t_2[0]
    assert w_llama3_qwen3.row(s_201)[0][0] == t_2  # 201 → 2 (0.90), 0, 1
    v_s, v_t = w_llama3_qwen3.shape
    g = torch.Generator().manual_seed(0)
    s = (0.5 * torch.randn(2, v_s, generator=g)).requires_grad_(True)
    t = 0.5 * torch.randn(2, v_t + 267, generator=g)  # Qwen3's checkpoint pads 151,669 → 151,936
    t[:, t_2] += 16.0  # the teacher is confident the next token starts with "2"
    return s, t, s_201, t_2


def test_pkl_gradient_on_numeral_is_negative_real_w(numeral_case, w_llama3_qwen3):
    s, t, s_201, t_2 = numeral_case
    assert float(torch.softmax(t[:, : w_llama3_qwen3.teacher_vocab_size], 1)[:, t_2].min()) > 0.5
    out = p_kl(s, t, w_llama3_qwen3, reduction="sum")
    (g,) = torch.autograd.grad(out, s)
    assert torch.all(g[:, s_201] < 0), g[:, s_201]
    assert torch.isfinite(g).all()
    # The same W as a padded torch CSR tensor gives the same gradient.
    csr = w_llama3_qwen3.to_torch(teacher_padded=t.shape[1])
    (g2,) = torch.autograd.grad(
        p_kl(s, t, csr, teacher_vocab_size=w_llama3_qwen3.teacher_vocab_size, reduction="sum"), s
    )
    torch.testing.assert_close(g2, g)


def test_gold_gradient_on_the_same_numeral_is_positive_real_w(numeral_case, w_llama3_qwen3):
    s, t, s_201, _ = numeral_case
    out = gold(s, t, w_llama3_qwen3, matched_weight=1.0, unmatched_weight=0.0, reduction="sum")
    (g,) = torch.autograd.grad(out, s)
    assert torch.all(g[:, s_201] > 0)
    p_s = torch.softmax(s.detach(), 1)
    common = exact_common_set(resolve_projection(w_llama3_qwen3))
    m_c = torch.softmax(t[:, : w_llama3_qwen3.teacher_vocab_size], 1)[:, common.teacher_ids].sum(1)
    torch.testing.assert_close(g[:, s_201], p_s[:, s_201] * m_c, rtol=1e-4, atol=1e-12)
