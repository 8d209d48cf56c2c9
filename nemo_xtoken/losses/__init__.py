"""Single-device reference losses: the specification every optimized and sharded path is tested against."""

from nemo_xtoken.losses.learnable import LearnableProjection
from nemo_xtoken.losses.reference import (
    EPS,
    LOSSES,
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

__all__ = [
    "EPS",
    "LOSSES",
    "REDUCTIONS",
    "CommonSet",
    "LearnableProjection",
    "SparseW",
    "exact_common_set",
    "gold",
    "h_kl",
    "kl",
    "p_kl",
    "resolve_projection",
    "top1_common_set",
    "uld",
]
