"""Launch defects the rehearsal exposed (issue 24), each with the test that failed before its fix.

3. A learnable W under ``Float16Module`` (bf16): ModelOpt registers the criterion as a submodule, so the
   wrapper's ``module.bfloat16()`` would cast W's logits to bf16 — W would no longer start at the built W
   and Adam's small steps would fall below bf16's resolution.  ``LearnableProjection`` marks its logits
   with Bridge's ``_keep_in_float32_parameter_names``; Bridge's ``_apply_mixed_precision_wrapper`` (what
   ``provide_distributed_model`` runs) restores them in fp32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.bridge")

from nemo_xtoken.testing.cpu_megatron import spawn  # noqa: E402


def _wrap_bf16(rank: int, world: int) -> dict:
    from megatron.bridge.models.model_provider import _apply_mixed_precision_wrapper
    from megatron.core.transformer.module import Float16Module

    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, convert_to_xtoken_distillation_model
    from nemo_xtoken.losses.learnable import LearnableProjection
    from nemo_xtoken.testing.cpu_megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu
    from tests.test_integration_modelopt import VS, VS_REAL, VT, VT_REAL, _projection

    init_megatron_cpu(rank, world, tensor_model_parallel_size=1, seed=3)
    with cpu_megatron_patches():
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=3)
        teacher = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=16, hidden_size=48), seed=4)
        lw = LearnableProjection(_projection())
        built = lw.logits.detach().clone()
        crit = XTokenLogitsLoss([TeacherSpec("qwen", "p_kl", lw, 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS,
                                teacher_padded=[VT], tp=1)
        model = convert_to_xtoken_distillation_model(student, [teacher], crit)
        cfg = dataclasses.replace(student.config, bf16=True, fp16=False, params_dtype=torch.bfloat16)
        (wrapped,) = _apply_mixed_precision_wrapper([model], cfg, Float16Module)
        w = dict(wrapped.named_parameters())
        key = next(k for k in w if k.endswith("learnable_w.qwen.logits"))
        return {"w_dtype": str(w[key].dtype), "w_equal_built": bool(torch.equal(w[key].detach(), built)),
                "student_dtype": str(wrapped.module.embedding.word_embeddings.weight.dtype)}


def test_learnable_w_stays_fp32_under_bf16_float16module():
    (r,) = spawn(_wrap_bf16, 1)
    assert r["student_dtype"] == "torch.bfloat16"  # the wrapper did cast the model
    assert r["w_dtype"] == "torch.float32" and r["w_equal_built"]  # W kept in fp32, starting at the built W
