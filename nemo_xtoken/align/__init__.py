"""Span alignment of one text under two tokenizers, alignment storage, chunk merge operators, conversations.

The merge operators need torch and load on first use, so that the alignment (numpy only) starts fast
in ``xtoken preprocess``'s worker processes.  Preprocessing a corpus and reading its output live one
layer up, in :mod:`nemo_xtoken.data` (``from nemo_xtoken.data import PreprocessedCorpus, PreprocessOptions``).
"""

from typing import Any

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

_MERGE_NAMES = ("MERGES", "SIDE_MODES", "AlignedPositions", "merge_log_probs", "positions_from_token_chunks", "side_modes")

__all__ = [
    "MERGES",
    "SIDE_MODES",
    "AlignedPositions",
    "Alignment",
    "AlignmentBatch",
    "align",
    "align_batch",
    "align_offsets",
    "align_offsets_batch",
    "encode_for_alignment",
    "merge_log_probs",
    "positions_from_token_chunks",
    "side_modes",
    "token_bytes",
]


def __getattr__(name: str) -> Any:
    if name in _MERGE_NAMES:
        from nemo_xtoken.align import merge

        return getattr(merge, name)
    raise AttributeError(f"module 'nemo_xtoken.align' has no attribute {name!r}")
