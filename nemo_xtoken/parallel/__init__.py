"""Vocab-parallel (tensor-parallel) losses over Megatron's sharded logits."""

from nemo_xtoken.parallel.losses import (
    P_KL_EPS,
    vocab_parallel_gold,
    vocab_parallel_h_kl,
    vocab_parallel_kl,
    vocab_parallel_p_kl,
    vocab_parallel_uld,
)
from nemo_xtoken.parallel.plan import PKLPlan, teacher_permutation
from nemo_xtoken.parallel.primitives import vocab_parallel_gather, vocab_parallel_log_softmax

__all__ = [
    "P_KL_EPS",
    "PKLPlan",
    "teacher_permutation",
    "vocab_parallel_gather",
    "vocab_parallel_gold",
    "vocab_parallel_h_kl",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_p_kl",
    "vocab_parallel_uld",
]
