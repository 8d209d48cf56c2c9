"""Span alignment of one text under two tokenizers, alignment storage, chunk merge operators, preprocessed corpora.

The merge operators need torch and load on first use, so that the alignment and preprocessing
(numpy only) start fast in worker processes; the reader of `xtoken preprocess` output
(``PreprocessedCorpus``) and ``PreprocessOptions`` also load on first use.
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
_PREPROCESS_NAMES = ("PreprocessedCorpus", "PreprocessOptions")

__all__ = [
    "MERGES",
    "SIDE_MODES",
    "AlignedPositions",
    "Alignment",
    "AlignmentBatch",
    "PreprocessOptions",
    "PreprocessedCorpus",
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
    if name in _PREPROCESS_NAMES:
        from nemo_xtoken.align import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module 'nemo_xtoken.align' has no attribute {name!r}")
