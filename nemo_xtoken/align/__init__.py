"""Span alignment of one text under two tokenizers, alignment storage, and chunk merge operators."""

from nemo_xtoken.align.core import Alignment, align, align_offsets, encode_for_alignment, token_bytes
from nemo_xtoken.align.merge import MERGES, AlignedPositions, merge_log_probs, positions_from_token_chunks

__all__ = [
    "MERGES",
    "AlignedPositions",
    "Alignment",
    "align",
    "align_offsets",
    "encode_for_alignment",
    "merge_log_probs",
    "positions_from_token_chunks",
    "token_bytes",
]
