"""Vocab-parallel (tensor-parallel) losses over Megatron's sharded logits.

Every loss takes this rank's vocabulary shards, returns the full loss on every rank, and gives
each rank's shard exactly its slice of the reference gradient (see README.md, section "Tensor parallelism").
"""

from nemo_xtoken.parallel.combine import (
    PARALLEL_LOSSES,
    dynamic_scale,
    total_loss,
    vocab_parallel_cross_entropy,
    vocab_parallel_multi_teacher,
    vocab_parallel_teacher_score,
)
from nemo_xtoken.parallel.losses import (
    P_KL_EPS,
    vocab_parallel_gold,
    vocab_parallel_h_kl,
    vocab_parallel_kl,
    vocab_parallel_p_kl,
    vocab_parallel_uld,
)
from nemo_xtoken.parallel.partition import PartitionTPPlan, vocab_parallel_partition_kl
from nemo_xtoken.parallel.plan import PKLPlan, teacher_permutation
from nemo_xtoken.parallel.primitives import vocab_parallel_gather, vocab_parallel_log_softmax
from nemo_xtoken.parallel.summary import HybridPlan

__all__ = [
    "HybridPlan",
    "PartitionTPPlan",
    "vocab_parallel_partition_kl",
    "PARALLEL_LOSSES",
    "P_KL_EPS",
    "PKLPlan",
    "dynamic_scale",
    "teacher_permutation",
    "total_loss",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_gather",
    "vocab_parallel_gold",
    "vocab_parallel_h_kl",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_multi_teacher",
    "vocab_parallel_p_kl",
    "vocab_parallel_teacher_score",
    "vocab_parallel_uld",
]
