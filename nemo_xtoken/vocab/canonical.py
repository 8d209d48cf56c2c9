"""Canonical token strings: every id of a tokenizer decoded to the bytes it stands for.

Two tokenizers can only be compared on what their tokens *mean*: the byte-level BPE alphabet
(``Ġ`` = space, ``Ċ`` = newline, …), SentencePiece's ``▁`` and ``<0xHH>`` byte fallback and
WordPiece's ``##`` are undone, so that equal text gives equal keys across families.  Tokens
that are partial UTF-8 sequences stay bytes (never U+FFFD).  Added tokens that stand for text
are decoded like model tokens (Gemma's whitespace runs ``▁▁``, ``▁▁▁`` … are spaces, not the
character ``▁``), as the tokenizer's own decoder does.  Special tokens live in their own
namespace, with the usual BOS/EOS/PAD/UNK/turn names of every family mapped to one canonical
name so that, e.g., Llama-3's ``<|end_of_text|>`` matches Qwen3's ``<|endoftext|>`` and
DeepSeek-V3's ``<｜end▁of▁sentence｜>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from nemo_xtoken.vocab.tokenizer_io import TokenizerInfo

__all__ = ["CanonicalVocab", "DummyPrefix", "canonical_vocab", "dummy_prefix", "bytes_to_unicode", "canonical_special", "SPECIAL_ALIASES"]

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
    "<|im_start|>": "<sot>",
    "<|start|>": "<sot>",
    "<start_of_turn>": "<sot>",
    # DeepSeek-V3: fullwidth bars and ▁ inside the names
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>": "<bos>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>": "<eos>",
    "<\uff5c\u2581pad\u2581\uff5c>": "<pad>",
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
    (and any padded ids a model adds) have neither.  ``byte_fallback[i]``: a SentencePiece
    ``<0xHH>`` token (one byte); ``added[i]``: the id is one of the tokenizer's added tokens.
    """

    size: int
    family: str
    text: list[bytes | None]
    special: list[str | None]
    raw: list[str | None]  # the token as stored in the vocabulary (for display)
    byte_fallback: np.ndarray | None = None  # bool [size]
    added: np.ndarray | None = None  # bool [size]

    def __post_init__(self) -> None:
        if self.byte_fallback is None:
            self.byte_fallback = np.zeros(self.size, dtype=bool)
        if self.added is None:
            self.added = np.zeros(self.size, dtype=bool)

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
    """Decode every id of ``info`` to its canonical form (cached on the ``TokenizerInfo``).

    Added tokens: a special one gets its canonical special name; a normal one stands for text.
    In a byte-level tokenizer that text is its literal content (added tokens bypass the byte
    alphabet); in a SentencePiece one it is decoded like a model token, as the tokenizer's
    decoder does (``▁`` is a space, ``<0xHH>`` a byte), so Gemma's ``▁▁`` is two spaces.
    """
    cached = getattr(info, "_canonical", None)
    if cached is not None:
        return cached
    spec = info.spec
    family = _family(spec)
    size = info.vocab_size
    text: list[bytes | None] = [None] * size
    special: list[str | None] = [None] * size
    raw: list[str | None] = [None] * size
    byte_fallback = np.zeros(size, dtype=bool)
    added_mask = np.zeros(size, dtype=bool)
    u2b = _unicode_to_bytes()
    added = {t["id"]: t for t in info.added_tokens}
    if family == "byte_level":  # fast path: translate the alphabet to latin-1, then encode
        table = {ord(c): b for c, b in u2b.items()}
        for tok, i in info.vocab.items():
            raw[i] = tok
            try:
                text[i] = tok.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                text[i] = _decode_token(tok, family, u2b)
    elif family == "sentencepiece":  # fast path: ▁ → space; <0xHH> → its byte
        for tok, i in info.vocab.items():
            raw[i] = tok
            if tok.startswith("<0x") and _BYTE_FALLBACK.match(tok):
                text[i] = bytes([int(tok[3:5], 16)])
                byte_fallback[i] = True
            else:
                text[i] = tok.replace("\u2581", " ").encode("utf-8")
    else:
        for tok, i in info.vocab.items():
            raw[i] = tok
            text[i] = _decode_token(tok, family, u2b)
    for i, t in added.items():
        raw[i] = t["content"]
        added_mask[i] = True
        if t.get("special"):
            special[i] = canonical_special(t["content"])
            text[i] = None
            byte_fallback[i] = False
        elif family == "byte_level":  # literal content: added tokens bypass the byte alphabet
            text[i] = t["content"].encode("utf-8")
        else:  # decoded like a model token (Gemma's whitespace runs ▁▁ … are spaces)
            text[i] = _decode_token(t["content"], family, u2b)
            byte_fallback[i] = family == "sentencepiece" and bool(_BYTE_FALLBACK.match(t["content"]))
    cv = CanonicalVocab(size=size, family=family, text=text, special=special, raw=raw,
                        byte_fallback=byte_fallback, added=added_mask)
    info._canonical = cv  # type: ignore[attr-defined]
    return cv


@dataclass(frozen=True)
class DummyPrefix:
    """Where a tokenizer inserts a space that is not in the text (SentencePiece's dummy prefix).

    Found by what the tokenizer does, never by its family's name: probe texts are encoded and
    their tokens' bytes compared with the text.  ``at_start``: before the text's first segment;
    ``before_space``: even when that segment already starts with a space (a ``Prepend("▁")``
    normalizer; a ``Metaspace``/``ByteLevel(add_prefix_space)`` pre-tokenizer adds none there);
    ``after_added``: also before every segment that follows an added token in the text (the
    legacy Llama-2/Mistral behaviour; Metaspace's ``prepend_scheme="first"`` does not).
    """

    at_start: bool = False
    before_space: bool = False
    after_added: bool = False

    @property
    def any(self) -> bool:
        return self.at_start or self.after_added


def _spelled(info: TokenizerInfo, cv: CanonicalVocab, text: str) -> tuple[list[int], list[bytes]]:
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    return ids, [cv.text[i] or b"" if i < cv.size else b"" for i in ids]


def dummy_prefix(info: TokenizerInfo) -> DummyPrefix:
    """Probe ``info`` for a dummy prefix (cached on the ``TokenizerInfo``)."""
    cached = getattr(info, "_dummy_prefix", None)
    if cached is not None:
        return cached
    cv = canonical_vocab(info)
    _, parts = _spelled(info, cv, "x")
    at_start = b"".join(parts) == b" x"
    before_space = False
    if at_start:
        _, parts = _spelled(info, cv, " x")
        before_space = b"".join(parts) == b"  x"
    after_added = False
    # an added token the tokenizer extracts from text (special first): is the segment after it prefixed?
    candidates = sorted(info.added_tokens, key=lambda t: (not t.get("special"), t["id"]))
    for t in candidates:
        content = t["content"]
        if not content or any(ch.isspace() or ch in "x\u2581" for ch in content):
            continue
        ids, parts = _spelled(info, cv, "x" + content + "x")
        if t["id"] in ids:
            k = ids.index(t["id"])
            after_added = b"".join(parts[k + 1:]) == b" x"
            break
    dp = DummyPrefix(at_start=at_start, before_space=before_space, after_added=after_added)
    info._dummy_prefix = dp  # type: ignore[attr-defined]
    return dp
