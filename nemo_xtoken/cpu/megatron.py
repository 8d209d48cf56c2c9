"""Megatron-core on a CPU: gloo process groups, tensor parallel, tiny ``GPTModel`` instances (the demo's runtime).

``xtoken demo`` trains tiny Megatron models on a CPU through this module, ``xtoken check-model`` and
``xtoken distill --check`` run their CPU checks on its gloo groups and CUDA redirects, and the test
suite uses it too (with the optimizer-checkpoint helpers at the end of this module, which only the
tests use).  The GPU training path never imports it.

Megatron-core assumes a GPU in four places that matter for a small CPU run:

1. the model-parallel RNG tracker seeds and forks the *CUDA* generator
   (``tensor_parallel.random``: ``torch.cuda.manual_seed`` / ``get_rng_state``);
2. ``torch.cuda.current_device()`` is used to allocate buffers in rotary embeddings, attention
   and ``tensor_parallel.mappings`` (all-gathers);
3. the default causal mask of the unfused softmax (used when no ``attention_mask`` is passed)
   is built with ``device="cuda"`` (``transformer.utils.get_default_causal_mask``, imported by
   name into ``fusions.fused_softmax``);
4. distributed checkpointing calls ``torch.cuda.synchronize()`` before writing (a no-op here).

All are reached from ordinary forward passes and saves, not only at init.

:func:`cpu_megatron_patches` redirects exactly these to the CPU inside a ``with`` block and
restores the originals on exit (reversible, scoped); :func:`cpu_model_parallel_seed` fills the
RNG tracker with CPU generator states.  This module is never imported by the GPU code path.

Megatron's ``clip_grad_norm_fp32`` allocates on ``device="cuda"``: :func:`clip_grad_norm_tp`
computes the same norm (tensor-parallel duplicates counted once) for a plain ``torch.optim``
optimizer.

:func:`spawn` runs a function on ``world_size`` gloo ranks (fork start method, so functions
defined in test modules work) and returns each rank's result.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "cpu_megatron_patches",
    "cpu_model_parallel_seed",
    "init_megatron_cpu",
    "destroy_megatron_cpu",
    "tiny_gpt_config",
    "build_tiny_gpt",
    "TinyGPTSpec",
    "spawn",
    "gather_vocab_parallel_logits",
    "free_port",
    "clip_grad_norm_tp",
    "init_adam_state",
    "optimizer_sharded_state_dict",
    "load_optimizer_state",
]


# ---- the three CUDA assumptions, redirected -----------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def cpu_megatron_patches() -> Iterator[None]:
    """Redirect Megatron-core's CUDA RNG and ``torch.cuda.current_device()`` to the CPU, reversibly.

    Inside the block: ``torch.cuda.current_device()`` returns ``"cpu"`` (a valid ``device=``
    argument), and ``tensor_parallel.random``'s get/set of the CUDA RNG state act on the CPU
    generator, so ``get_cuda_rng_tracker().fork()`` swaps CPU generator states.  On exit every
    patched attribute is put back (also on exceptions).
    """
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        patch(torch.cuda, "current_device", lambda: "cpu")
        patch(torch.cuda, "synchronize", lambda device=None: None)
        patch(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
        patch(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
        patch(fused_softmax, "get_default_causal_mask", _cpu_default_causal_mask)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def cpu_model_parallel_seed(seed: int) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed``: same stream names and seed offsets.

    The default stream gets ``seed``; the tensor-model-parallel stream ``seed + 2718 + tp_rank``;
    the expert stream ``seed + 1024 + 100 * ep_rank + etp_rank`` (Megatron's offsets), each as a
    CPU generator state in the tracker.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    seeds = {
        mrandom._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
        mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024 + 100 * ep_rank + etp_rank,
    }
    for name, s in seeds.items():
        g = torch.Generator(device="cpu")
        g.manual_seed(s)
        tracker.seeds_.add(s)
        tracker.states_[name] = g.get_state()
    tracker._is_initialized = True
    torch.manual_seed(seed)


# ---- process groups ----------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on localhost (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_megatron_cpu(
    rank: int,
    world_size: int,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    port: int | None = None,
) -> None:
    """Start gloo (if needed) and Megatron's model-parallel groups on the CPU, then seed the RNGs."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if port is not None:
            os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    cpu_model_parallel_seed(seed)


def destroy_megatron_cpu() -> None:
    """Tear down Megatron's groups and the default process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- tiny GPT models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyGPTSpec:
    """Sizes of a tiny Megatron ``GPTModel`` (Llama-style: RMSNorm, SwiGLU, RoPE, untied output)."""

    vocab_size: int
    max_sequence_length: int = 64
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    share_embeddings_and_output_weights: bool = False


def tiny_gpt_config(spec: TinyGPTSpec, *, tensor_model_parallel_size: int | None = None, **overrides: Any):
    """A ``TransformerConfig`` for a CPU run: fp32, no dropout, CPU initialization, local (non-TE) layers."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = tensor_model_parallel_size or ps.get_tensor_model_parallel_world_size()
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        ffn_hidden_size=spec.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=True,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        init_method_std=0.02,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(spec: TinyGPTSpec, *, seed: int = 1234, config: Any = None, pre_process: bool = True, post_process: bool = True):
    """A tiny ``GPTModel`` on the CPU; with the same ``seed``, TP=1 and TP=k hold the same full weights.

    ``use_cpu_initialization`` draws each full weight from the CPU generator and keeps this rank's
    slice, so the result does not depend on the tensor-parallel size.  Call inside
    :func:`cpu_megatron_patches` after :func:`init_megatron_cpu`.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    cfg = config if config is not None else tiny_gpt_config(spec)
    torch.manual_seed(seed)
    cpu_model_parallel_seed(seed)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        parallel_output=True,
    )


def gather_vocab_parallel_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-sharded logits ``[..., V/tp]`` into ``[..., V]`` over the TP group (no grad)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits.detach().clone()
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


# ---- gradient clipping (Megatron's clip_grad_norm_fp32, on the CPU) -------------------------------


def clip_grad_norm_tp(params: Any, max_norm: float) -> torch.Tensor:
    """Megatron's gradient clipping: the L2 norm over all model-parallel shards (TP duplicates counted once).

    Returns the total norm; scales the gradients by ``max_norm / (norm + 1e-6)`` when below 1.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            sq = sq + p.grad.detach().float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt()
    coeff = float(max_norm) / (float(norm) + 1e-6)
    if coeff < 1.0:
        for p in params:
            p.grad.detach().mul_(coeff)
    return norm


# ---- multi-process runner ----------------------------------------------------------------------


def _detach(obj: Any, to_numpy: bool) -> Any:
    """Tensors ↔ numpy arrays, recursively (tensors in a queue would travel as shared-memory handles
    that die with the worker; arrays travel by value)."""
    import numpy as np

    if to_numpy and isinstance(obj, torch.Tensor):
        return ("__tensor__", obj.detach().cpu().numpy().copy())
    if not to_numpy and isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__" and isinstance(obj[1], np.ndarray):
        return torch.from_numpy(obj[1])
    if isinstance(obj, dict):
        return {k: _detach(v, to_numpy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v, to_numpy) for v in obj)
    return obj


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", _detach(out, True)))
    except BaseException:  # report any failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked processes; return results by rank.

    The environment (``MASTER_ADDR/PORT``, ``RANK``, ``WORLD_SIZE``) is set for
    ``init_process_group("gloo")``.  A failure on any rank raises ``RuntimeError`` carrying that
    rank's traceback.  Results travel through a multiprocessing queue: return tensors or plain data.
    """
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, q), daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = q.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"timed out after {timeout}s waiting for a rank")
                break
            if status == "ok":
                results[rank] = _detach(payload, False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


# ---- optimizer checkpoints on a CPU --------------------------------------------------------------
# Megatron's ``FP32Optimizer`` allocates on ``device="cuda"`` literally: these do its checkpoint work
# with a plain ``torch.optim`` optimizer and Megatron's own ``dist_checkpointing.optimizer`` functions,
# in the same checkpoint layout (moments as ``ShardedTensor`` objects, one ``common_step``).


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam moments for every parameter without state (Megatron's ``init_state_fn``)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if len(optimizer.state[p]) == 0:
                optimizer.state[p]["exp_avg"] = torch.zeros_like(p.data)
                optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model_sharded_state_dict: Any, *, is_loading: bool = False) -> dict:
    """The optimizer's sharded state dict, as ``FP32Optimizer.sharded_state_dict`` builds it.

    Moments become ``ShardedTensor`` objects laid out like their parameters (so a checkpoint saved at one
    TP size is laid out by the model's sharding), the common step is stored once
    (``state.common_step``).  ``is_loading`` first creates empty moments to load into.
    """
    import copy

    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state

    if is_loading:
        init_adam_state(optimizer)
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, params)
    steps = {float(st["step"]) for st in sd["state"].values() if "step" in st}
    if len(steps) > 1:
        raise ValueError(f"the optimizer step differs per parameter ({sorted(steps)}): Megatron stores one common step")
    step = next((copy.deepcopy(st["step"]) for st in sd["state"].values() if "step" in st), None)
    if is_loading and step is None:
        step = torch.tensor(0.0)
    optim_state_to_sharding_state(sd, id_map, exclude_keys="step")
    if step is not None:
        sd["state"]["common_step"] = step
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, loaded: dict) -> None:
    """Load a state dict returned by ``dist_checkpointing.load`` for :func:`optimizer_sharded_state_dict`."""
    import copy

    state = loaded["state"]
    step = state.pop("common_step", None)
    if step is not None:
        for st in state.values():
            st["step"] = copy.deepcopy(step)
    optimizer.load_state_dict(loaded)
