"""Canonical token strings: every id of a tokenizer decoded to the bytes it stands for.

Two tokenizers can only be compared on what their tokens *mean*: the byte-level BPE alphabet
(``Ġ`` = space, ``Ċ`` = newline, …), SentencePiece's ``▁`` and ``<0xHH>`` byte fallback and
WordPiece's ``##`` are undone, so that equal text gives equal keys across families.  Tokens
that are partial UTF-8 sequences stay bytes (never U+FFFD).  Special tokens live in their own
namespace, with the usual BOS/EOS/PAD/UNK/end-of-turn names of every family mapped to one
canonical name so that, e.g., Llama-3's ``<|end_of_text|>`` matches Qwen3's ``<|endoftext|>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from nemo_xtoken.vocab.tokenizer_io import TokenizerInfo

__all__ = ["CanonicalVocab", "canonical_vocab", "bytes_to_unicode", "canonical_special", "SPECIAL_ALIASES"]

# Special-token spellings of the common families → one canonical name.
SPECIAL_ALIASES: dict[str, str] = {
    "<|begin_of_text|>": "<bos>",
    "<s>": "<bos>",
    "<bos>": "<bos>",
    "<|startoftext|>": "<bos>",
    "<|end_of_text|>": "<eos>",
    "</s>": "<eos>",
    "<eos>": "<eos>",
    "<|endoftext|>": "<eos>",
    "<pad>": "<pad>",
    "<|pad|>": "<pad>",
    "[PAD]": "<pad>",
    "<|finetune_right_pad_id|>": "<pad>",
    "<unk>": "<unk>",
    "[UNK]": "<unk>",
    "<|eot_id|>": "<eot>",
    "<|im_end|>": "<eot>",
    "<|end|>": "<eot>",
    "<end_of_turn>": "<eot>",
}

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def canonical_special(content: str) -> str:
    """Canonical name of a special token (its content when no alias is known)."""
    return SPECIAL_ALIASES.get(content, content)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table used by every byte-level BPE (all 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _family(spec: dict) -> str:
    """``byte_level``, ``sentencepiece``, ``wordpiece`` or ``plain`` from the decoder/pre-tokenizer."""
    def types(node) -> list[str]:
        if not node:
            return []
        out = [node.get("type", "")]
        for key in ("decoders", "pretokenizers"):
            for child in node.get(key) or []:
                out += types(child)
        return out

    kinds = types(spec.get("decoder")) + types(spec.get("pre_tokenizer"))
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or spec.get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    if "WordPiece" in kinds or spec.get("model", {}).get("type") == "WordPiece":
        return "wordpiece"
    if any(k == "Replace" for k in kinds):  # SentencePiece decoders written as Replace(▁, ' ')
        return "sentencepiece"
    return "plain"


@dataclass
class CanonicalVocab:
    """Per-id canonical form of one tokenizer.

    ``text[i]`` is the byte string of a normal token (``None`` for special tokens and gaps),
    ``special[i]`` the canonical special name (``None`` otherwise).  Ids in gaps of the id space
    (and any padded ids a model adds) have neither.
    """

    size: int
    family: str
    text: list[bytes | None]
    special: list[str | None]
    raw: list[str | None]  # the token as stored in the vocabulary (for display)

    def display(self, i: int) -> str:
        """A human-readable form of token ``i`` (its decoded text; partial UTF-8 as \\x escapes)."""
        if i < 0 or i >= self.size:
            return f"<id {i}: beyond the tokenizer>"
        if self.special[i] is not None:
            return self.raw[i] or self.special[i]
        t = self.text[i]
        if t is None:
            return f"<id {i}: no token>"
        return t.decode("utf-8", errors="backslashreplace")

    def lookup(self, text: str) -> list[int]:
        """Ids whose decoded text (or special-token content) equals ``text``."""
        want = text.encode("utf-8")
        return [
            i
            for i in range(self.size)
            if self.text[i] == want or (self.special[i] is not None and self.raw[i] == text)
        ]

    def is_special_mask(self) -> np.ndarray:
        return np.array([s is not None for s in self.special], dtype=bool)


def _decode_token(tok: str, family: str, u2b: dict[str, int]) -> bytes:
    if family == "byte_level":
        try:
            return bytes(u2b[c] for c in tok)
        except KeyError:  # a character outside the byte alphabet: take it as text
            return b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in tok)
    if family == "sentencepiece":
        m = _BYTE_FALLBACK.match(tok)
        if m:
            return bytes([int(m.group(1), 16)])
        return tok.replace("\u2581", " ").encode("utf-8")
    if family == "wordpiece":
        return (tok[2:] if tok.startswith("##") else tok).encode("utf-8")
    return tok.encode("utf-8")


def canonical_vocab(info: TokenizerInfo) -> CanonicalVocab:
    """Decode every id of ``info`` to its canonical form (cached on the ``TokenizerInfo``)."""
    cached = getattr(info, "_canonical", None)
    if cached is not None:
        return cached
    spec = info.spec
    family = _family(spec)
    size = info.vocab_size
    text: list[bytes | None] = [None] * size
    special: list[str | None] = [None] * size
    raw: list[str | None] = [None] * size
    u2b = _unicode_to_bytes()
    added = {t["id"]: t for t in info.added_tokens}
    if family == "byte_level":  # fast path: translate the alphabet to latin-1, then encode
        table = {ord(c): b for c, b in u2b.items()}
        for tok, i in info.vocab.items():
            raw[i] = tok
            if i not in added:
                try:
                    text[i] = tok.translate(table).encode("latin-1")
                except UnicodeEncodeError:
                    text[i] = _decode_token(tok, family, u2b)
    else:
        for tok, i in info.vocab.items():
            raw[i] = tok
            if i not in added:
                text[i] = _decode_token(tok, family, u2b)
    for i, t in added.items():
        raw[i] = t["content"]
        if t.get("special"):
            special[i] = canonical_special(t["content"])
            text[i] = None
        else:  # an added normal token stands for its literal content
            text[i] = t["content"].encode("utf-8")
    cv = CanonicalVocab(size=size, family=family, text=text, special=special, raw=raw)
    info._canonical = cv  # type: ignore[attr-defined]
    return cv
