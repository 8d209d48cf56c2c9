"""Cached teachers inside ModelOpt's DistillationModel: no teacher weights, mixed with live teachers, TP 1 and 2.

The tiny Megatron setting of ``test_integration_modelopt.py`` (student 250 ids padded to 256; teacher
A another tokenizer, 300 ids padded to 384, P-KL; teacher B the student's tokenizer, KL).  Teacher
A's distributions are cached (its own logits → top-k rows, as ``xtoken cache-teacher`` stores them)
and a :class:`CachedTeacher` takes its place in the bundle: with k = V the loss and the student's
gradient equal the live run; teacher B stays live (mixed), or is cached too (no teacher model at all).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.errors import XTokenError  # noqa: E402
from nemo_xtoken.integration.distill import convert_to_xtoken_distillation_model, teacher_inputs_from_batch, xtoken_loss  # noqa: E402
from nemo_xtoken.offline import sparse_from_logits  # noqa: E402
from nemo_xtoken.offline.teachers import CACHED_TEACHER_KEYS, CachedTeacher  # noqa: E402
from nemo_xtoken.cpu.megatron import (  # noqa: E402
    TinyGPTSpec,
    build_tiny_gpt,
    cpu_megatron_patches,
    gather_vocab_parallel_logits,
    init_megatron_cpu,
    spawn,
)
from tests.test_integration_modelopt import VS, VS_REAL, VT, VT_REAL, _batches, _criterion  # noqa: E402


def _cached_fields(logits: torch.Tensor, vocab: int, k: int, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """A teacher's full logits [B, T, V'] → the batch fields a cache delivers (top-k + next token + rest)."""
    b, t = logits.shape[:2]
    st = sparse_from_logits(logits.reshape(b * t, -1), k, vocab_size=vocab, targets=targets.reshape(-1) if k < vocab else None)
    return dict(zip(CACHED_TEACHER_KEYS, (st.ids.reshape(b, t, -1), st.log_probs.reshape(b, t, -1), st.rest_log_mass.reshape(b, t))))


def _step(model, student, a, b, t_inputs):
    grads = []

    def keep(mod, inp, out):
        if out[0].requires_grad:
            out[0].register_hook(lambda g: grads.append(g.detach().clone()))

    h = student.output_layer.register_forward_hook(keep)
    model.train()
    out = model(a["tokens"], a["position_ids"], None, labels=a["labels"], teacher_inputs=t_inputs)
    loss, logs = xtoken_loss(model, a, out, teacher_batches=[a, b])
    loss.backward()
    h.remove()
    return loss.detach(), {k: float(v) for k, v in logs.items()}, gather_vocab_parallel_logits(grads[0].transpose(0, 1))


def _worker(rank: int, world: int) -> dict:
    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=7)
    with cpu_megatron_patches():
        a, b = _batches()
        ta = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=16, hidden_size=48), seed=8)
        tb = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=9)
        with torch.no_grad():
            ta_full = gather_vocab_parallel_logits(ta(a["teacher_tokens"], a["teacher_position_ids"], None))  # [B, T, VT]
            tb_full = gather_vocab_parallel_logits(tb(b["teacher_tokens"], b["teacher_position_ids"], None))
        out = {}
        # live: both teachers are Megatron models
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=7)
        live = convert_to_xtoken_distillation_model(student, [ta, tb], _criterion(world))
        out["live"] = _step(live, student, a, b, [teacher_inputs_from_batch(a), teacher_inputs_from_batch(b)])
        for tag, k_a in (("cached_full", VT_REAL), ("cached_k8", 8)):
            a_c = {**a, **_cached_fields(ta_full, VT_REAL, k_a, a["teacher_targets"])}
            student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=7)
            cached_a = CachedTeacher(VT_REAL, VT, name="other_tok")
            model = convert_to_xtoken_distillation_model(student, [cached_a, tb], _criterion(world))
            out[tag] = _step(model, student, a_c, b, [teacher_inputs_from_batch(a_c, cached_a), teacher_inputs_from_batch(b)])
        # no teacher model at all: both cached (teacher B's full distribution: the student's vocabulary)
        a_c = {**a, **_cached_fields(ta_full, VT_REAL, VT_REAL, a["teacher_targets"])}
        b_c = {**b, **_cached_fields(tb_full, VS_REAL, VS_REAL, b["teacher_targets"])}
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=7)
        ca, cb = CachedTeacher(VT_REAL, VT, name="other_tok"), CachedTeacher(VS_REAL, VS, name="same_tok")
        model = convert_to_xtoken_distillation_model(student, [ca, cb], _criterion(world))
        out["all_cached"] = _step(model, student, a_c, b_c, [teacher_inputs_from_batch(a_c, ca), teacher_inputs_from_batch(b_c, cb)])
        out["all_cached_teacher_params"] = sum(p.numel() for p in model._teacher_model.parameters())
        out["all_cached_state_keys"] = sorted(model.state_dict())
        out["student_state_keys"] = sorted(student.state_dict())
        # a batch without the cached rows: a clear error naming the fields
        try:
            teacher_inputs_from_batch(a, ca)
            out["missing_rows_error"] = None
        except XTokenError as e:
            out["missing_rows_error"] = str(e)
        return out


@pytest.fixture(scope="module")
def runs():
    return {1: spawn(_worker, 1), 2: spawn(_worker, 2)}


@pytest.mark.parametrize("tp", (1, 2))
def test_cached_teacher_with_full_k_equals_the_live_teacher(runs, tp):
    for rank, r in enumerate(runs[tp]):
        live_loss, live_logs, live_grad = r["live"]
        for tag in ("cached_full", "all_cached"):
            loss, logs, grad = r[tag]
            torch.testing.assert_close(loss, live_loss, rtol=1e-5, atol=1e-6, msg=f"{tag} tp={tp} rank {rank}")
            torch.testing.assert_close(grad, live_grad, rtol=1e-4, atol=1e-7, msg=f"{tag} gradient tp={tp} rank {rank}")
            for key in ("kd/other_tok", "kd/same_tok", "ce_loss", "dynamic_scale"):
                assert abs(logs[key] - live_logs[key]) <= 1e-5 * max(1.0, abs(live_logs[key])), (tag, key)
        assert float(live_grad.abs().max()) > 0
    torch.testing.assert_close(runs[tp][0]["live"][0], runs[1][0]["live"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tp", (1, 2))
def test_cached_teacher_with_small_k_is_close_not_equal(runs, tp):
    r = runs[tp][0]
    live = r["live"][1]["kd/other_tok"]
    k8 = r["cached_k8"][1]["kd/other_tok"]
    assert k8 != live  # 9 of 300 ids of a random teacher: a real approximation
    assert abs(k8 - live) / abs(live) < 0.5
    assert r["cached_k8"][1]["kd/same_tok"] == pytest.approx(r["live"][1]["kd/same_tok"], rel=1e-6)  # the live teacher untouched


def test_no_teacher_model_in_memory_when_all_teachers_are_cached(runs):
    r = runs[2][0]
    assert r["all_cached_teacher_params"] == 0
    assert r["all_cached_state_keys"] == r["student_state_keys"]
    assert "teacher_topk_ids" in r["missing_rows_error"] and "other_tok" in r["missing_rows_error"]
