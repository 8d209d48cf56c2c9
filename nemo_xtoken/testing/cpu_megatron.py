"""Test helpers for Megatron-core on a CPU: optimizer checkpoints; re-exports :mod:`nemo_xtoken.megatron_cpu`.

The CPU runtime (gloo groups, the CUDA redirects, tiny ``GPTModel``s, ``spawn``) lives in
:mod:`nemo_xtoken.megatron_cpu`, because ``xtoken demo`` runs on it; its names are re-exported here
so that ``from nemo_xtoken.testing.cpu_megatron import ...`` keeps working.  What stays here is
test-only: Megatron's ``FP32Optimizer`` allocates on ``device="cuda"`` literally, so
:func:`optimizer_sharded_state_dict` and :func:`load_optimizer_state` do its checkpoint work with a
plain ``torch.optim`` optimizer and Megatron's own ``dist_checkpointing.optimizer`` functions, in
the same checkpoint layout (moments as ``ShardedTensor``s, one ``common_step``).
"""

from __future__ import annotations

import torch

from nemo_xtoken.megatron_cpu import (  # noqa: F401  (re-exported)
    TinyGPTSpec,
    build_tiny_gpt,
    clip_grad_norm_tp,
    cpu_megatron_patches,
    cpu_model_parallel_seed,
    destroy_megatron_cpu,
    free_port,
    gather_vocab_parallel_logits,
    init_megatron_cpu,
    spawn,
    tiny_gpt_config,
)

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


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam moments for every parameter without state (Megatron's ``init_state_fn``)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if len(optimizer.state[p]) == 0:
                optimizer.state[p]["exp_avg"] = torch.zeros_like(p.data)
                optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model_sharded_state_dict: Any, *, is_loading: bool = False) -> dict:
    """The optimizer's sharded state dict, as ``FP32Optimizer.sharded_state_dict`` builds it.

    Moments become ``ShardedTensor``s laid out like their parameters (so a checkpoint saved at one
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
