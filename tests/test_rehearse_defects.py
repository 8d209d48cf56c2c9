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

from nemo_xtoken.cpu.megatron import spawn  # noqa: E402


def _wrap_bf16(rank: int, world: int) -> dict:
    from megatron.bridge.models.model_provider import _apply_mixed_precision_wrapper
    from megatron.core.transformer.module import Float16Module

    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, convert_to_xtoken_distillation_model
    from nemo_xtoken.losses.learnable import LearnableProjection
    from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu
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


# ---- 6. packed documents never meet the fused causal softmax that ignores their mask ------------------------


def test_packing_turns_off_the_fused_causal_softmax_of_every_model(tmp_path, llama3_path, qwen3_path, w_llama3_qwen3):
    """Bridge's GPT providers default ``masked_softmax_fusion=True``; with ``data.packing`` the plugin turns it off.

    Checked on the providers a run builds (student and teacher, from tiny HF checkpoints): with the flag
    off, megatron-core's ``FusedScaleMaskSoftmax.is_kernel_available`` is False and the softmax applies
    the packed mask (the fused kernel itself needs CUDA and cannot run here).
    """
    from bridge_tiny import run_config, write_config, write_docs, write_tiny
    from nemo_xtoken.integration import bridge as B
    from nemo_xtoken.integration.config import load_config, validate_resources

    student = write_tiny("llama", tmp_path / "s", seed=1)
    teacher = write_tiny("qwen3", tmp_path / "t", seed=2, tied=False)
    w = w_llama3_qwen3.save(tmp_path / "w.safetensors")
    write_docs(tmp_path)
    data = run_config(student=student, llama_tok=llama3_path, teachers=[
        {"name": "qwen3", "tokenizer": qwen3_path, "model": str(teacher), "projection": str(w), "loss": "p_kl"}])
    data["data"]["packing"] = True
    cfg_path = write_config(tmp_path, data)
    cfg = load_config(cfg_path)
    s_prov, t_provs = B.build_providers(cfg, base_dir=tmp_path, load_weights=False)
    assert s_prov.masked_softmax_fusion and t_provs[0].masked_softmax_fusion  # Bridge's defaults: the hazard
    B.convert_to_xtoken_distillation_provider(s_prov, t_provs, cfg, resources=validate_resources(cfg, base_dir=tmp_path))
    assert s_prov.masked_softmax_fusion is False and t_provs[0].masked_softmax_fusion is False



# ---- 4. sequence parallelism (the shipped setting) on Megatron's local layers -----------------------------


def _sp_step(rank: int, world: int, sp: bool) -> dict:
    """One forward/backward of a tiny GPT at TP 2 under the rehearsal's shim, with or without sequence parallelism."""
    from megatron.core import parallel_state as ps

    from nemo_xtoken.cpu.cuda_shim import cuda_on_cpu
    from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, init_megatron_cpu, tiny_gpt_config

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=5)
    with cuda_on_cpu():
        spec = TinyGPTSpec(vocab_size=256, max_sequence_length=16)
        model = build_tiny_gpt(spec, seed=5, config=tiny_gpt_config(spec, sequence_parallel=sp))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (2, 16), generator=g)
        pos = torch.arange(16).expand(2, 16)
        loss = model(ids, pos, None, labels=torch.roll(ids, -1, 1)).float().mean()
        from megatron.core.pipeline_parallel.schedules import custom_backward

        custom_backward(loss, None)  # as Megatron's schedules do: the autograd engine runs inside the shim's mode
        norms = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "layernorm" in n or "norm" in n.split(".")[-2]}
        marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
        if sp:  # what finalize_model_grads does for weights marked sequence_parallel
            for n in marked:
                torch.distributed.all_reduce(norms[n], group=ps.get_tensor_model_parallel_group())
        return {"loss": loss.detach(), "norm_grads": norms, "marked": marked}


def test_sequence_parallel_local_layers_equal_plain_tp():
    """megatron-core's torch norms assert ``not sequence_parallel``; the shim builds them and marks their weights as TE's
    norms do: loss and (TP-summed) norm gradients equal the run without sequence parallelism."""
    sp = spawn(_sp_step, 2, True)
    plain = spawn(_sp_step, 2, False)
    assert sp[0]["marked"] and all("norm" in n for n in sp[0]["marked"]) and not plain[0]["marked"]
    for r in range(2):
        torch.testing.assert_close(sp[r]["loss"], plain[r]["loss"], rtol=1e-5, atol=1e-6)
        assert sp[r]["norm_grads"].keys() == plain[r]["norm_grads"].keys()
        for n, gr in plain[r]["norm_grads"].items():
            torch.testing.assert_close(sp[r]["norm_grads"][n], gr, rtol=1e-4, atol=1e-7)
