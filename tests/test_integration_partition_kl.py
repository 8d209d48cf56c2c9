"""partition_kl through ModelOpt's DistillationModel on the CPU Megatron path, TP 1 and TP 2.

Tiny Megatron GPTs (student 250 real ids padded to 256, teacher 300 ids padded to 384), random
spellings of both vocabularies (1–3 pieces each), the batch of ``tests/test_integration_modelopt``
(1:1, 1:2 and 2:1 chunks, a masked tail): a few AdamW steps train the student through the
criterion; TP 2 gives the losses of TP 1, and the KD term falls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.integration.distill import (  # noqa: E402
    TeacherSpec,
    XTokenLogitsLoss,
    convert_to_xtoken_distillation_model,
    teacher_inputs_from_batch,
    xtoken_loss,
)
from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu, spawn  # noqa: E402
from nemo_xtoken.vocab.spellings import Spellings  # noqa: E402
from tests.test_integration_modelopt import VS, VS_REAL, VT, VT_REAL, _batches  # noqa: E402

STEPS = 4


def _spellings() -> Spellings:
    rng = np.random.default_rng(1)
    s_in_t = [rng.choice(VT_REAL, size=int(rng.integers(1, 4)), replace=False).tolist() for _ in range(VS_REAL)]
    t_in_s = [rng.choice(VS_REAL, size=int(rng.integers(1, 3)), replace=False).tolist() for _ in range(VT_REAL)]
    s_in_t[7] = None  # an unspelled student token
    return Spellings.from_lists(s_in_t, t_in_s)


def _run(rank: int, world: int) -> dict:
    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=3)
    with cpu_megatron_patches():
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=3)
        teacher = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=16, hidden_size=48), seed=4)
        crit = XTokenLogitsLoss(
            [TeacherSpec("qwen", "partition_kl", _spellings(), 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS,
            teacher_padded=[VT], tp=world, block_size=5,
        )
        model = convert_to_xtoken_distillation_model(student, [teacher], crit)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        a, _ = _batches()
        model.train()
        logs = []
        for _ in range(STEPS):
            out = model(a["tokens"], a["position_ids"], None, labels=a["labels"], teacher_inputs=[teacher_inputs_from_batch(a)])
            loss, log = xtoken_loss(model, a, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logs.append({"loss": float(loss.detach()), "kd": float(log["kd/qwen"])})
        return {"logs": logs, "traffic": crit.traffic()}


@pytest.fixture(scope="module")
def runs():
    return {tp: spawn(_run, tp, timeout=900) for tp in (1, 2)}


def test_partition_kl_trains_through_the_megatron_criterion_at_tp2_as_at_tp1(runs):
    one, two = runs[1][0]["logs"], runs[2]
    for r in two:  # every rank reports the same losses, equal to TP 1's
        for a, b in zip(one, r["logs"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["kd"] == pytest.approx(a["kd"], rel=1e-3, abs=1e-7)
    assert all(np.isfinite(x["kd"]) and x["kd"] > 0 for x in one)
    assert one[-1]["kd"] < one[0]["kd"], one
    row = runs[2][0]["traffic"][0]
    assert row["loss"] == "partition_kl" and row["exchange"] == "plan" and row["partition"]["level1_buckets"] > 0
    assert row["fraction_of_all_gather"] < 1.0


def test_config_check_reports_the_partition(llama3_path, qwen3_path):
    """`loss: partition_kl` needs no W file: the spellings come from the tokenizers; `--check`'s exchange
    report names the partition's size (real Llama-3 → Qwen3)."""
    from nemo_xtoken.integration.config import config_from_dict, validate_resources
    from nemo_xtoken.integration.distill import criterion_from_config
    from nemo_xtoken.integration.train import format_exchange_report

    cfg = config_from_dict({
        "student": {"tokenizer": llama3_path, "seq_length": 32},
        "teachers": [{"name": "q", "tokenizer": qwen3_path, "loss": "partition_kl", "seq_length": 48}],
        "train": {"train_iters": 20, "global_batch_size": 4, "micro_batch_size": 2},
    })
    rep = validate_resources(cfg)
    assert rep.projections == {} and rep.spellings["q"].shape == (128256, 151669)
    crit, _ = criterion_from_config(cfg, rep, tp=2, student_padded=128256, teacher_padded=[151936])
    rows = crit.traffic()
    assert rows[0]["exchange"] == "plan" and rows[0]["partition"]["level1_buckets"] > 100_000
    assert 0 < rows[0]["fraction_of_all_gather"] < 1
    text = format_exchange_report(rows)
    assert "partition_kl" in text and "level-1 buckets" in text and "in no bucket" in text
