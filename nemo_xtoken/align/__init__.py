"""Span alignment of one text under two tokenizers, alignment storage, and chunk merge operators."""

from nemo_xtoken.align.core import (
    Alignment,
    AlignmentBatch,
    align,
    align_batch,
    align_offsets,
    align_offsets_batch,
    encode_for_alignment,
    token_bytes,
)
from nemo_xtoken.align.merge import MERGES, AlignedPositions, merge_log_probs, positions_from_token_chunks

__all__ = [
    "MERGES",
    "AlignedPositions",
    "Alignment",
    "AlignmentBatch",
    "align_batch",
    "align_offsets_batch",
    "align",
    "align_offsets",
    "encode_for_alignment",
    "merge_log_probs",
    "positions_from_token_chunks",
    "token_bytes",
]
