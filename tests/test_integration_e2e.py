"""CPU end-to-end: tiny Megatron GPT student (Llama-3 ids) ← teacher (Qwen3 ids), TP=2 on gloo, P-KL, checkpoint resume.

The models use the tokenizers' full id spaces (Llama-3: 128,256; Qwen3: 151,669 padded to 151,808
for TP), with a tiny hidden size, so no vocabulary reduction is needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_xtoken.integration.data import DualTokenizedDataset, TextDocuments, collate  # noqa: E402
from nemo_xtoken.integration.distill import TeacherSpec, XTokenDistillationModel, XTokenLogitsLoss  # noqa: E402
from nemo_xtoken.testing.cpu_megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu, spawn  # noqa: E402

TEXTS = [
    "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it.",
    "Hundreds of numbers: 201, 307, 999 and 12 more.",
    "The quick brown fox jumps over the lazy dog.",
]
VS, VT = 128256, 151808  # Llama-3 ids; Qwen3's 151,669 ids padded to a multiple of 128·tp
S, T, MB, STEPS, CKPT_AT = 24, 32, 2, 24, 20


def _optimizer_state_arrays(opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    out = {}
    for i, (_, st) in enumerate(sorted(opt.state_dict()["state"].items())):
        for k, v in st.items():
            out[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().numpy().copy()
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    sd = opt.state_dict()
    for i in sd["state"] if sd["state"] else range(len(sd["param_groups"][0]["params"])):
        pass
    state = {}
    for key, arr in arrays.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = torch.from_numpy(arr.copy())
    sd["state"] = state
    opt.load_state_dict(sd)


def _run(rank: int, world: int, W, docs, ckpt_dir: str, mode: str) -> list[dict[str, float]]:
    """mode "full": STEPS steps, save at CKPT_AT; "resume": load the checkpoint, run the remaining steps."""
    from megatron.core import dist_checkpointing
    from safetensors.numpy import load_file, save_file

    init_megatron_cpu(rank, world, tensor_model_parallel_size=2, seed=3)
    with cpu_megatron_patches():
        seed = 3 if mode == "full" else 99  # a resumed run must get its weights from the checkpoint
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=64), seed=seed)
        teacher = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=64), seed=4)
        crit = XTokenLogitsLoss(
            [TeacherSpec("qwen3", "p_kl", W, 1.0, W.teacher_vocab_size)],
            student_vocab_size=W.student_vocab_size, student_padded=VS, teacher_padded=[VT], tp=2,
        )
        model = XTokenDistillationModel(student, [teacher], crit)
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not any(k.startswith("_teachers") for k in model.state_dict())
        ds = DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=T, seed=0, on_too_long="split")
        opt = torch.optim.AdamW(list(model.student_parameters()), lr=3e-3, weight_decay=0.1)
        start = 0
        if mode == "resume":
            sd = dist_checkpointing.load(student.sharded_state_dict(), ckpt_dir)
            student.load_state_dict(sd)
            _load_optimizer_state(opt, load_file(f"{ckpt_dir}/optim_rank{rank}.safetensors"))
            start = CKPT_AT
        logs = []
        for step in range(start, STEPS):
            batch = collate([ds[step * MB + j] for j in range(MB)])  # index-based: resumable
            out = model(batch)
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(model.student_parameters()), 1.0)
            opt.step()
            logs.append({k: float(v.detach()) for k, v in out.items()})
            if mode == "full" and step + 1 == CKPT_AT:
                dist_checkpointing.save(student.sharded_state_dict(), ckpt_dir)
                save_file(_optimizer_state_arrays(opt), f"{ckpt_dir}/optim_rank{rank}.safetensors")
        return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, w_llama3_qwen3, llama3, qwen3):
    docs = TextDocuments(TEXTS, llama3, qwen3)
    ckpt = tmp_path_factory.mktemp("ckpt")
    full = spawn(_run, 2, w_llama3_qwen3, docs, str(ckpt), "full", timeout=600)
    resumed = spawn(_run, 2, w_llama3_qwen3, docs, str(ckpt), "resume", timeout=600)
    return full, resumed


def test_training_reduces_loss_and_logs_finite_kd(runs):
    (full0, full1), _ = runs
    assert len(full0) == STEPS
    for log in full0:
        for key in ("loss", "kd_loss", "logits_loss", "intermediate_loss", "ce_loss", "dynamic_scale", "kd/qwen3", "aligned_chunk_fraction/qwen3"):
            assert math.isfinite(log[key]), (key, log)
        assert 0.5 < log["aligned_chunk_fraction/qwen3"] <= 1.0
    first = np.mean([x["loss"] for x in full0[:3]])
    last = np.mean([x["loss"] for x in full0[-3:]])
    assert last < 0.8 * first, (first, last)
    assert full0[-1]["ce_loss"] < full0[0]["ce_loss"]
    # every TP rank reports the same full loss
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(a["loss"])) for a, b in zip(full0, full1))


def test_resume_from_distributed_checkpoint_gives_the_same_next_losses(runs):
    (full0, _), (res0, _) = runs
    assert len(res0) == STEPS - CKPT_AT
    for a, b in zip(full0[CKPT_AT:], res0):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["kd/qwen3"] == pytest.approx(b["kd/qwen3"], rel=1e-6, abs=1e-6)
