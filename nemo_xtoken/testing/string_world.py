"""A tiny string world for partition-KL's properties: one distribution over strings, two tokenizers.

Both "models" are derived from the same string distribution ``D`` (strings of a fixed length over
a small alphabet, then ``$``): each side's next-token distribution after its observed tokens is
``P_D(next token = v | the tokens so far)`` under its own tokenizer.  So the two sides have equal
string distributions by construction — the situation where a loss over strings must be exactly
zero.  The tokenizers cut the text at fixed offsets (``pattern``: the token lengths from the
start, e.g. ``(2, 2)`` pairs, ``(1, 2, 1)``), as a pre-tokenizer that splits digits in groups
does: then a token boundary says nothing about the text after it, and "the tokens so far" is the
event "the text starts with these characters" on both sides.  (With a content-dependent cut, a
token boundary leaks information about the next characters — the tokenization bias of
Phan et al., 2024 — and two models of one string distribution differ at the next position.)
Used by the tests only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from nemo_xtoken.align.merge import AlignedPositions, positions_from_token_chunks
from nemo_xtoken.vocab.spellings import Spellings

BOS = "<s>"
EXTRA = "<x>"  # a student-only special token: a one-sided chunk


def greedy(text: str, vocab: list[str]) -> list[int] | None:
    """Longest-match tokenization (ids into ``vocab``); ``None`` if the vocabulary cannot spell it."""
    out, i = [], 0
    by = {t: k for k, t in enumerate(vocab)}
    while i < len(text):
        for j in range(len(text), i, -1):
            k = by.get(text[i:j])
            if k is not None:
                out.append(k)
                i = j
                break
        else:
            return None
    return out


@dataclass
class World:
    alphabet: str
    length: int
    student_vocab: list[str]
    teacher_vocab: list[str]
    probs: dict[str, float]

    student_pattern: tuple[int, ...] = ()
    teacher_pattern: tuple[int, ...] = ()

    @staticmethod
    def random(student_pattern: tuple[int, ...], teacher_pattern: tuple[int, ...], *, alphabet: str = "abc", seed: int = 0,
               sharp: float = 1.0, teacher_order_seed: int | None = 3) -> "World":
        """Strings of ``sum(pattern)`` characters then ``$``, random probabilities; vocabularies: every string of each pattern length."""
        length = sum(student_pattern)
        if sum(teacher_pattern) != length:
            raise ValueError("both patterns must cover the same length")
        g = np.random.default_rng(seed)
        strings = ["".join(p) + "$" for p in itertools.product(alphabet, repeat=length)]
        w = np.exp(sharp * g.standard_normal(len(strings)))
        w /= w.sum()

        def vocab(pattern: tuple[int, ...]) -> list[str]:
            return [x for n in sorted(set(pattern)) for x in ("".join(p) for p in itertools.product(alphabet, repeat=n))] + ["$"]

        tv = vocab(teacher_pattern)
        if teacher_order_seed is not None:  # other ids than the student's for the same strings
            tv = [tv[i] for i in np.random.default_rng(teacher_order_seed).permutation(len(tv))]
        return World(alphabet, length, [BOS, EXTRA] + vocab(student_pattern), [BOS] + tv, dict(zip(strings, w.tolist())),
                     tuple(student_pattern), tuple(teacher_pattern))

    def tokens(self, text: str, side: str) -> list[int]:
        vocab = self.student_vocab if side == "student" else self.teacher_vocab
        pattern = self.student_pattern if side == "student" else self.teacher_pattern
        by = {t: k for k, t in enumerate(vocab)}
        out, i = [], 0
        for n in pattern:
            out.append(by[text[i : i + n]])
            i += n
        return out + ([by[text[i:]]] if text[i:] else [])

    def next_logits(self, side: str, prefix_tokens: list[int]) -> np.ndarray:
        """log P(next token | the side's first tokens of the text are ``prefix_tokens``), -690 for impossible."""
        vocab = self.student_vocab if side == "student" else self.teacher_vocab
        p = np.zeros(len(vocab))
        n = len(prefix_tokens)
        for w, pw in self.probs.items():
            tk = self.tokens(w, side)
            if tk[:n] == prefix_tokens and len(tk) > n:
                p[tk[n]] += pw
        p = p / p.sum() if p.sum() > 0 else np.full(len(vocab), 1.0 / len(vocab))  # the text's last position
        return np.log(np.maximum(p, 1e-300))

    def spellings(self) -> Spellings:
        s_in_t = [[0] if t == BOS else None if t == EXTRA else greedy(t, self.teacher_vocab) for t in self.student_vocab]
        t_in_s = [[0] if t == BOS else greedy(t, self.student_vocab) for t in self.teacher_vocab]
        return Spellings.from_lists(s_in_t, t_in_s)

    def batch(self, text: str, *, extra: bool = True, g: np.random.Generator | None = None):
        """Logits of both sides along ``text`` (``[N, V]`` float64) and the alignment of its chunks."""
        g = g or np.random.default_rng(1)
        s_tok, t_tok = self.tokens(text, "student"), self.tokens(text, "teacher")
        s_ends = np.cumsum([len(self.student_vocab[k]) for k in s_tok]).tolist()
        t_ends = np.cumsum([len(self.teacher_vocab[k]) for k in t_tok]).tolist()
        common = sorted(set(s_ends) & set(t_ends))

        def chunk_of(ends: list[int]) -> list[int]:
            return [common.index(min(c for c in common if c >= e)) for e in ends]

        off = 2 if extra else 1
        s_ids = [0] + ([1] if extra else []) + s_tok
        t_ids = [0] + t_tok
        s_chunks = [0] + ([1] if extra else []) + [c + off for c in chunk_of(s_ends)]
        t_chunks = [0] + [c + off for c in chunk_of(t_ends)]
        s_rows, t_rows = [], []
        for p in range(len(s_ids)):
            if extra and p == 0:
                s_rows.append(g.standard_normal(len(self.student_vocab)) * 3)  # predicts the one-sided token: ignored
            else:
                s_rows.append(self.next_logits("student", s_tok[: p - (off - 1)] if p >= off - 1 else []))
        for p in range(len(t_ids)):
            t_rows.append(self.next_logits("teacher", t_tok[:p]))
        al = positions_from_token_chunks(torch.tensor(s_chunks), torch.tensor(t_chunks), torch.tensor(s_ids), torch.tensor(t_ids),
                                         len(common) + off)
        return torch.tensor(np.array(s_rows)), torch.tensor(np.array(t_rows)), al, (s_tok, t_tok, common)


def concat(parts: list[tuple[torch.Tensor, torch.Tensor, AlignedPositions]]):
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), AlignedPositions.concat([p[2] for p in parts]))
