"""Megatron-Bridge glue with real Bridge providers (Megatron-Bridge 0.6.2 on a CPU): batches, loss function,
provider building and conversion, config mapping, and the host-path defects each with the test that catches it.

Providers come from tiny random Hugging Face checkpoints written here through ``AutoBridge`` (no model is
built in this file: the multi-process runs through the pre-wrap hook, ``forward_step`` and ``loss_func``
are in ``tests/test_bridge_real.py``).  Bridge imports through ``tests/conftest.py``'s scoped TE hook.
"""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from bridge_tiny import write_tiny  # noqa: E402

from nemo_xtoken.integration import bridge as B  # noqa: E402
from nemo_xtoken.integration.config import ConfigError, ResourceReport, config_from_dict  # noqa: E402

S, T = 24, 32


def _cfg(student="s", teachers=None, **over):
    d = {
        "student": {"name": "s", "tokenizer": "llama3", "model": str(student), "seq_length": S},
        "teachers": teachers or [{"name": "qwen3", "tokenizer": "qwen3", "projection": "w.safetensors", "loss": "p_kl", "seq_length": T}],
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_iters": 40, "global_batch_size": 8, "micro_batch_size": 2, "bf16": False},
    }
    d.update(over)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny HF checkpoints with small vocabularies (nothing here builds a model; only configs and providers)."""
    pytest.importorskip("megatron.bridge")
    d = tmp_path_factory.mktemp("hf_small")
    out = {
        "llama": write_tiny("llama", d / "llama", seed=1, vocab=320),
        "qwen3": write_tiny("qwen3", d / "qwen3", seed=2, vocab=352),
        "phi3": write_tiny("phi3", d / "phi3", seed=3, vocab=320),
        "llama_fp16": write_tiny("llama", d / "llama_fp16", seed=1, vocab=320, dtype=torch.float16),
    }
    from transformers import OPTConfig

    OPTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
              word_embed_proj_dim=32, architectures=["OPTForCausalLM"]).save_pretrained(d / "opt")
    out["opt"] = d / "opt"
    return out


# ---- importing Bridge ----------------------------------------------------------------------------


def test_require_bridge_explains_what_is_missing(monkeypatch):
    """Without transformer_engine (no hook) the error names it and says where Bridge runs."""
    monkeypatch.setitem(sys.modules, "megatron.bridge", None)  # `import megatron.bridge` raises ImportError now
    with pytest.raises(B.BridgeUnavailableError, match=r"Megatron-Bridge is not importable.*nemo-xtoken\[bridge\]"):
        B.require_bridge()

    err = ModuleNotFoundError("No module named 'transformer_engine'", name="transformer_engine")
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "megatron.bridge":
            raise err
        return real_import(name, *a, **k)

    monkeypatch.setitem(sys.modules, "megatron.bridge", None)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(B.BridgeUnavailableError, match=r"transformer_engine.*GPU machine.*xtoken check-model"):
        B.require_bridge()


def test_te_hook_is_scoped_to_one_module():
    """The hook replaces one line of one Bridge module; no transformer_engine module exists anywhere."""
    import importlib.util

    pytest.importorskip("megatron.bridge")
    from megatron.bridge.peft import lora_layers
    from megatron.core.extensions import transformer_engine as mcore_te

    from nemo_xtoken.cpu import bridge_te_shim as shim

    assert importlib.util.find_spec("transformer_engine") is None and "transformer_engine" not in sys.modules
    assert shim.installed() and lora_layers.te is shim.ABSENT_TE
    assert not getattr(mcore_te, "HAVE_TE", False)  # megatron-core's guarded imports still see TE absent
    assert not isinstance(torch.nn.Linear(2, 2), lora_layers.te.Linear)  # isinstance works, is always False
    with pytest.raises(RuntimeError, match="transformer_engine.pytorch.ops.Sequential is not available"):
        lora_layers.te.ops.Sequential()


def test_te_hook_refuses_a_changed_bridge(tmp_path):
    """A Bridge release whose lora_layers.py lacks (or repeats) the TE import fails loudly instead of importing."""
    import importlib.machinery
    import types

    from nemo_xtoken.cpu import bridge_te_shim as shim

    for body in ("import torch\n", f"{shim.TE_IMPORT_LINE}\n{shim.TE_IMPORT_LINE}\n"):
        f = tmp_path / "lora_layers.py"
        f.write_text(body)
        loader = shim._Loader(importlib.machinery.SourceFileLoader(shim.TARGET_MODULE, str(f)))
        with pytest.raises(ImportError, match="expected exactly one line"):
            loader.exec_module(types.ModuleType(shim.TARGET_MODULE))
    f.write_text(f"x = 1\n{shim.TE_IMPORT_LINE}\ny = te\n")
    mod = types.ModuleType(shim.TARGET_MODULE)
    shim._Loader(importlib.machinery.SourceFileLoader(shim.TARGET_MODULE, str(f))).exec_module(mod)
    assert mod.x == 1 and mod.y is shim.ABSENT_TE


# ---- batches -------------------------------------------------------------------------------------


def _batch(b=2, s=6, t=8):
    g = torch.Generator().manual_seed(0)
    return {
        "tokens": torch.randint(0, 50, (b, s), generator=g),
        "labels": torch.randint(0, 50, (b, s), generator=g),
        "loss_mask": torch.tensor([[1.0] * (s - 1) + [0.0]] * b),
        "position_ids": torch.arange(s).expand(b, s).clone(),
        "teacher_tokens": torch.randint(0, 60, (b, t), generator=g),
        "teacher_position_ids": torch.arange(t).expand(b, t).clone(),
        "student_chunk_ids": torch.arange(s).expand(b, s).clone(),
        "teacher_chunk_ids": torch.arange(t).expand(b, t).clone() % s,
        "student_targets": torch.zeros(b, s, dtype=torch.long),
        "teacher_targets": torch.zeros(b, t, dtype=torch.long),
        "n_chunks": torch.full((b,), s),
    }


def test_get_xtoken_batch_keeps_teacher_ids_and_alignment():
    batch = _batch()
    got = B.get_xtoken_batch(iter([batch]))
    assert set(got) == set(batch)  # Bridge's get_batch_from_iterator would set the teacher keys to None
    assert torch.equal(got["teacher_tokens"], batch["teacher_tokens"])


def test_get_xtoken_batch_names_missing_fields():
    batch = _batch()
    del batch["teacher_chunk_ids"]
    with pytest.raises(Exception, match="teacher_chunk_ids.*DualTokenizedDataset"):
        B.get_xtoken_batch(iter([batch]))
    with pytest.raises(Exception, match="pipeline parallel"):
        B.get_xtoken_batch(None)


def test_teacher_batches_plain_keys_identity_for_kl_and_at_keys():
    batch = _batch()
    tb = B.teacher_batches_from_batch(batch, ["p_kl", "kl"])
    assert tb[0] is batch
    ident = tb[1]
    assert torch.equal(ident["teacher_tokens"], batch["tokens"])
    assert torch.equal(ident["student_chunk_ids"][:, -1], torch.tensor([-1, -1]))  # masked position: no chunk
    assert torch.equal(ident["student_chunk_ids"][0, :5], torch.arange(5))
    # a second cross-tokenizer teacher needs its own '@1' fields
    with pytest.raises(Exception, match="@1"):
        B.teacher_batches_from_batch(batch, ["p_kl", "h_kl"])
    extra = {f"{k}@1": v for k, v in _batch(t=5).items() if k in B.TEACHER_FIELDS}
    tb = B.teacher_batches_from_batch({**batch, **extra}, ["p_kl", "h_kl"])
    assert tb[1]["teacher_tokens"].shape == (2, 5)


def test_loss_and_report_follow_bridge_reduction_and_report_every_teacher():
    total = torch.tensor(2.5, requires_grad=True)
    logs = {
        "kd_loss": torch.tensor(2.5), "logits_loss": torch.tensor(1.5), "intermediate_loss": torch.tensor(0.0),
        "ce_loss": torch.tensor(1.0), "dynamic_scale": torch.tensor(0.66),
        "kd/a": torch.tensor(1.4), "alpha/a": torch.tensor(1.0), "aligned_chunk_fraction/a": torch.tensor(0.9),
    }
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, n, report = B.loss_and_report(mask, total * 1.0, logs, teacher_names=["a", "b"])
    assert int(n) == 5 and loss.item() == pytest.approx(12.5)
    loss.backward()
    assert total.grad.item() == pytest.approx(5.0)
    for key in (*B.REPORT_KEYS, "kd/a", "alpha/b", "aligned chunk fraction/b"):
        assert report[key].shape == (2,) and report[key][1].item() == 5.0, key
    assert report["kd/a"][0].item() / 5 == pytest.approx(1.4)
    assert report["total loss"][0].item() / 5 == pytest.approx(2.5)
    assert report["lm loss"][0].item() / 5 == pytest.approx(1.0)
    assert report["logits distillation loss"][0].item() / 5 == pytest.approx(1.5)
    assert report["kd/b"][0].item() == 0.0  # absent teacher terms still reported (equal key sets per micro-batch)
    loss_eval, _, _ = B.loss_and_report(mask, total, logs, teacher_names=["a"], training=False)
    assert loss_eval.item() == pytest.approx(5.0)  # validation: CE only, as Bridge's loss_func_kd
    assert not any(k.startswith("kd bound/") for k in report)  # exact exchange: no bound to report
    _, _, report = B.loss_and_report(mask, total, {**logs, "kd_bound/a": torch.tensor(2e-4)}, teacher_names=["a", "b"])
    assert report["kd bound/a"][0].item() / 5 == pytest.approx(2e-4) and "kd bound/b" not in report


def test_forward_step_refuses_a_model_without_distillation():
    with pytest.raises(Exception, match="not a distillation model"):
        B.forward_step(SimpleNamespace(timers=None), iter([_batch()]), torch.nn.Linear(2, 2))


# ---- provider conversion ---------------------------------------------------------------------------


def test_check_parallel_sizes_refuses_mismatch_and_pipeline():
    s = SimpleNamespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, context_parallel_size=1)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size is 4 but the student's is 2"):
        B.check_parallel_sizes(s, [SimpleNamespace(tensor_model_parallel_size=4, pipeline_model_parallel_size=1, context_parallel_size=1)])
    s2 = SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=1)
    with pytest.raises(ConfigError, match="parallel.pipeline_model_parallel_size=2: pipeline parallelism is not supported"):
        B.check_parallel_sizes(s2, [SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=1)])


def test_conversion_of_real_providers(small):
    """Bridge providers keep their classes; each model gets its own sequence length; nothing mirrored; one hook."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    student, teacher = B.provider_from_hf(str(small["llama"])), B.provider_from_hf(str(small["qwen3"]))
    hooks_s, hooks_t = len(student._pre_wrap_hooks), len(teacher._pre_wrap_hooks)  # Bridge's HF weight loaders
    res = ResourceReport(None, {}, {}, {}, [])
    out = B.convert_to_xtoken_distillation_provider(student, [teacher], _cfg(small["llama"]), resources=res)
    assert out is student and type(student) is GPTModelProvider and type(teacher) is GPTModelProvider
    assert (student.seq_length, teacher.seq_length) == (S, T)  # unequal: no DistillationProvider check
    assert student.tensor_model_parallel_size == teacher.tensor_model_parallel_size == 2
    assert (student.vocab_size, teacher.vocab_size) == (320, 352)  # never mirrored from the student
    assert len(student._pre_wrap_hooks) == hooks_s + 1 and len(teacher._pre_wrap_hooks) == hooks_t
    assert student._pre_wrap_hooks[-1].__name__ == "xtoken_pre_wrap_hook"  # after Bridge's weight loading
    with pytest.raises(ConfigError, match="2 teacher providers for 1"):
        B.convert_to_xtoken_distillation_provider(student, [teacher, teacher], _cfg(small["llama"]), resources=res)


def test_student_cross_entropy_is_native_whatever_the_provider_says(small):
    """TE's fused cross-entropy writes its gradient into the logits the KD criterion reads: the conversion
    sets the native implementation (before the fix a DeepSeek-style provider kept ``"te"``)."""
    student, teacher = B.provider_from_hf(str(small["llama"])), B.provider_from_hf(str(small["qwen3"]))
    student.cross_entropy_loss_fusion, student.cross_entropy_fusion_impl = True, "te"
    B.convert_to_xtoken_distillation_provider(student, [teacher], _cfg(small["llama"]), resources=ResourceReport(None, {}, {}, {}, []))
    assert student.cross_entropy_fusion_impl == "native"


def test_precision_is_settled_from_the_config(small):
    """A fp16 checkpoint makes Bridge's provider fp16; ``train.bf16`` alone decides (before: fp16 and bf16 both set)."""
    raw = B.provider_from_hf(str(small["llama_fp16"]))
    assert raw.fp16 and not raw.bf16 and raw.params_dtype == torch.float16  # Bridge follows the checkpoint's dtype
    raw.bf16 = True  # what the pre-fix code did
    assert raw.fp16 and raw.bf16
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        cfg = _cfg(small["llama_fp16"], teachers=[{"name": "q", "tokenizer": "qwen3", "model": str(small["qwen3"]),
                                                    "projection": "w", "loss": "p_kl"}],
                   train={"train_iters": 4, "global_batch_size": 2, "micro_batch_size": 2, "bf16": bf16})
        student, (teacher,) = B.build_providers(cfg, load_weights=False)
        for p in (student, teacher):
            assert (p.bf16, p.fp16, p.params_dtype, p.pipeline_dtype) == (bf16, False, dtype, dtype)


def test_model_support_is_the_registry_not_supports(small):
    """``AutoBridge.supports()`` accepts any ``*ForCausalLM``; the check asks the dispatch registry."""
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    opt = B.model_support(str(small["opt"]))
    assert AutoBridge.supports(AutoConfig.from_pretrained(small["opt"]))  # what the pre-fix --check relied on
    assert not opt.supported and opt.architecture == "OPTForCausalLM" and "not yet supported" in opt.reason
    for kind, bridge in (("llama", "LlamaBridge"), ("qwen3", "Qwen3Bridge"), ("phi3", "Phi3Bridge")):
        sup = B.model_support(str(small[kind]))
        assert sup.supported and sup.bridge == bridge, sup
    with pytest.raises(ConfigError, match=r"teachers.0 \(q\).model: .*OPTForCausalLM, which Megatron-Bridge cannot convert"):
        B.build_providers(_cfg(small["llama"], teachers=[{"name": "q", "tokenizer": "t", "model": str(small["opt"]), "projection": "w"}]),
                          load_weights=False)
    with pytest.raises(B.XTokenError, match="cannot read the Hugging Face config in"):
        B.model_support(str(small["opt"].parent))  # a folder without config.json


def test_phi3_provider_from_the_hf_config(small):
    """Phi3's config → provider: partial rotary, LongRoPE factors and attention factor as HF derives them, tying."""
    import math

    from transformers import Phi3Config

    from nemo_xtoken.integration.phi3_bridge import Phi3Bridge, Phi3ModelProvider

    hf = Phi3Config.from_pretrained(small["phi3"])
    p = B.provider_from_hf(str(small["phi3"]))
    assert isinstance(p, Phi3ModelProvider) and p.rotary_percent == 0.75 and p.share_embeddings_and_output_weights
    assert p.longrope_short_factor == hf.rope_parameters["short_factor"] and p.longrope_long_factor == hf.rope_parameters["long_factor"]
    assert p.longrope_original_max_position_embeddings == 16 and not p.apply_rope_fusion
    assert p.longrope_attention_factor == pytest.approx(math.sqrt(1 + math.log(256 / 16) / math.log(16)))
    p.seq_length = 16
    assert p.longrope_factors() == hf.rope_parameters["short_factor"]
    p.seq_length = 17
    assert p.longrope_factors() == hf.rope_parameters["long_factor"]
    back = Phi3Config(**Phi3Bridge.megatron_to_hf_config(p))  # Megatron → HF config
    for key in ("short_factor", "long_factor", "original_max_position_embeddings", "partial_rotary_factor", "rope_type"):
        assert back.rope_parameters[key] == hf.rope_parameters[key], key
    assert (back.tie_word_embeddings, back.vocab_size, back.num_key_value_heads) == (True, 320, hf.num_key_value_heads)


# ---- config mapping --------------------------------------------------------------------------------


def test_bridge_config_kwargs_instantiate_megatron_config_classes(tmp_path):
    """Bridge's TrainingConfig/SchedulerConfig/… subclass these megatron-core classes: the names must exist."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training.config import CheckpointConfig, LoggerConfig, RNGConfig, SchedulerConfig, TrainingConfig, ValidationConfig

    from nemo_xtoken.integration.config import load_config

    cfg = load_config("conf/llama32_1b__qwen3_4b_pkl.yaml")
    kw = B.bridge_config_kwargs(cfg)
    tr = TrainingConfig(**kw["train"])
    assert (tr.train_iters, tr.global_batch_size, tr.micro_batch_size) == (30000, 768, 1)
    opt = OptimizerConfig(**kw["optimizer"])
    assert (opt.lr, opt.weight_decay, opt.clip_grad, opt.optimizer, opt.bf16) == (5e-5, 0.1, 1.0, "adam", True)
    sch = SchedulerConfig(**kw["scheduler"])
    assert (sch.lr_decay_style, sch.lr_warmup_iters, sch.lr_decay_iters) == ("cosine", 1500, 30000)  # 5% warmup
    ck = CheckpointConfig(**kw["checkpoint"])
    assert ck.ckpt_format == "torch_dist" and ck.save == ck.load == "checkpoints/llama32_1b__qwen3_4b_pkl"
    assert LoggerConfig(**kw["logger"]).tensorboard_dir == "tb/llama32_1b__qwen3_4b_pkl"
    assert RNGConfig(**kw["rng"]).seed == 1234
    ValidationConfig(**kw["validation"])
    from megatron.core.distributed import DistributedDataParallelConfig

    DistributedDataParallelConfig(**kw["ddp"])
    assert dataclasses.is_dataclass(tr)


def test_run_paths_resolve_against_the_config_folder(tmp_path):
    """Under Slurm each experiment starts in a new working directory: relative run folders are the config's."""
    from nemo_xtoken.integration.config import load_config

    cfg = load_config("conf/llama32_1b__qwen3_4b_pkl.yaml", ["student.checkpoint=base/iter_0000010", "checkpoint.load=/abs/load"])
    kw = B.bridge_config_kwargs(cfg, base_dir=tmp_path / "conf")
    base = (tmp_path / "conf").resolve()
    assert kw["checkpoint"]["save"] == str(base / "checkpoints/llama32_1b__qwen3_4b_pkl")
    assert kw["checkpoint"]["load"] == "/abs/load"  # absolute paths are kept
    assert kw["checkpoint"]["pretrained_checkpoint"] == str(base / "base/iter_0000010")
    assert kw["logger"]["tensorboard_dir"] == str(base / "tb/llama32_1b__qwen3_4b_pkl")
    cfg = load_config("conf/llama32_1b__qwen3_4b_pkl.yaml")
    assert B.bridge_config_kwargs(cfg, base_dir=tmp_path)["checkpoint"]["load"] == str(tmp_path.resolve() / "checkpoints/llama32_1b__qwen3_4b_pkl")


def test_resolve_checkpoint_names_the_key(tmp_path):
    with pytest.raises(B.XTokenError, match=r"teachers.0 \(t\).checkpoint .* does not exist"):
        B.resolve_checkpoint(tmp_path / "nope", key="teachers.0 (t).checkpoint")
