"""Span alignment of one text under two tokenizers, alignment storage, and chunk merge operators."""

from nemo_xtoken.align.merge import MERGES, AlignedPositions, merge_log_probs, positions_from_token_chunks

__all__ = ["MERGES", "AlignedPositions", "merge_log_probs", "positions_from_token_chunks"]
