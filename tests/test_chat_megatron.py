"""A packed batch of conversations on the CPU Megatron path at TP 1 and 2: every conversation gets the loss it gets alone.

Llama-3 student, Qwen3 teacher (P-KL, real W), each side reading the conversations through its own
chat template (``data.format: chat``); tiny Megatron ``GPTModel``s with the full vocabularies,
Megatron's local attention on gloo ranks, the plugin's Bridge forward step and loss function.
The step's CE and KD on the packed batch equal the token- and chunk-weighted means over the
segments run alone; the loss mask holds the assistant contents and end-of-turn tokens only; TP 2
equals TP 1.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.data.packing import DualTokenizedDataset  # noqa: E402
from nemo_xtoken.data.batch import aligned_positions_from_batch, collate  # noqa: E402
from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu, spawn  # noqa: E402

S, T, B = 56, 64, 2
VS = 128256

CONVS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": "12*7 = 84."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime 😀"},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven, and 2027."}],
    [{"role": "user", "content": "f(x) = 2x. f(21)?"}, {"role": "assistant", "content": "f(21) = 42"}],
    [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


def _pad(v: int) -> int:
    return -(-v // 256) * 256


def _worker(rank: int, world: int, ds, w_q) -> dict:
    from nemo_xtoken.integration import bridge as B_
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, convert_to_xtoken_distillation_model

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=7)
    vq = _pad(w_q.teacher_vocab_size)
    with cpu_megatron_patches():
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=64), seed=7)
        tq = build_tiny_gpt(TinyGPTSpec(vocab_size=vq, max_sequence_length=64, hidden_size=48), seed=8)
        crit = XTokenLogitsLoss([TeacherSpec("qwen3", "p_kl", w_q, 1.0, w_q.teacher_vocab_size)], student_vocab_size=w_q.student_vocab_size,
                                student_padded=VS, teacher_padded=[vq], tp=world)
        model = convert_to_xtoken_distillation_model(student, [tq], crit)
        model.train()

        def step(batch):
            with torch.no_grad():
                output, loss_fn = B_.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
                _, n_tok, report = loss_fn(output)
            rep = {k: (v[0] / v[1]).item() for k, v in report.items()}
            return rep, int(n_tok), int(aligned_positions_from_batch(batch).chunk_mask().sum())

        packed = step(collate([ds[i] for i in range(B)]))
        alone = [step(collate([ds._build([sg])])) for b in range(B) for sg in ds.segments(b)]
    return {"packed": packed, "alone": alone}


@pytest.fixture(scope="module")
def chat_ds(tmp_path_factory, llama3, qwen3):
    from nemo_xtoken.data.chat import ChatDocuments

    f = tmp_path_factory.mktemp("chat") / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVS))
    docs = ChatDocuments(f, llama3, qwen3)
    return DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=T, packing=True, shuffle=False)


def test_chat_samples_carry_assistant_losses_only(chat_ds):
    ds = chat_ds
    segs = [ds.segments(i) for i in range(B)]
    assert max(len(s) for s in segs) >= 2  # several conversations share a sample
    docs = [sg.doc for s in segs for sg in s]
    assert len(docs) > len(set(docs))  # and one continues in the next sample
    for b in range(B):
        x = ds[b]
        used = 0
        for sg in segs[b]:
            d = ds._doc(sg.doc)
            n = sg.s1 - sg.s0
            p = min(n - 1, S - used)
            want = d.student_loss_mask[sg.s0 + 1: sg.s0 + 1 + p].astype(np.float32)
            assert np.array_equal(x["loss_mask"][used: used + p].numpy(), want)
            kd = d.teachers[0].student_kd_mask[sg.s0 + 1: sg.s0 + 1 + p]
            assert (x["student_chunk_ids"][used: used + p].numpy()[~kd] == -1).all()
            used += n
    ap = aligned_positions_from_batch(collate([ds[i] for i in range(B)]))
    assert int(ap.chunk_mask().sum()) > 10


@pytest.fixture(scope="module")
def runs(chat_ds, w_llama3_qwen3):
    return {tp: spawn(_worker, tp, chat_ds, w_llama3_qwen3, timeout=900) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_chat_batch_equals_conversations_alone(runs, tp):
    ref = runs[1][0]["packed"][0]
    for r in runs[tp]:
        rep, n_tok, n_kd = r["packed"]
        ce = sum(a[0]["ce loss"] * a[1] for a in r["alone"])
        kd = sum(a[0]["kd/qwen3"] * a[2] for a in r["alone"])
        assert n_tok == sum(a[1] for a in r["alone"]) and n_kd == sum(a[2] for a in r["alone"]) > 10
        assert rep["ce loss"] == pytest.approx(ce / n_tok, rel=1e-5)
        assert rep["kd/qwen3"] == pytest.approx(kd / n_kd, rel=1e-5)
        for key in ("ce loss", "kd/qwen3", "total loss"):
            assert rep[key] == pytest.approx(ref[key], rel=1e-5), key
