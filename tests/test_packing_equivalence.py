"""A packed batch gives every document the losses it gets alone, on the CPU Megatron path at TP 1 and 2.

Real tokenizers and W (Llama-3 student; Qwen3 and o200k teachers across tokenizers, a Llama-3
teacher on the student's ids), real text (State of the Union openings), tiny Megatron ``GPTModel``s
with the full vocabularies, Megatron's local (non-TE) attention on gloo ranks.

One packed batch (several documents per sample, documents split across samples) goes through the
Bridge forward step (``forward_step`` → ModelOpt's ``DistillationModel`` → ``loss_func``).  Then
every segment of it (a run of one document) is run alone: a sample holding only that segment,
default causal attention, positions from 0.  What must be equal, segment by segment:

- the student's and every teacher's logits at the segment's positions;
- the student's per-token CE (the step's own output and the vocab-parallel CE);
- every KD loss, chunk by chunk (``reduction="none"``): P-KL, H-KL, GOLD and ULD against the Qwen3
  teacher, P-KL and H-KL against o200k, same-tokenizer KL against the Llama-3 teacher;
- and the step's reported CE and per-teacher KD: the means over the segments run alone.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.data.batch import aligned_positions_from_batch, collate  # noqa: E402
from nemo_xtoken.data.documents import TextDocuments  # noqa: E402
from nemo_xtoken.data.packing import DualTokenizedDataset  # noqa: E402
from nemo_xtoken.cpu.megatron import (  # noqa: E402
    TinyGPTSpec,
    build_tiny_gpt,
    cpu_megatron_patches,
    gather_vocab_parallel_logits,
    init_megatron_cpu,
    spawn,
)

S, T_Q, T_O, B = 40, 48, 40, 2
VS = 128256  # Llama-3 (a multiple of 256)


def _pad(v: int) -> int:
    return -(-v // 256) * 256  # a multiple of 128·tp for tp ≤ 2


def _texts() -> list[str]:
    from nemo_xtoken.assets import text_corpus

    out = []
    with open(text_corpus("sotu")) as f:
        for i, line in enumerate(f):
            if i in (3, 40, 120, 200, 230):
                t = json.loads(line)["text"]
                out.append(t[: (30, 60, 45, 200, 50)[len(out)]])  # 9, 13, 9, 46, 12 Llama-3 tokens
    return out


def _worker(rank: int, world: int, docs, w_q, w_o, llama3) -> dict:
    from megatron.core import parallel_state as ps

    from nemo_xtoken.integration import bridge as B_
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, convert_to_xtoken_distillation_model
    from nemo_xtoken.parallel import (
        vocab_parallel_cross_entropy,
        vocab_parallel_gold,
        vocab_parallel_h_kl,
        vocab_parallel_kl,
        vocab_parallel_p_kl,
        vocab_parallel_uld,
    )

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=7)
    vq, vo = _pad(w_q.teacher_vocab_size), _pad(w_o.teacher_vocab_size)
    with cpu_megatron_patches():
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=64), seed=7)
        tq = build_tiny_gpt(TinyGPTSpec(vocab_size=vq, max_sequence_length=64, hidden_size=48), seed=8)
        to = build_tiny_gpt(TinyGPTSpec(vocab_size=vo, max_sequence_length=64), seed=9)
        tl = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=64), seed=10)
        specs = [
            TeacherSpec("qwen3", "p_kl", w_q, 0.5, w_q.teacher_vocab_size),
            TeacherSpec("o200k", "h_kl", w_o, 0.3, w_o.teacher_vocab_size),
            TeacherSpec("llama", "kl", None, 0.2, w_q.student_vocab_size),
        ]
        crit = XTokenLogitsLoss(specs, student_vocab_size=w_q.student_vocab_size, student_padded=VS, teacher_padded=[vq, vo, VS], tp=world)
        model = convert_to_xtoken_distillation_model(student, [tq, to, tl], crit)
        ds = DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=[T_Q, T_O], packing=True, shuffle=False)
        batch = collate([ds[i] for i in range(B)])
        segs = [ds.segments(i) for i in range(B)]
        captured: dict[str, list] = {"s": [], "q": [], "o": [], "l": []}
        for key, mod in (("s", student), ("q", tq), ("o", to), ("l", tl)):
            mod.output_layer.register_forward_hook(lambda m, i, o, key=key: captured[key].append(o[0].detach()))
        model.train()
        output, loss_fn = B_.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
        _, n_tok, report = loss_fn(output)
        packed = {k: v[-1].transpose(0, 1) for k, v in captured.items()}  # output layers give [S|T, B, V/tp]
        tbs = B_.teacher_batches_from_batch(batch, ["p_kl", "h_kl", "kl"])

        def losses(s_log, t_logs, tb) -> dict[str, torch.Tensor]:
            """Per-chunk KD values (0 where a chunk does not count), the chunk mask, and per-position CE."""
            q, o, l_ = t_logs
            aq, ao, al = (aligned_positions_from_batch(b) for b in tb)
            kw = dict(reduction="none", student_vocab_size=w_q.student_vocab_size)
            out = {
                "p_kl/qwen3": vocab_parallel_p_kl(s_log, q, w_q, alignment=aq, **kw),
                "h_kl/qwen3": vocab_parallel_h_kl(s_log, q, w_q, alignment=aq, teacher_vocab_size=w_q.teacher_vocab_size, **kw),
                "gold/qwen3": vocab_parallel_gold(s_log, q, w_q, alignment=aq, teacher_vocab_size=w_q.teacher_vocab_size, **kw),
                "uld/qwen3": vocab_parallel_uld(s_log, q, alignment=aq, teacher_vocab_size=w_q.teacher_vocab_size, **kw),
                "p_kl/o200k": vocab_parallel_p_kl(s_log, o, w_o, alignment=ao, **kw),
                "h_kl/o200k": vocab_parallel_h_kl(s_log, o, w_o, alignment=ao, teacher_vocab_size=w_o.teacher_vocab_size, **kw),
                "kl/llama": vocab_parallel_kl(s_log, l_, alignment=al, teacher_vocab_size=w_q.student_vocab_size, **kw),
                "mask/qwen3": aq.chunk_mask(), "mask/o200k": ao.chunk_mask(), "mask/llama": al.chunk_mask(),
                "ce": vocab_parallel_cross_entropy(s_log, tb[0]["labels"], vocab_size=w_q.student_vocab_size, reduction="none"),
            }
            return {k: v.detach() for k, v in out.items()}

        with torch.no_grad():
            packed_losses = losses(packed["s"], [packed["q"], packed["o"], packed["l"]], tbs)
            with model.only_student_forward():  # the same batch without the packed attention
                unmasked = gather_vocab_parallel_logits(model(batch["tokens"], batch["position_ids"], None))
            alone = []
            for b in range(B):
                for sg in segs[b]:
                    x = collate([ds._build([sg])])  # this segment alone, padded, no other document
                    assert int(x["segment_ids"].max()) == 0
                    with model.only_student_forward():
                        s_log = model(x["tokens"], x["position_ids"], None)
                    q_log = tq(x["teacher_tokens"], x["teacher_position_ids"], None)
                    o_log = to(x["teacher_tokens@1"], x["teacher_position_ids@1"], None)
                    l_log = tl(x["tokens"], x["position_ids"], None)
                    tb_alone = B_.teacher_batches_from_batch(x, ["p_kl", "h_kl", "kl"])
                    alone.append({
                        "sample": b, "seg": sg,
                        "n_chunks": (int(x["n_chunks"]), int(x["n_chunks@1"])),
                        "loss_mask": x["loss_mask"][0],
                        "logits": {k: gather_vocab_parallel_logits(v)[0] for k, v in (("s", s_log), ("q", q_log), ("o", o_log), ("l", l_log))},
                        "losses": losses(s_log, [q_log, o_log, l_log], tb_alone),
                    })
        return {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "batch": {k: v for k, v in batch.items()},
            "segments": segs,
            "output": output.detach(),
            "n_tok": int(n_tok),
            "report": {k: (v[0] / v[1]).item() for k, v in report.items()},
            "packed_logits": {k: gather_vocab_parallel_logits(v) for k, v in packed.items()},
            "packed_losses": packed_losses,
            "unmasked_logits": unmasked,
            "alone": alone,
        }


@pytest.fixture(scope="module")
def runs(llama3, qwen3, o200k, w_llama3_qwen3, w_llama3_o200k):
    docs = TextDocuments(_texts(), llama3, [qwen3, o200k])
    return {tp: spawn(_worker, tp, docs, w_llama3_qwen3, w_llama3_o200k, llama3, timeout=900) for tp in (1, 2)}


def _slots(segs, b: int, side: int | None) -> list[tuple[int, int]]:
    """(start, end) slots of each segment of sample ``b``: student side (``side=None``) or teacher ``side``."""
    out, used = [], 0
    for sg in segs[b]:
        n = sg.s1 - sg.s0 if side is None else sg.t1[side] - sg.t0[side]
        out.append((used, used + n))
        used += n
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_batch_gives_every_document_its_own_losses(runs, tp):
    ref = runs[1][0]
    for r in runs[tp]:
        segs, batch, alone = r["segments"], r["batch"], r["alone"]
        assert max(len(s) for s in segs) >= 3  # several documents share a sample
        docs = [sg.doc for s in segs for sg in s]
        assert len(docs) > len(set(docs))  # and a document continues in the next sample
        assert len(alone) == sum(len(s) for s in segs)
        k = 0
        chunk_off = [0, 0, 0]  # flattened chunk ids of each teacher's packed alignment
        tot = {"ce": [0.0, 0], **{f"kd/{n}": [0.0, 0] for n in ("qwen3", "o200k", "llama")}}
        for b in range(B):
            stu, tq, to = _slots(segs, b, None), _slots(segs, b, 0), _slots(segs, b, 1)
            for j, sg in enumerate(segs[b]):
                a = alone[k]
                assert a["seg"] == sg and a["sample"] == b
                (s0, s1), (q0, q1), (o0, o1) = stu[j], tq[j], to[j]
                s1, q1, o1 = min(s1, S), min(q1, T_Q), min(o1, T_O)
                n, nq, no = s1 - s0, q1 - q0, o1 - o0
                lg, pl = a["logits"], r["packed_logits"]
                torch.testing.assert_close(pl["s"][b, s0:s1], lg["s"][:n], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(pl["l"][b, s0:s1], lg["l"][:n], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(pl["q"][b, q0:q1], lg["q"][:nq], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(pl["o"][b, o0:o1], lg["o"][:no], atol=2e-5, rtol=1e-4)
                # student CE per position: the step's own output and the vocab-parallel CE
                lm = a["loss_mask"][:n] > 0
                assert torch.equal(batch["loss_mask"][b, s0:s1] > 0, lm)
                ce_alone = a["losses"]["ce"].reshape(1, -1)[0, :n][lm]
                torch.testing.assert_close(r["output"][b, s0:s1][lm], ce_alone, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(r["packed_losses"]["ce"].reshape(B, S)[b, s0:s1][lm], ce_alone, atol=2e-5, rtol=1e-5)
                tot["ce"][0] += float(ce_alone.sum())
                tot["ce"][1] += int(lm.sum())
                # every KD loss, chunk by chunk
                n_q, n_o = a["n_chunks"]
                for m, (name, nk) in enumerate((("qwen3", n_q), ("o200k", n_o), ("llama", n))):
                    # same tokenizer (llama): one chunk per student position, numbered by slot in each sample
                    p0, a0 = (chunk_off[m], 0) if name != "llama" else (b * S + s0, 0)
                    sl, sa = slice(p0, p0 + nk), slice(a0, a0 + nk)
                    mask_p, mask_a = r["packed_losses"][f"mask/{name}"][sl], a["losses"][f"mask/{name}"][sa]
                    assert torch.equal(mask_p, mask_a), (name, b, j)
                    for loss in [x for x in a["losses"] if x.endswith("/" + name) and not x.startswith("mask")]:
                        torch.testing.assert_close(r["packed_losses"][loss][sl], a["losses"][loss][sa], atol=2e-5, rtol=1e-4, msg=loss)
                    if name != "llama":
                        chunk_off[m] += nk
                    main = {"qwen3": "p_kl/qwen3", "o200k": "h_kl/o200k", "llama": "kl/llama"}[name]
                    tot[f"kd/{name}"][0] += float(a["losses"][main][sa][mask_a].sum())
                    tot[f"kd/{name}"][1] += int(mask_a.sum())
                k += 1
        assert chunk_off[0] == int(r["batch"]["n_chunks"].sum()) and chunk_off[1] == int(r["batch"]["n_chunks@1"].sum())
        # the step's report: the means over the documents run alone
        assert r["n_tok"] == tot["ce"][1] == int(batch["loss_mask"].sum())
        assert r["report"]["ce loss"] == pytest.approx(tot["ce"][0] / tot["ce"][1], rel=1e-5)
        for name in ("qwen3", "o200k", "llama"):
            s_, c_ = tot[f"kd/{name}"]
            assert c_ > 10
            assert r["report"][f"kd/{name}"] == pytest.approx(s_ / c_, rel=1e-5), name
        # TP = 2 equals TP = 1
        for key in ("ce loss", "kd/qwen3", "kd/o200k", "kd/llama", "total loss"):
            assert r["report"][key] == pytest.approx(ref["report"][key], rel=1e-5), key


def test_the_check_can_fail_without_the_packed_attention(runs):
    """The same packed batch under plain causal attention: documents after the first in a sample change."""
    r = runs[1][0]
    changed = 0
    k = 0
    for b in range(B):
        for j, (s0, s1) in enumerate(_slots(r["segments"], b, None)):
            a = r["alone"][k]
            k += 1
            s1 = min(s1, S)
            diff = (r["unmasked_logits"][b, s0:s1] - a["logits"]["s"][: s1 - s0]).abs().max()
            if j == 0:
                assert diff < 2e-5  # the first document sees nothing before it either way
            else:
                changed += bool(diff > 1e-3)
    assert changed >= 2
