"""Megatron-Bridge glue without Megatron-Bridge: batch handling, loss function, provider hook, config mapping.

Megatron-Bridge cannot be imported on a CPU (it imports transformer_engine), so its *model
providers* are replaced by a small stand-in (:class:`FakeProvider`: the attributes and the two
methods the glue uses — ``register_pre_wrap_hook`` and ``provide_distributed_model``).  Everything
else is real: Megatron ``GPTModel`` student and teacher (Llama-3 / Qwen3 vocabularies), Megatron's
tensor-parallel groups on gloo (TP = 2), the real tokenizers, W and dual-tokenized dataset, the
criterion, and megatron-core's own config classes (which Bridge's subclass) for the argument mapping.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_xtoken.integration import bridge as B  # noqa: E402
from nemo_xtoken.integration.config import ConfigError, ResourceReport, config_from_dict  # noqa: E402

S, T, MB = 24, 32, 2
VS, VT = 128256, 151808
TEXTS = [
    "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it.",
    "Hundreds of numbers: 201, 307, 999 and 12 more.",
    "The quick brown fox jumps over the lazy dog.",
]


def _cfg(**over):
    d = {
        "student": {"name": "s", "tokenizer": "llama3", "seq_length": S},
        "teachers": [{"name": "qwen3", "tokenizer": "qwen3", "projection": "w.safetensors", "loss": "p_kl", "seq_length": T}],
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_iters": 40, "global_batch_size": 8, "micro_batch_size": 2, "bf16": False},
    }
    d.update(over)
    return config_from_dict(d)


class FakeProvider:
    """Stand-in for a Bridge ``GPTModelProvider`` (Bridge cannot be imported without transformer_engine)."""

    def __init__(self, build=None, **attrs):
        self.tensor_model_parallel_size = 1
        self.pipeline_model_parallel_size = 1
        self.context_parallel_size = 1
        self.sequence_parallel = False
        self.seq_length = 4096
        self.vocab_size = None
        self.bf16 = False
        self.hooks = []
        self._build = build
        self.__dict__.update(attrs)

    def register_pre_wrap_hook(self, hook, prepend=False):
        self.hooks.insert(0, hook) if prepend else self.hooks.append(hook)

    def provide_distributed_model(self, wrap_with_ddp=True, mixed_precision_wrapper=None, **kw):
        assert wrap_with_ddp is False and mixed_precision_wrapper is None
        return [self._build()]


# ---- no Bridge here ------------------------------------------------------------------------------


def test_require_bridge_explains_what_is_missing():
    try:
        import megatron.bridge  # noqa: F401
    except Exception:
        pass
    else:  # pragma: no cover - a GPU machine with Bridge
        pytest.skip("Megatron-Bridge is importable here")
    with pytest.raises(B.BridgeUnavailableError, match=r"Megatron-Bridge is not importable.*(transformer_engine|nemo-xtoken\[bridge\])"):
        B.require_bridge()


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


def test_forward_step_refuses_a_model_without_distillation():
    with pytest.raises(Exception, match="not a distillation model"):
        B.forward_step(SimpleNamespace(timers=None), iter([_batch()]), torch.nn.Linear(2, 2))


# ---- provider conversion ---------------------------------------------------------------------------


def test_check_parallel_sizes_refuses_mismatch_and_pipeline():
    s = SimpleNamespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, context_parallel_size=1)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size is 4 but the student's is 2"):
        B.check_parallel_sizes(s, [SimpleNamespace(tensor_model_parallel_size=4, pipeline_model_parallel_size=1, context_parallel_size=1)])
    s2 = SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=1)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size > 1"):
        B.check_parallel_sizes(s2, [SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=1)])


def test_conversion_sets_own_sequence_lengths_and_leaves_classes_alone():
    student, teacher = FakeProvider(vocab_size=128256), FakeProvider(vocab_size=151936)
    res = ResourceReport(None, {}, {}, {}, [])
    out = B.convert_to_xtoken_distillation_provider(student, [teacher], _cfg(), resources=res)
    assert out is student and type(student) is FakeProvider and type(teacher) is FakeProvider
    assert (student.seq_length, teacher.seq_length) == (S, T)  # unequal: no DistillationProvider check
    assert student.tensor_model_parallel_size == teacher.tensor_model_parallel_size == 2
    assert teacher.vocab_size == 151936  # never mirrored from the student
    assert len(student.hooks) == 1 and not teacher.hooks
    with pytest.raises(ConfigError, match="2 teacher providers for 1"):
        B.convert_to_xtoken_distillation_provider(FakeProvider(), [FakeProvider(), FakeProvider()], _cfg(), resources=res)


def _hook_and_step(rank, world, W, docs, llama3, qwen3):
    """The pre-wrap hook builds teacher + criterion on TP=2; forward_step/loss_func train the student."""
    import modelopt.torch.distill as mtd
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    from nemo_xtoken.integration.data import DualTokenizedDataset, aligned_positions_from_batch, collate
    from nemo_xtoken.integration.distill import XTokenLogitsLoss, XTokenLossBalancer, xtoken_criterion
    from nemo_xtoken.megatron_cpu import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu

    init_megatron_cpu(rank, world, tensor_model_parallel_size=2, seed=3)
    with cpu_megatron_patches():
        teacher_prov = FakeProvider(build=lambda: build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=64), seed=4))
        student_prov = FakeProvider()
        res = ResourceReport(llama3, {"qwen3": qwen3}, {"qwen3": W}, {}, [])
        B.convert_to_xtoken_distillation_provider(student_prov, [teacher_prov], _cfg(), resources=res)
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=64), seed=3)
        (model,) = student_prov.hooks[0]([student])
        # one model type: ModelOpt's DistillationModel around the student, one criterion, our balancer
        assert model is student and isinstance(model, mtd.DistillationModel)
        crit = xtoken_criterion(model)
        assert isinstance(crit, XTokenLogitsLoss) and list(model._layers_to_loss.values()) == [crit]
        assert isinstance(model.loss_balancer, XTokenLossBalancer) and crit.tp == 2
        (teacher,) = model.teacher_model.teachers
        assert all(not p.requires_grad for p in teacher.parameters())
        assert get_model_config(model) is student.config  # what Bridge's get_model and Float16Module read
        set_input = get_attr_wrapped_model(model, "set_input_tensor")
        set_input([None])  # what Megatron's schedule calls before each micro-batch (PP = 1)
        set_input(None)
        sd_keys = set(model.state_dict())
        assert not any("teacher" in k for k in sd_keys) and "output_layer.weight" in sd_keys
        assert not any("teacher" in k for k in model.sharded_state_dict())  # checkpoints: the student only
        model.load_state_dict(model.state_dict())  # Bridge loads the checkpoint's model state into the chunk
        trainable = [p for p in model.parameters() if p.requires_grad]  # what Megatron's DDP/optimizer take
        n_teacher = sum(p.numel() for p in teacher.parameters())
        assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.parameters()) - n_teacher
        captured = {}
        student.output_layer.register_forward_hook(lambda m, i, o: captured.__setitem__("s", o[0]))
        model.teacher_model.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))
        ds = DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=T, seed=0, on_too_long="split")
        opt = torch.optim.AdamW(trainable, lr=3e-3)
        model.train()
        logs = []
        for step in range(12):
            batch = collate([ds[step * MB + j] for j in range(MB)])
            output, fn = B.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
            assert output.shape == (MB, S)  # the student's per-token CE (Megatron's LM loss)
            loss, n, report = fn(output)
            assert int(n) == int(batch["loss_mask"].sum())
            # the reported total is the criterion + balancer on this micro-batch, recomputed here
            with torch.no_grad():
                mask = batch["loss_mask"].float()
                ce = (output.detach() * mask).sum() / mask.sum()
                kd = crit(captured["s"].detach(), [x.detach() for x in captured["t"]], alignments=[aligned_positions_from_batch(batch)])
                direct = XTokenLossBalancer("dynamic")({"student_loss": ce, "XTokenLogitsLoss": kd})
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            assert all(p.grad is None for p in teacher.parameters())
            logs.append(
                {k: (v[0] / v[1]).item() for k, v in report.items()}
                | {"direct total": direct["kd_loss"].item(), "direct kd": kd.item(), "direct ce": ce.item(), "loss/n": (loss / n).item()}
            )
        return logs


def test_pre_wrap_hook_forward_step_and_loss_func_on_tp2(w_llama3_qwen3, llama3, qwen3):
    from nemo_xtoken.integration.data import TextDocuments
    from nemo_xtoken.megatron_cpu import spawn

    docs = TextDocuments(TEXTS, llama3, qwen3)
    logs0, logs1 = spawn(_hook_and_step, 2, w_llama3_qwen3, docs, llama3, qwen3, timeout=600)
    for log in logs0:
        for key in (*B.REPORT_KEYS, "kd/qwen3", "alpha/qwen3", "aligned chunk fraction/qwen3"):
            assert math.isfinite(log[key]), (key, log)
        assert log["total loss"] == pytest.approx(log["direct total"], rel=1e-5)
        assert log["total loss"] == pytest.approx(log["loss/n"], rel=1e-5)
        assert log["logits distillation loss"] == pytest.approx(log["direct kd"], rel=1e-5)
        assert log["kd/qwen3"] == pytest.approx(log["direct kd"], rel=1e-5) and log["alpha/qwen3"] == 1.0
        assert log["ce loss"] == log["lm loss"] == pytest.approx(log["direct ce"], rel=1e-5)
        assert log["dynamic scale"] == pytest.approx(log["direct ce"] / log["direct kd"], rel=1e-5)
        assert log["intermediate distillation loss"] == 0.0
        assert 0.5 < log["aligned chunk fraction/qwen3"] <= 1.0
    first = sum(x["total loss"] for x in logs0[:3]) / 3
    last = sum(x["total loss"] for x in logs0[-3:]) / 3
    assert last < first, (first, last)
    for key in ("total loss", "kd/qwen3", "ce loss"):
        assert [x[key] for x in logs0] == pytest.approx([x[key] for x in logs1], rel=1e-5)  # TP ranks agree


# ---- config mapping --------------------------------------------------------------------------------


def test_bridge_config_kwargs_instantiate_megatron_config_classes():
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
