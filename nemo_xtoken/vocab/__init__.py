"""Vocabulary bridge: canonical token strings, the projection W, its file format and the coverage audit."""

from nemo_xtoken.vocab.audit import AuditReport, audit
from nemo_xtoken.vocab.canonical import CanonicalVocab, canonical_vocab
from nemo_xtoken.vocab.projection import Projection, build_projection, cached_projection, load_projection
from nemo_xtoken.vocab.tokenizer_io import TokenizerInfo, load_tokenizer

__all__ = [
    "AuditReport",
    "CanonicalVocab",
    "Projection",
    "TokenizerInfo",
    "audit",
    "build_projection",
    "cached_projection",
    "canonical_vocab",
    "load_projection",
    "load_tokenizer",
]
