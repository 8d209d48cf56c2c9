"""Learnable W through ModelOpt's DistillationModel on the CPU Megatron path: trained, checkpointed, resumed exactly.

Tiny Megatron GPTs (student 250 real ids padded to 256, P-KL teacher 300 ids padded to 384, a
random W) on gloo at TP 1 and TP 2.  The criterion holds a ``LearnableProjection``; ModelOpt
registers it among the model's parameters, so the optimizer trains it and Megatron's
distributed checkpoint (``torch_dist``) saves it with the student and the Adam moments.  A run
saved at step CKPT_AT and resumed from there gives bit-identical next losses and the same W; the
W trained at TP 2 equals the one trained at TP 1.
"""

from __future__ import annotations

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
from nemo_xtoken.losses.learnable import LearnableProjection  # noqa: E402
from nemo_xtoken.cpu.megatron import (  # noqa: E402
    TinyGPTSpec,
    build_tiny_gpt,
    clip_grad_norm_tp,
    cpu_megatron_patches,
    init_megatron_cpu,
    load_optimizer_state,
    optimizer_sharded_state_dict,
    spawn,
)
from tests.test_integration_modelopt import VS, VS_REAL, VT, VT_REAL, _batches, _projection  # noqa: E402

STEPS, CKPT_AT = 6, 4
W_KEY = "learnable_w.qwen.logits"


def _run(rank: int, world: int, ckpt_dir: str, mode: str, block_size: int | None = 512) -> dict:
    from megatron.core import dist_checkpointing

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=3)
    with cpu_megatron_patches():
        seed = 3 if mode == "full" else 99  # a resumed run must get everything from the checkpoint
        student = build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=16), seed=seed)
        teacher = build_tiny_gpt(TinyGPTSpec(vocab_size=VT, max_sequence_length=16, hidden_size=48), seed=4)
        lw = LearnableProjection(_projection())
        if mode == "resume":
            with torch.no_grad():
                lw.logits.normal_()  # must be overwritten by the checkpoint
        w0 = lw.weights().detach().clone()
        crit = XTokenLogitsLoss(
            [TeacherSpec("qwen", "p_kl", lw, 1.0, VT_REAL)], student_vocab_size=VS_REAL, student_padded=VS, teacher_padded=[VT], tp=world,
            block_size=block_size,
        )
        model = convert_to_xtoken_distillation_model(student, [teacher], crit)
        params = [p for p in model.parameters() if p.requires_grad]
        facts = {
            "w_in_optimizer": any(p is lw.logits for p in params),
            "state_keys": [k for k in model.state_dict() if "learnable" in k],
            "sharded_keys": [k for k in model.sharded_state_dict() if "learnable" in k],
        }
        opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
        start = 0
        if mode == "resume":
            msd = model.sharded_state_dict()
            loaded = dist_checkpointing.load({"model": msd, "optimizer": optimizer_sharded_state_dict(opt, msd, is_loading=True)}, ckpt_dir)
            model.load_state_dict(loaded["model"])
            load_optimizer_state(opt, loaded["optimizer"])
            start = CKPT_AT
        a, _ = _batches()
        model.train()
        logs = []
        for step in range(start, STEPS):
            out = model(a["tokens"], a["position_ids"], None, labels=a["labels"], teacher_inputs=[teacher_inputs_from_batch(a)])
            loss, log = xtoken_loss(model, a, out)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_tp(params, 1.0)
            opt.step()
            logs.append({"loss": float(loss.detach()), "kd": float(log["kd/qwen"]), "w_grad_norm": float(lw.logits.grad.norm())})
            if mode == "full" and step + 1 == CKPT_AT and ckpt_dir:
                msd = model.sharded_state_dict()
                dist_checkpointing.save({"model": msd, "optimizer": optimizer_sharded_state_dict(opt, msd)}, ckpt_dir)
                facts["w_at_ckpt"] = lw.weights().detach().clone()
        facts["logs"] = logs
        facts["w_start"] = w0
        facts["w_end"] = lw.weights().detach().clone()
        if mode == "full" and ckpt_dir:
            meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
            facts["ckpt_shapes"] = {k: tuple(v.global_shape) for k, v in meta.items() if "learnable" in k}
        return facts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for tp in (1, 2):
        ckpt = tmp_path_factory.mktemp(f"ckpt_tp{tp}")
        out[tp] = (spawn(_run, tp, str(ckpt), "full", timeout=900), spawn(_run, tp, str(ckpt), "resume", timeout=900))
    out["blocked"] = spawn(_run, 2, "", "full", 3, timeout=900)  # the criterion token-blocked (3 positions)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_learnable_w_is_trained_saved_and_resumed_exactly(runs, tp):
    full, resumed = runs[tp]
    nnz = _projection().indices.size
    for f in full + resumed:
        assert f["w_in_optimizer"]
        assert any(k.endswith(W_KEY) for k in f["state_keys"]) and any(k.endswith(W_KEY) for k in f["sharded_keys"])
    assert any(k.endswith(W_KEY) and shape == (nnz,) for k, shape in full[0]["ckpt_shapes"].items())
    f0, r0 = full[0], resumed[0]
    assert all(x["w_grad_norm"] > 0 for x in f0["logs"])
    assert (f0["w_end"] - f0["w_start"]).abs().max() > 1e-3  # W moved
    # resumed: the checkpoint's W (not the resumed process's random init), then bit-identical steps
    assert not torch.equal(r0["w_start"], f0["w_at_ckpt"])
    for a, b in zip(f0["logs"][CKPT_AT:], r0["logs"]):
        assert a == b, (a, b)
    assert torch.equal(f0["w_end"], r0["w_end"])
    for rank in range(tp):  # every TP rank holds the same (replicated) W
        assert torch.equal(full[rank]["w_end"], f0["w_end"])


def test_learnable_w_trained_at_tp2_equals_tp1(runs):
    w1, w2 = runs[1][0][0]["w_end"], runs[2][0][0]["w_end"]
    torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-6)
    for a, b in zip(runs[1][0][0]["logs"], runs[2][0][0]["logs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_token_blocked_criterion_trains_the_same(runs):
    """block_size=3 (chunks kept whole, recomputed in the backward, collectives included) = unblocked, at TP 2."""
    full, blocked = runs[2][0][0], runs["blocked"][0]
    for a, b in zip(full["logs"], blocked["logs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-5)
        assert a["w_grad_norm"] == pytest.approx(b["w_grad_norm"], rel=1e-4)
    torch.testing.assert_close(blocked["w_end"], full["w_end"], rtol=1e-4, atol=1e-6)
