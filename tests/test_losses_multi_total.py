"""Multi-teacher weighting (static, CE, entropy, max-probability) and the total loss (dynamic / fixed)."""

from __future__ import annotations

import pytest
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import Teacher, gold, kl, multi_teacher, p_kl, total_loss
from tests.test_losses_reference import V_S, V_T, hand_alignment, logits, make_csr, make_projection


def _setup(seed=0):
    s = logits(6, V_S + 2, seed)
    t1 = logits(6, V_T, seed + 1)  # p_kl teacher
    t2 = logits(6, V_T + 1, seed + 2)  # gold teacher, padded
    t3 = logits(6, V_S, seed + 3)  # same-tokenizer teacher
    teachers = [
        Teacher("p_kl", make_csr(), weight=0.3),
        Teacher("gold", make_projection(), weight=0.5, options={"matched_weight": 0.7, "unmatched_weight": 1.3}),
        Teacher("kl", None, weight=0.2, options={"student_vocab_size": V_S}),
    ]
    return s, [t1, t2, t3], teachers


def _each(s, ts, mask=None, **kw):
    return [
        p_kl(s, ts[0], make_csr(), mask=mask, **kw),
        gold(s, ts[1], make_projection(), matched_weight=0.7, unmatched_weight=1.3, mask=mask, **kw),
        kl(s, ts[2], student_vocab_size=V_S, mask=mask, **kw),
    ]


def test_static_weights_sum_of_each_teachers_loss():
    s, ts, teachers = _setup()
    mask = torch.tensor([1, 1, 0, 1, 1, 0])
    out = multi_teacher(s, ts, teachers, mask=mask, temperature=1.5)
    each = _each(s, ts, mask=mask, temperature=1.5)
    want = 0.3 * each[0] + 0.5 * each[1] + 0.2 * each[2]
    torch.testing.assert_close(out.loss, want)
    assert out.alphas.tolist() == pytest.approx([0.3, 0.5, 0.2]) and out.scores is None
    (g1,) = torch.autograd.grad(out.loss, s)
    (g2,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2)


def _probs(t, v):
    return torch.softmax(t.detach()[:, :v], 1)


@pytest.mark.parametrize("scheme", ["ce", "entropy", "max_prob"])
def test_adaptive_weights_scores_and_detached_alphas(scheme):
    s, ts, teachers = _setup(3)
    ts[1] = (5.0 * ts[1].detach()).requires_grad_(True)  # a much sharper teacher
    mask = torch.tensor([1, 0, 1, 1, 1, 1])
    targets = [torch.randint(0, v, (6,), generator=torch.Generator().manual_seed(i)) for i, v in enumerate((V_T, V_T, V_S))]
    targets[1] = _probs(ts[1], V_T).argmax(1)  # the sharp teacher is also right: lowest CE
    out = multi_teacher(s, ts, teachers, mask=mask, weighting=scheme, weighting_temperature=0.5, teacher_targets=targets)
    sel = mask.bool()
    want_scores = []
    for t, v, tg in zip(ts, (V_T, V_T, V_S), targets):
        p = _probs(t, v)[sel]
        if scheme == "ce":
            want_scores.append(-torch.log(p[torch.arange(p.shape[0]), tg[sel]]).mean())
        elif scheme == "entropy":
            want_scores.append(-(p * p.log()).sum(1).mean())
        else:
            want_scores.append(p.max(1).values.mean())
    want_scores = torch.stack(want_scores)
    torch.testing.assert_close(out.scores, want_scores)
    sign = 1.0 if scheme == "max_prob" else -1.0
    want_alpha = torch.softmax(sign * want_scores / 0.5, 0)
    torch.testing.assert_close(out.alphas, want_alpha)
    assert int(out.alphas.argmax()) == 1  # the sharp, right teacher weighs most
    each = _each(s, ts, mask=mask)
    torch.testing.assert_close(out.loss, sum(a * l for a, l in zip(want_alpha, each)))
    # α is detached: the teachers' logits get only α_m · ∂L_m, nothing through the weights.
    g_out = torch.autograd.grad(out.loss, [s, *ts])
    g_want = torch.autograd.grad(sum(a * l for a, l in zip(want_alpha, each)), [s, *ts])
    for a, b in zip(g_out, g_want):
        torch.testing.assert_close(a, b)


def test_adaptive_ce_with_alignments_uses_positions_in_counted_chunks():
    a1, _ = hand_alignment(0)
    a2, _ = hand_alignment(1)
    s = logits(6, V_S, 0)
    t1, t2 = logits(7, V_T, 1), logits(7, V_T, 2)
    teachers = [Teacher("p_kl", make_csr()), Teacher("h_kl", make_csr())]
    out = multi_teacher(s, [t1, t2], teachers, alignments=[a1, a2], weighting="ce")
    pos = torch.tensor([True, True, True, True, True, True, False])  # teacher positions of chunks 0-2
    want = []
    for t, a in ((t1, a1), (t2, a2)):
        p = _probs(t, V_T)
        want.append(-torch.log(p[pos, a.teacher_targets[pos]]).mean())
    torch.testing.assert_close(out.scores, torch.stack(want))
    torch.testing.assert_close(out.alphas, torch.softmax(-torch.stack(want), 0))
    assert out.loss.shape == () and torch.isfinite(out.loss)


def test_multi_teacher_empty_batch_and_errors():
    s, ts, teachers = _setup()
    empty = multi_teacher(logits(0, V_S + 2, 0), [logits(0, x.shape[1], 1) for x in ts], teachers, weighting="entropy")
    assert float(empty.loss) == 0.0 and torch.allclose(empty.alphas, torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(XTokenError, match="one teacher_logits tensor per Teacher"):
        multi_teacher(s, ts[:2], teachers)
    with pytest.raises(XTokenError, match="needs a projection"):
        multi_teacher(s, ts[:1], [Teacher("p_kl", None)])
    with pytest.raises(XTokenError, match="next-token ids"):
        multi_teacher(s, ts, teachers, weighting="ce")
    with pytest.raises(XTokenError, match="weighting must be"):
        multi_teacher(s, ts, teachers, weighting="softmax")
    with pytest.raises(XTokenError, match="loss must be one of"):
        multi_teacher(s, ts[:1], [Teacher("jsd", make_csr())])
    a1, _ = hand_alignment(0)
    with pytest.raises(XTokenError, match="reduction='none'"):
        multi_teacher(logits(6, V_S, 0), [logits(7, V_T, 1), logits(6, V_T, 2)], [Teacher("p_kl", make_csr())] * 2, alignments=[a1, None], reduction="none")


# ---- total loss -------------------------------------------------------------------------------------------


def test_dynamic_scaling_value_and_gradients():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True)
    ce = (a**2).sum()  # 5
    kd = (b**2).sum() * 0.1  # 0.25
    out = total_loss(ce, kd)
    assert float(out) == pytest.approx(2 * 5.0)
    ga, gb = torch.autograd.grad(out, (a, b))
    torch.testing.assert_close(ga, 2 * a.detach())  # no gradient through the stop-gradient ratio
    torch.testing.assert_close(gb, (5.0 / 0.25) * 0.2 * b.detach())


def test_dynamic_scaling_zero_and_negative_kd():
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    out = total_loss(a**2, b * 2.0)
    assert float(out) == 9.0
    ga, gb = torch.autograd.grad(out, (a, b))
    assert float(ga) == 6.0 and float(gb) == 0.0
    # A negative KD (unnormalized chain-merged chunks) keeps its gradient direction.
    c = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    out = total_loss(torch.tensor(4.0, dtype=torch.float64), c * 1.0)
    (gc,) = torch.autograd.grad(out, c)
    assert float(gc) == pytest.approx(4.0 / 2.0)


def test_fixed_weights_and_errors():
    ce = torch.tensor(2.0, requires_grad=True)
    kd = torch.tensor(3.0, requires_grad=True)
    out = total_loss(ce, kd, mode="fixed", ce_weight=0.5, kd_weight=2.0)
    assert float(out) == pytest.approx(7.0)
    gce, gkd = torch.autograd.grad(out, (ce, kd))
    assert float(gce) == 0.5 and float(gkd) == 2.0
    with pytest.raises(XTokenError, match=r"kd_loss must be a scalar.*\(4,\)"):
        total_loss(ce, torch.ones(4))
    with pytest.raises(XTokenError, match="ce_loss is nan"):
        total_loss(torch.tensor(float("nan")), kd)
    with pytest.raises(XTokenError, match="mode must be"):
        total_loss(ce, kd, mode="auto")
