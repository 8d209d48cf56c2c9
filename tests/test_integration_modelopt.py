"""The X-Token criterion inside ModelOpt's DistillationModel: values, gradients, teacher routing, bad input.

Tiny Megatron GPTModels (student 250 real ids padded to 256; teacher A: another tokenizer, 300 ids
padded to 384, P-KL with a random W; teacher B: the student's tokenizer, plain KL) on gloo ranks.
The loss and the gradient w.r.t. the student's logits at TP=1 and TP=2 are compared with the
single-device reference losses (``nemo_xtoken.losses``) on the gathered logits.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
mtd = pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.errors import XTokenError  # noqa: E402
from nemo_xtoken.data.batch import aligned_positions_from_batch  # noqa: E402
from nemo_xtoken.integration.distill import (  # noqa: E402
    TeacherSpec,
    XTokenLogitsLoss,
    XTokenLossBalancer,
    convert_to_xtoken_distillation_model,
    teacher_inputs_from_batch,
    xtoken_loss,
)
from nemo_xtoken.cpu.megatron import (  # noqa: E402
    TinyGPTSpec,
    build_tiny_gpt,
    cpu_megatron_patches,
    gather_vocab_parallel_logits,
    init_megatron_cpu,
    spawn,
)
from nemo_xtoken.vocab.projection import ROW_MULTI, Projection  # noqa: E402

VS_REAL, VS = 250, 256
VT_REAL, VT = 300, 384
B, S, T = 2, 8, 10
WEIGHTS = (0.7, 0.3)


def _projection(student_fp: str = "student-fp", teacher_fp: str = "teacher-fp") -> Projection:
    rng = np.random.default_rng(0)
    indptr, indices, data = [0], [], []
    for _ in range(VS_REAL):
        k = int(rng.integers(1, 4))
        cols = rng.choice(VT_REAL, size=k, replace=False)
        w = np.sort(rng.random(k))[::-1] + 0.05
        indices += cols.tolist()
        data += (w / w.sum()).tolist()
        indptr.append(len(indices))
    return Projection(
        indptr=np.asarray(indptr, np.int64), indices=np.asarray(indices, np.int32), data=np.asarray(data, np.float32),
        row_kind=np.full(VS_REAL, ROW_MULTI, np.uint8), student_vocab_size=VS_REAL, teacher_vocab_size=VT_REAL,
        student_fingerprint=student_fp, teacher_fingerprint=teacher_fp,
    )


def _batches() -> tuple[dict, dict]:
    """A student batch with teacher A's fields (T positions) and a teacher-B batch (same tokenizer, S positions)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VS_REAL, (B, S), generator=g)
    labels = torch.randint(0, VS_REAL, (B, S), generator=g)
    loss_mask = torch.ones(B, S)
    loss_mask[1, -2:] = 0
    s_chunk = torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, 3, 4, -1, -1, -1]])
    t_chunk = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 5, 5, -1], [0, 1, 1, 2, 3, 4, 4, -1, -1, -1]])
    a = {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": torch.arange(S).expand(B, -1),
        "teacher_tokens": torch.randint(0, VT_REAL, (B, T), generator=g), "teacher_position_ids": torch.arange(T).expand(B, -1),
        "student_chunk_ids": s_chunk, "teacher_chunk_ids": t_chunk,
        "student_targets": torch.where(s_chunk >= 0, labels, 0), "teacher_targets": torch.randint(0, VT_REAL, (B, T), generator=g),
        "n_chunks": torch.tensor([6, 5]),
    }
    ids = (loss_mask > 0).long().cumsum(1) - 1
    same = torch.where(loss_mask > 0, ids, -1)
    b = {
        "teacher_tokens": tokens, "teacher_position_ids": torch.arange(S).expand(B, -1),
        "student_chunk_ids": same, "teacher_chunk_ids": same, "student_targets": labels, "teacher_targets": labels,
        "n_chunks": (loss_mask > 0).sum(1),
    }
    return a, b


def _criterion(tp: int, **kw) -> XTokenLogitsLoss:
    specs = [
        TeacherSpec("other_tok", "p_kl", _projection(), WEIGHTS[0], VT_REAL),
        TeacherSpec("same_tok", "kl", None, WEIGHTS[1], VS_REAL),
    ]
    return XTokenLogitsLoss(specs, student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT, VS], tp=tp, **kw)


def _kd_worker(rank: int, world: int) -> dict:
    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=7)
    with cpu_megatron_patches():
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=7)
        ta = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=16, hidden_size=48), seed=8)
        tb = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=9)
        model = convert_to_xtoken_distillation_model(student, [ta, tb], _criterion(world))
        seen = []
        ta.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).clone()), with_kwargs=True)
        grad_logits = []

        def keep_grad(mod, inp, out):
            if out[0].requires_grad:
                out[0].register_hook(lambda g: grad_logits.append(g.detach().clone()))

        student.output_layer.register_forward_hook(keep_grad)
        a, b = _batches()
        model.train()
        out = model(a["tokens"], a["position_ids"], None, labels=a["labels"], teacher_inputs=[teacher_inputs_from_batch(a), teacher_inputs_from_batch(b)])
        loss, logs = xtoken_loss(model, a, out, teacher_batches=[a, b])
        loss.backward()
        with torch.no_grad(), model.only_student_forward():
            s_logits = model(a["tokens"], a["position_ids"], None)
            ta_logits = ta(a["teacher_tokens"], a["teacher_position_ids"], None)
            tb_logits = tb(b["teacher_tokens"], b["teacher_position_ids"], None)
        return {
            "per_token_ce_shape": tuple(out.shape),
            "loss": loss.detach(),
            "logs": {k: v for k, v in logs.items()},
            "student_logits": gather_vocab_parallel_logits(s_logits),
            "ta_logits": gather_vocab_parallel_logits(ta_logits),
            "tb_logits": gather_vocab_parallel_logits(tb_logits),
            "grad_logits": gather_vocab_parallel_logits(grad_logits[0].transpose(0, 1)),  # [B, S, V_S']
            "seen_ids": seen[0],
            "teacher_grads": sum(p.grad is not None for p in list(ta.parameters()) + list(tb.parameters())),
            "teacher_training": (ta.training, tb.training),
            "student_training": student.training,
            "state_keys": list(model.state_dict()),
        }


@pytest.fixture(scope="module")
def kd_runs():
    return {1: spawn(_kd_worker, 1), 2: spawn(_kd_worker, 2)}


def _reference(r: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The same objective on one device from the gathered logits: value and d(loss)/d(student logits)."""
    from nemo_xtoken.losses.reference import kl, p_kl
    from nemo_xtoken.losses.total import total_loss

    a, b = _batches()
    s = r["student_logits"].clone().requires_grad_(True)  # [B, S, 256]
    flat = s.reshape(B * S, VS)
    mask = a["loss_mask"].reshape(-1)
    ce_tok = torch.nn.functional.cross_entropy(flat, a["labels"].reshape(-1), reduction="none")  # Megatron: padded columns included
    ce = (ce_tok * mask).sum() / mask.sum()
    kd_a = p_kl(flat, r["ta_logits"].reshape(B * T, VT), _projection(), alignment=aligned_positions_from_batch(a), student_vocab_size=VS_REAL, teacher_vocab_size=VT_REAL)
    kd_b = kl(flat, r["tb_logits"].reshape(B * S, VS), alignment=aligned_positions_from_batch(b), student_vocab_size=VS_REAL, teacher_vocab_size=VS_REAL)
    kd = WEIGHTS[0] * kd_a + WEIGHTS[1] * kd_b
    total = total_loss(ce, kd, mode="dynamic")
    total.backward()
    return total.detach(), s.grad, {"ce": ce.detach(), "kd_a": kd_a.detach(), "kd_b": kd_b.detach(), "kd": kd.detach()}


@pytest.mark.parametrize("tp", [1, 2])
def test_loss_and_logit_gradient_equal_the_reference(kd_runs, tp):
    runs = kd_runs[tp]
    ref_total, ref_grad, parts = _reference(runs[0])
    for r in runs:
        assert r["per_token_ce_shape"] == (B, S)  # the student's own LM loss, per token
        torch.testing.assert_close(r["loss"], ref_total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logs"]["ce_loss"], parts["ce"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logs"]["kd/other_tok"], parts["kd_a"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logs"]["kd/same_tok"], parts["kd_b"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logs"]["logits_loss"], parts["kd"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logs"]["dynamic_scale"], parts["ce"] / parts["kd"], rtol=1e-5, atol=1e-6)
        assert float(r["logs"]["alpha/other_tok"]) == pytest.approx(WEIGHTS[0])
        assert float(r["logs"]["intermediate_loss"]) == 0.0
        assert float(r["logs"]["aligned_chunk_fraction/other_tok"]) == 1.0
        # each TP rank's logit gradient is its slice of the single-device gradient
        torch.testing.assert_close(r["grad_logits"], ref_grad, rtol=1e-5, atol=1e-7)
    assert ref_grad.abs().sum() > 0


def test_tp2_equals_tp1(kd_runs):
    (one,), (a, b) = kd_runs[1], kd_runs[2]
    for r in (a, b):
        torch.testing.assert_close(r["student_logits"], one["student_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["loss"], one["loss"], rtol=1e-5, atol=1e-6)


def test_each_teacher_reads_its_own_ids_frozen_and_hidden(kd_runs):
    a, _ = _batches()
    for runs in kd_runs.values():
        for r in runs:
            assert torch.equal(r["seen_ids"], a["teacher_tokens"])  # teacher A got its ids at its length T ≠ S
            assert r["ta_logits"].shape == (B, T, VT) and r["tb_logits"].shape == (B, S, VS)
            assert r["teacher_grads"] == 0
            assert r["teacher_training"] == (False, False) and r["student_training"] is True
            assert not any("teacher" in k for k in r["state_keys"]) and "output_layer.weight" in r["state_keys"]


# ---- the balancer, without processes ------------------------------------------------------------


def _loss_dict(ce: float, kd: float) -> dict:
    return {"student_loss": torch.tensor(ce, requires_grad=True), "XTokenLogitsLoss_0": torch.tensor(kd, requires_grad=True)}


def test_balancer_dynamic_matches_modelopt_balancer_for_positive_kd():
    from modelopt.torch.distill.plugins.megatron import LogitsAndIntermediatesLossBalancer

    d = _loss_dict(2.0, 0.5)
    ours = XTokenLossBalancer()(d)
    theirs = LogitsAndIntermediatesLossBalancer(kd_loss_scale=1.0, skip_original_loss=False)(dict(d))
    assert float(ours["kd_loss"]) == pytest.approx(float(theirs["kd_loss"])) == pytest.approx(4.0)
    ours["kd_loss"].backward()
    assert float(d["XTokenLogitsLoss_0"].grad) == pytest.approx(4.0)  # sg(CE/KD) = 4
    assert float(d["student_loss"].grad) == pytest.approx(1.0)
    assert float(ours["dynamic_scale"]) == pytest.approx(4.0) and float(ours["ce_loss"]) == 2.0


def test_balancer_fixed_weights_and_negative_kd():
    out = XTokenLossBalancer("fixed", ce_weight=0.5, kd_weight=2.0)(_loss_dict(2.0, 0.25))
    assert float(out["kd_loss"]) == pytest.approx(0.5 * 2.0 + 2.0 * 0.25)
    d = _loss_dict(2.0, -0.5)  # a chain-merged KD may be negative: sg(CE/|KD|) keeps the KD direction
    out = XTokenLossBalancer()(d)
    out["kd_loss"].backward()
    assert float(d["XTokenLogitsLoss_0"].grad) == pytest.approx(4.0)


def test_balancer_refuses_missing_ce_and_intermediate_losses():
    with pytest.raises(XTokenError, match="student_loss=ce"):
        XTokenLossBalancer()({"XTokenLogitsLoss_0": torch.tensor(1.0)})
    with pytest.raises(XTokenError, match="exactly one logits loss"):
        XTokenLossBalancer()({**_loss_dict(1.0, 1.0), "MSELoss_1": torch.tensor(1.0)})


# ---- bad input, before any forward ---------------------------------------------------------------


def _bad_input_worker(rank: int, world: int) -> dict:
    init_megatron_cpu(rank, world, tensor_model_parallel_size=1, seed=7)
    errors: dict[str, str] = {}

    def expect(name, fn):
        try:
            fn()
        except XTokenError as e:
            errors[name] = str(e)
        else:
            errors[name] = "NO ERROR"

    def models(teacher_vocab=VT):
        s = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=1)
        t = build_tiny_gpt(TinyGPTSpec(vocab_size=teacher_vocab, max_sequence_length=16), seed=2)
        return s, t

    def crit():
        return XTokenLogitsLoss([TeacherSpec("qwen", "p_kl", _projection(), 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT])

    def with_cfg(who, attr, value):
        s, t = models()
        setattr((s if who == "student" else t).config, attr, value)
        return lambda: convert_to_xtoken_distillation_model(s, [t], crit())

    with cpu_megatron_patches():
        expect("teacher_tp", with_cfg("teacher", "tensor_model_parallel_size", 2))
        expect("teacher_pp", with_cfg("teacher", "pipeline_model_parallel_size", 2))
        expect("teacher_cp", with_cfg("teacher", "context_parallel_size", 2))
        s, t = models()
        s.config.context_parallel_size = t.config.context_parallel_size = 2
        expect("cp", lambda: convert_to_xtoken_distillation_model(s, [t], crit()))
        s, t = models()
        s.config.pipeline_model_parallel_size = t.config.pipeline_model_parallel_size = 2
        expect("pp", lambda: convert_to_xtoken_distillation_model(s, [t], crit()))
        s, t = models(teacher_vocab=512)
        expect("teacher_vocab", lambda: convert_to_xtoken_distillation_model(s, [t], crit()))
        s, t = models()
        expect("two_models_one_spec", lambda: convert_to_xtoken_distillation_model(s, [t, t], crit()))
        s, t = models()
        model = convert_to_xtoken_distillation_model(s, [t], crit())
        expect("no_teacher_inputs", lambda: model(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], None))
        too_long = {"input_ids": torch.zeros(1, 17, dtype=torch.long), "position_ids": torch.arange(17)[None], "attention_mask": None}
        expect("teacher_too_long", lambda: model(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], None, teacher_inputs=[too_long]))
    return errors


def test_bad_input_is_refused_before_compute():
    (errors,) = spawn(_bad_input_worker, 1)
    assert "teacher qwen: tensor_model_parallel_size is 2 but the student's is 1" in errors["teacher_tp"]
    assert "teacher qwen: pipeline_model_parallel_size is 2" in errors["teacher_pp"]
    assert "teacher qwen: context_parallel_size is 2" in errors["teacher_cp"]
    assert "context_parallel_size is 2" in errors["cp"] and "cut aligned chunks" in errors["cp"]
    assert "pipeline_model_parallel_size is 2" in errors["pp"] and "PP = 1" in errors["pp"]
    assert "teacher qwen's output layer has 512 vocabulary columns" in errors["teacher_vocab"] and "384" in errors["teacher_vocab"]
    assert "2 teacher models for 1 teachers" in errors["two_models_one_spec"]
    assert "teacher_inputs" in errors["no_teacher_inputs"]
    assert "17 teacher tokens per sample exceed the teacher model's maximum sequence length 16" in errors["teacher_too_long"]


def test_w_of_another_tokenizer_is_refused_by_fingerprint():
    from nemo_xtoken.vocab.projection import ProjectionFileError

    other = types.SimpleNamespace(fingerprint="not-the-teacher-fp", source="phi4.json")
    student = types.SimpleNamespace(fingerprint="student-fp", source="llama3.json")
    with pytest.raises(ProjectionFileError, match=r"teacher qwen's W was built for another teacher tokenizer.*phi4.json"):
        XTokenLogitsLoss(
            [TeacherSpec("qwen", "p_kl", _projection(), 1.0, VT_REAL, tokenizer=other)],
            student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT], student_tokenizer=student,
        )
    right = types.SimpleNamespace(fingerprint="teacher-fp", source="qwen3.json")
    XTokenLogitsLoss(  # the matching pair is accepted
        [TeacherSpec("qwen", "p_kl", _projection(), 1.0, VT_REAL, tokenizer=right)],
        student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT], student_tokenizer=student,
    )


def test_learnable_w_is_a_criterion_parameter_for_p_kl_only():
    from nemo_xtoken.losses.learnable import LearnableProjection

    lw = LearnableProjection(_projection())
    crit = XTokenLogitsLoss([TeacherSpec("qwen", "p_kl", lw, 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT])
    assert [p is lw.logits for p in crit.parameters()] == [True]
    assert crit._teachers[0].projection.learnable is lw  # the plan reads the module's current weights
    with pytest.raises(XTokenError, match="learnable W .* P-KL only"):
        XTokenLogitsLoss([TeacherSpec("qwen", "h_kl", LearnableProjection(_projection()), 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT])
