"""Bytes each tensor-parallel rank sends per item (position or chunk) for each loss and exchange.

Counted from the plans, exact and machine-independent (the benchmark's and ``xtoken distill
--check``'s accounting): fp32 values in the forward (the backward sends the same back); an
all-reduce costs a ring's ``2·(tp − 1)/tp`` of its buffer, an all-gather ``(tp − 1)/tp`` of the
gathered row.  Every loss also all-reduces scalars per item: the softmax max and sum-exp of
both sides (:data:`SOFTMAX_SCALARS`) and, where the loss is a sum of per-rank partials (KL, P-KL,
the common-set KL of low-traffic GOLD / H-KL), that sum.  Counted per position without an
alignment; with one, the chain merge adds one all-reduce per student position (its target
log-probabilities) and the loss terms are per chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BYTES_PER_VALUE", "SOFTMAX_SCALARS", "ring_all_reduce", "all_gather_values", "exchange_values_per_token"]

BYTES_PER_VALUE = 4  # fp32 on the wire
SOFTMAX_SCALARS = 4  # max and sum-exp of each side: one scalar all-reduce each


def ring_all_reduce(values: float, tp: int) -> float:
    """Values each rank sends in a ring all-reduce of ``values`` numbers."""
    return 2 * (tp - 1) / tp * values if tp > 1 else 0.0


def all_gather_values(width: int, tp: int) -> float:
    """Values each rank sends when ``width`` padded columns are all-gathered from ``tp`` shards."""
    return (tp - 1) * width / tp if tp > 1 else 0.0


def exchange_values_per_token(
    loss: str, exchange: str, tp: int, student_padded: int, teacher_padded: int, plan: Any = None, bins: int | None = None
) -> np.ndarray:
    """float ``[tp]``: values rank ``r`` sends per item for one teacher's loss, scalars included.

    ``exchange``: ``"plan"`` (P-KL through its :class:`~nemo_xtoken.parallel.plan.PKLPlan`),
    ``"summary"`` (GOLD / H-KL through a :class:`~nemo_xtoken.parallel.summary.HybridPlan`, ULD
    through the ``bins``-interval summary), ``"all-gather"`` (exact ULD / GOLD / H-KL: both sides'
    item rows) or ``"local"`` (same-tokenizer KL).
    """
    from nemo_xtoken.errors import XTokenError
    from nemo_xtoken.parallel.summary import summary_values_per_token

    partials = exchange in ("plan", "local") or (exchange == "summary" and loss != "uld")  # Σ_r partial_r all-reduce
    scalars = ring_all_reduce(SOFTMAX_SCALARS + (1 if partials else 0), tp)
    if exchange in ("plan", "summary") and plan is not None:
        sent = plan.values_sent_per_token().astype(np.float64)
    elif exchange == "summary" and loss == "uld":
        if bins is None:
            raise XTokenError("the ULD summary's traffic needs its number of bins")
        sent = np.full(tp, ring_all_reduce(summary_values_per_token(bins), tp))
    elif exchange == "all-gather":
        sent = np.full(tp, all_gather_values(student_padded + teacher_padded, tp))
    elif exchange == "local":
        sent = np.zeros(tp)
    else:
        raise XTokenError(f"no traffic count for loss {loss!r} with exchange {exchange!r} (plan given: {plan is not None})")
    return sent + scalars
