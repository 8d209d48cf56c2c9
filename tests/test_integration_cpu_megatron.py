"""The CPU Megatron harness: TP=2 on gloo reproduces TP=1 (logits, loss, gradients); patches are reversible."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_xtoken.cpu.megatron import (  # noqa: E402
    TinyGPTSpec,
    build_tiny_gpt,
    cpu_megatron_patches,
    gather_vocab_parallel_logits,
    init_megatron_cpu,
    spawn,
)

V, S, B = 250, 12, 2  # 250 is not a multiple of 2: Megatron needs V % tp == 0, so the test pads below


def _forward_backward(rank: int, world_size: int, tp: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    init_megatron_cpu(rank, world_size, tensor_model_parallel_size=tp, seed=11)
    with cpu_megatron_patches():
        model = build_tiny_gpt(TinyGPTSpec(vocab_size=256, max_sequence_length=S), seed=11)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, V, (B, S), generator=g)
        labels = torch.randint(0, V, (B, S), generator=g)
        pos = torch.arange(S).unsqueeze(0).expand(B, -1)
        logits = model(ids, pos, None)  # [B, S, 256/tp]
        loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.t().contiguous()).mean()
        loss.backward()
        w = model.output_layer.weight.grad  # [256/tp, H]: this rank's vocabulary rows
        e = model.embedding.word_embeddings.weight.grad
        return {
            "logits": gather_vocab_parallel_logits(logits),
            "loss": loss.detach(),
            "out_grad": w.clone(),
            "emb_grad": e.clone(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "finite": all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None),
        }


@pytest.fixture(scope="module")
def runs():
    return spawn(_forward_backward, 1, 1), spawn(_forward_backward, 2, 2)


def test_tp2_logits_equal_tp1(runs):
    (r1,), (a, b) = runs
    assert r1["logits"].shape == (B, S, 256)
    torch.testing.assert_close(a["logits"], r1["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["logits"], r1["logits"], atol=1e-5, rtol=1e-5)


def test_tp2_backward_matches_tp1(runs):
    (r1,), (a, b) = runs
    torch.testing.assert_close(a["loss"], r1["loss"], atol=1e-6, rtol=1e-6)
    assert a["finite"] and b["finite"] and r1["finite"]
    # vocab-parallel layers: rank r holds rows [r*128, (r+1)*128) of the full gradient
    full_out = r1["out_grad"]
    torch.testing.assert_close(a["out_grad"], full_out[:128], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b["out_grad"], full_out[128:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([a["emb_grad"], b["emb_grad"]]), r1["emb_grad"], atol=1e-6, rtol=1e-5)
    assert full_out.abs().sum() > 0


def test_patches_are_reversible():
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    before = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, fused_softmax.get_default_causal_mask)
    with pytest.raises(ValueError):
        with cpu_megatron_patches():
            assert torch.cuda.current_device() == "cpu"
            assert torch.equal(mrandom._get_cuda_rng_state(), torch.get_rng_state())
            raise ValueError("leave the block by an exception")
    after = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, fused_softmax.get_default_causal_mask)
    assert before == after


def test_runtime_module_layout():
    """The CPU runtime lives in ``nemo_xtoken.cpu`` only (one definition: the old paths are gone); the GPU path never imports it."""
    import select
    from pathlib import Path
    import sys

    import nemo_xtoken.cpu.megatron as runtime

    for name in ("TinyGPTSpec", "build_tiny_gpt", "cpu_megatron_patches", "init_megatron_cpu", "spawn", "clip_grad_norm_tp", "free_port",
                 "optimizer_sharded_state_dict", "load_optimizer_state"):
        assert callable(getattr(runtime, name)), name
    pkg = Path(runtime.__file__).parents[1]  # the old paths are gone (checked on disk: an editable install elsewhere may still map them)
    for gone in ("megatron_cpu.py", "testing/cpu_megatron.py", "testing/bridge_te_shim.py"):
        assert not (pkg / gone).exists(), gone
    # A fresh import of the GPU path's modules, in a child forked from this process: the third-party packages this
    # process already imported (torch, megatron, modelopt: the 10-25 CPU-seconds a new interpreter spends) stay loaded,
    # every ``nemo_xtoken`` module (and import hook of ours) is dropped first, so exactly what importing the four
    # modules pulls in of ``nemo_xtoken`` lands in ``sys.modules``.  No entry point or third-party module imports
    # ``nemo_xtoken``, so this is what a new interpreter would import of it.
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no thread of its own, no parallel op; it only imports and reports
        try:
            os.close(r)
            sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("nemo_xtoken")]
            for m in [m for m in sys.modules if m == "nemo_xtoken" or m.startswith("nemo_xtoken.")]:
                del sys.modules[m]
            import nemo_xtoken.integration.distill, nemo_xtoken.integration.data, nemo_xtoken.parallel, nemo_xtoken.losses  # noqa: E401, F401

            assert "nemo_xtoken.integration.distill" in sys.modules  # the purge above did not leave the old ones
            bad = [m for m in sys.modules if m.startswith(("nemo_xtoken.cpu", "nemo_xtoken.testing", "nemo_xtoken.demo"))]
            os.write(w, repr(bad).encode())
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            os.write(w, f"child failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        if not select.select([f], [], [], 300)[0]:
            os.kill(pid, 9)
        out = f.read().decode()  # EOF when the child exits (or was killed: "")
    os.waitpid(pid, 0)
    assert out == "[]", out
