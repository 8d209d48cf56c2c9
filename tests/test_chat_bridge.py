"""A chat run config (``data.format: chat``) through the real Megatron-Bridge providers on a CPU, at TP 1 and 2.

Tiny random Hugging Face checkpoints (Llama student, Qwen3 teacher) with the real Llama-3 and Qwen3
tokenizers and chat templates, a real W; the run's path as ``tests/test_bridge_real.py`` drives it
(config → providers → Bridge's ``provide_distributed_model`` → ModelOpt's ``DistillationModel``; the
plugin's dataset builder, ``forward_step`` and ``loss_func``; a few AdamW steps).  Conversations are
packed; the loss mask holds the assistant tokens only; TP 2 gives the losses of TP 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.bridge")  # importable through tests/conftest.py's scoped TE hook

from bridge_tiny import run_config, write_config, write_tiny  # noqa: E402

from nemo_xtoken.integration import bridge as B  # noqa: E402
from nemo_xtoken.cpu.megatron import spawn  # noqa: E402

pytestmark = pytest.mark.slow

CONVS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": "12*7 = 84."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime 😀"},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven, and 2027."}],
    [{"role": "user", "content": "f(x) = 2x. f(21)?"}, {"role": "assistant", "content": "f(21) = 42"}],
    [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}],
]


def _train(rank: int, world: int, cfg_path: str) -> dict:
    from nemo_xtoken.integration.config import load_config, validate_resources
    from nemo_xtoken.cpu.bridge_te_shim import without_te
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, init_megatron_cpu

    with cpu_megatron_patches():
        base = Path(cfg_path).parent
        cfg = load_config(cfg_path)
        init_megatron_cpu(rank, world, tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size, seed=cfg.train.seed)
        res = validate_resources(cfg, base_dir=base)
        student, teachers = B.build_providers(cfg, base_dir=base)
        for p in (student, *teachers):
            without_te(p)
        B.convert_to_xtoken_distillation_provider(student, teachers, cfg, resources=res, base_dir=base)
        student.finalize()
        (model,) = student.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None)
        mb = cfg.train.micro_batch_size
        ds = B.build_dataset(cfg, cfg.train.train_iters * mb, resources=res, base_dir=base)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr, weight_decay=0.0)
        model.train()
        logs = []
        for step in range(cfg.train.train_iters):
            batch = ds.collate_fn([ds[step * mb + j] for j in range(mb)])
            output, loss_fn = B.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
            loss, n, report = loss_fn(output)
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            logs.append({k: float(v[0] / v[1]) for k, v in report.items()} | {
                "n": int(n), "positions": int((batch["tokens"] != -1).sum()), "kd_chunks": int((batch["student_chunk_ids"] >= 0).sum())})
        return {"logs": logs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama3_path, qwen3_path, w_llama3_qwen3):
    d = tmp_path_factory.mktemp("chat_bridge")
    student = write_tiny("llama", d / "student", seed=1)
    teacher = write_tiny("qwen3", d / "teacher", seed=2, tied=False)
    w = str(w_llama3_qwen3.save(d / "llama3__qwen3.safetensors"))
    out = {}
    for tp in (1, 2):
        folder = d / f"tp{tp}"
        folder.mkdir()
        (folder / "chat.jsonl").write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVS))
        data = run_config(student=student, llama_tok=llama3_path, tp=tp, s=48, steps=3, teachers=[
            {"name": "qwen3", "tokenizer": qwen3_path, "model": str(teacher), "projection": w, "loss": "p_kl", "seq_length": 56}])
        data["data"] = {"paths": ["chat.jsonl"], "format": "chat", "packing": True, "seed": 0, "chat": {"loss_on": "assistant"}}
        out[tp] = spawn(_train, tp, str(write_config(folder, data)), timeout=900)
    return out


def test_chat_config_trains_through_real_providers_at_tp1_and_tp2(runs):
    for tp in (1, 2):
        for r in runs[tp]:
            for log in r["logs"]:
                assert all(torch.isfinite(torch.tensor(v)) for v in log.values())
                assert 0 < log["n"] < log["positions"] // 2  # the assistant's tokens only carry the CE
                assert log["kd/qwen3"] > 0 and log["kd_chunks"] > 0
    ref = runs[1][0]["logs"]
    for r in runs[2]:
        for a, b in zip(r["logs"], ref):
            assert a["n"] == b["n"]
            for key in ("ce loss", "kd/qwen3", "total loss"):
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
