"""Coverage audit: which categories of student tokens the teacher matches exactly under W.

The common set is C = {(s, argmax_t W[s, t])}.  Per category (digits, 2- and 3-digit numerals,
punctuation, …; a SentencePiece ``▁201`` is the numeral `` 201``, a ``<0xHH>`` byte-fallback token
is a category of its own, never a digit or punctuation) the audit counts student tokens whose top-1 mapping is an exact match
(``exact``), that have any mapping (``mapped``, the relaxed C of H-KL) or none (``empty``).
The paper's rule: a critical category (numerals by default) outside the exact set → P-KL,
inside → H-KL (Table 8: Llama-3 vs Qwen3 0/100 two-digit numerals → P-KL; vs Phi-4-mini
100/100 → H-KL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.vocab.canonical import canonical_vocab
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_NO_TOKEN, Projection
from nemo_xtoken.vocab.tokenizer_io import load_tokenizer

__all__ = ["AuditReport", "audit", "CATEGORIES", "DEFAULT_CRITICAL", "categorize"]

_PUNCT = re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
# Ordered: a token belongs to the first category whose pattern matches its text (bytes).
CATEGORIES: list[tuple[str, re.Pattern[bytes] | None]] = [
    ("special_tokens", None),
    ("byte_fallback", None),  # SentencePiece <0xHH>: one byte of a character the vocabulary lacks
    ("single_digits", re.compile(rb"[0-9]")),
    ("single_digits_space", re.compile(rb" [0-9]")),
    ("two_digit_numerals", re.compile(rb"[0-9]{2}")),
    ("two_digit_numerals_space", re.compile(rb" [0-9]{2}")),
    ("three_digit_numerals", re.compile(rb"[0-9]{3}")),
    ("three_digit_numerals_space", re.compile(rb" [0-9]{3}")),
    ("longer_numerals", re.compile(rb" ?[0-9]{4,}")),
    ("ascii_punctuation", re.compile(rb" ?[" + _PUNCT.encode() + rb"]+")),
    ("whitespace", re.compile(rb"[ \t\n\r\x0b\x0c]+")),
    ("alphabetic_words", re.compile(rb" ?[A-Za-z]+")),
    ("non_ascii", re.compile(rb".*[\x80-\xff].*", re.S)),
    ("other", re.compile(rb".*", re.S)),
]
DEFAULT_CRITICAL: tuple[str, ...] = ("single_digits", "two_digit_numerals", "three_digit_numerals")


def categorize(text: bytes | None, is_special: bool, is_byte_fallback: bool = False) -> str | None:
    """Category name of a token (``None`` for ids that stand for no token)."""
    if is_special:
        return "special_tokens"
    if text is None:
        return None
    if is_byte_fallback:
        return "byte_fallback"
    for name, pat in CATEGORIES[2:]:
        if pat is not None and pat.fullmatch(text):
            return name
    return "other"


@dataclass
class AuditReport:
    """Per-category coverage counts and the recommended loss."""

    categories: dict[str, dict[str, int]]
    empty_rows: int
    recommended_loss: str
    critical: list[str]
    min_exact_fraction: float
    reason: str
    rows: dict[str, int] = field(default_factory=dict)
    empty_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": self.categories,
            "empty_rows": self.empty_rows,
            "recommended_loss": self.recommended_loss,
            "critical_categories": self.critical,
            "min_exact_fraction": self.min_exact_fraction,
            "reason": self.reason,
            "rows": self.rows,
            "empty_examples": self.empty_examples,
        }

    def format_table(self, title: str = "") -> str:
        """A plain-text table: category, total, exact, mapped, empty (critical ones starred)."""
        lines = [title] if title else []
        lines.append(f"{'category':30s} {'total':>7s} {'exact':>7s} {'mapped':>7s} {'empty':>7s}")
        for name, c in self.categories.items():
            star = "*" if name in self.critical else " "
            lines.append(f"{star}{name:29s} {c['total']:7d} {c['exact']:7d} {c['mapped']:7d} {c['empty']:7d}")
        lines.append(f"empty rows (no teacher mapping): {self.empty_rows}")
        if self.empty_examples:
            lines.append("  e.g. " + ", ".join(self.empty_examples))
        lines.append(f"recommended loss: {self.recommended_loss}  ({self.reason})")
        if self.recommended_loss == "p_kl":  # where P-KL's W is a heuristic for the split tokens: the string-level alternative
            lines.append("alternative: partition_kl  (no W weights: compares string probabilities along the text, so a "
                         "split critical token such as `143` keeps its own target; docs/losses.md, Partition-KL)")
        return "\n".join(lines)


def audit(
    projection: Projection,
    student_tokenizer: Any,
    teacher_tokenizer: Any = None,
    *,
    critical: Sequence[str] = DEFAULT_CRITICAL,
    min_exact_fraction: float = 1.0,
) -> AuditReport:
    """Coverage of each student-token category under W and the loss the paper's rule recommends.

    A critical category is *inside* C when at least ``min_exact_fraction`` of its tokens map
    exactly; any critical category (with tokens) outside C → ``"p_kl"``, else ``"h_kl"``.
    """
    names = [n for n, _ in CATEGORIES]
    unknown = [c for c in critical if c not in names]
    if unknown:
        raise XTokenError(f"unknown critical categories {unknown}: choose from {names}")
    student = load_tokenizer(student_tokenizer)
    teacher = load_tokenizer(teacher_tokenizer) if teacher_tokenizer is not None else None
    projection.check_tokenizers(student, teacher)
    scv = canonical_vocab(student)
    if scv.size != projection.student_vocab_size:
        raise XTokenError(
            f"W has {projection.student_vocab_size} student rows but {student.source} has {scv.size} ids: "
            "rebuild W for this tokenizer"
        )
    cats = {n: {"total": 0, "exact": 0, "mapped": 0, "empty": 0} for n in names}
    kinds = projection.row_kind
    nonempty = projection.indptr[1:] > projection.indptr[:-1]
    empty_examples: list[str] = []
    for s in range(scv.size):
        if kinds[s] == ROW_NO_TOKEN:
            continue
        cat = categorize(scv.text[s], scv.special[s] is not None, bool(scv.byte_fallback[s]))
        if cat is None:
            continue
        c = cats[cat]
        c["total"] += 1
        c["exact"] += int(kinds[s] == ROW_EXACT)
        c["mapped"] += int(nonempty[s])
        if kinds[s] == ROW_EMPTY:
            c["empty"] += 1
            if len(empty_examples) < 8 and cat != "special_tokens":
                empty_examples.append(repr(scv.display(s)))
    outside = [
        f"{n} {cats[n]['exact']}/{cats[n]['total']}"
        for n in critical
        if cats[n]["total"] and cats[n]["exact"] / cats[n]["total"] < min_exact_fraction
    ]
    if outside:
        rec, reason = "p_kl", "critical categories outside the exact common set: " + ", ".join(outside)
    else:
        inside = ", ".join(f"{n} {cats[n]['exact']}/{cats[n]['total']}" for n in critical if cats[n]["total"])
        rec, reason = "h_kl", "critical categories inside the exact common set" + (f": {inside}" if inside else "")
    return AuditReport(
        categories=cats,
        empty_rows=int(np.count_nonzero(kinds == ROW_EMPTY)),
        recommended_loss=rec,
        critical=list(critical),
        min_exact_fraction=float(min_exact_fraction),
        reason=reason,
        rows=projection.counts(),
        empty_examples=empty_examples,
    )
