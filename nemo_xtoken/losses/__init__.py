"""Single-device reference losses: the specification every optimized and sharded path is tested against.

``kl``, ``p_kl``, ``uld``, ``gold``, ``h_kl`` (``reference``); ``partition_kl`` (``partition``); ``multi_teacher`` with static or
adaptive teacher weights; ``total_loss`` (dynamic scaling or fixed weights); ``LearnableProjection``
(a trainable W for P-KL).  See README.md, section "Losses".
"""

from nemo_xtoken.losses.learnable import LearnableProjection
from nemo_xtoken.losses.multi_teacher import (
    WEIGHTINGS,
    MultiTeacherOutput,
    Teacher,
    adaptive_weights,
    multi_teacher,
    teacher_score,
)
from nemo_xtoken.losses.reference import (
    EPS,
    LOSSES,
    NEEDS_PROJECTION,
    REDUCTIONS,
    CommonSet,
    SparseW,
    exact_common_set,
    gold,
    h_kl,
    kl,
    p_kl,
    resolve_projection,
    top1_common_set,
    uld,
)
from nemo_xtoken.losses.partition import PartitionPlan, build_partition_plan, partition_kl
from nemo_xtoken.losses.total import TOTAL_MODES, dynamic_scale, total_loss

__all__ = [
    "EPS",
    "LOSSES",
    "NEEDS_PROJECTION",
    "REDUCTIONS",
    "TOTAL_MODES",
    "WEIGHTINGS",
    "CommonSet",
    "LearnableProjection",
    "MultiTeacherOutput",
    "SparseW",
    "Teacher",
    "adaptive_weights",
    "dynamic_scale",
    "exact_common_set",
    "gold",
    "h_kl",
    "kl",
    "multi_teacher",
    "p_kl",
    "partition_kl",
    "PartitionPlan",
    "build_partition_plan",
    "resolve_projection",
    "teacher_score",
    "top1_common_set",
    "total_loss",
    "uld",
]
