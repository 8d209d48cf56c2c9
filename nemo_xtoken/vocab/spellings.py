"""Spellings: every token of one vocabulary written in the other's tokens, kept whole (partition-KL).

For a student token ``s`` its *spelling* is the teacher's tokenization of ``s``'s text (an exact
match is a spelling of length 1), and likewise for every teacher token in the student's
vocabulary.  This is the re-tokenization the W builder computes (:mod:`nemo_xtoken.vocab.projection`),
kept as whole sequences instead of ``β·γ^i`` weights and with no length cap.  ``partition_kl``
(:mod:`nemo_xtoken.losses.partition`) reads it: a token's first piece says which bucket of the
other side's first position it falls in, its further pieces which bucket at the later positions.

A token that cannot be spelled (a special token the other side lacks, bytes the other model cannot
produce) has an empty spelling: its probability falls in no bucket and is counted, never dropped
silently (:attr:`Spellings.unspelled`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nemo_xtoken.errors import XTokenError

__all__ = ["Spellings", "build_spellings", "cached_spellings", "SPELLINGS_VERSION"]

SPELLINGS_VERSION = 1


def _ragged(rows: Sequence[Sequence[int] | None]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((0 if r is None else len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    ids = np.fromiter((i for r in rows if r for i in r), dtype=np.int64, count=int(indptr[-1]))
    return indptr, ids


@dataclass
class Spellings:
    """Both directions: ``s_in_t`` (student tokens in teacher ids) and ``t_in_s`` (teacher tokens in student ids), ragged CSR."""

    s_indptr: np.ndarray  # int64 [V_S + 1]
    s_ids: np.ndarray  # int64: teacher ids
    t_indptr: np.ndarray  # int64 [V_T + 1]
    t_ids: np.ndarray  # int64: student ids
    student_vocab_size: int
    teacher_vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def from_lists(s_in_t: Sequence[Sequence[int] | None], t_in_s: Sequence[Sequence[int] | None]) -> "Spellings":
        """From per-token lists (``None`` or ``[]``: cannot be spelled); checks every id's range."""
        sp, si = _ragged(s_in_t)
        tp, ti = _ragged(t_in_s)
        out = Spellings(sp, si, tp, ti, len(s_in_t), len(t_in_s))
        out.validate()
        return out

    def validate(self, where: str = "spellings") -> None:
        for name, indptr, ids, n, other in (
            ("student", self.s_indptr, self.s_ids, self.student_vocab_size, self.teacher_vocab_size),
            ("teacher", self.t_indptr, self.t_ids, self.teacher_vocab_size, self.student_vocab_size),
        ):
            if indptr.shape != (n + 1,) or int(indptr[-1]) != ids.shape[0] or bool((np.diff(indptr) < 0).any()):
                raise XTokenError(f"{where}: the {name} spellings' indptr {indptr.shape} does not fit {n} tokens / {ids.shape[0]} ids")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= other):
                raise XTokenError(f"{where}: a {name} token is spelled with ids outside [0, {other}): built for other tokenizers?")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.student_vocab_size, self.teacher_vocab_size)

    def side(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, ids)`` of ``"student"`` tokens (in teacher ids) or ``"teacher"`` tokens (in student ids)."""
        return (self.s_indptr, self.s_ids) if which == "student" else (self.t_indptr, self.t_ids)

    def spelling(self, which: str, token: int) -> tuple[int, ...]:
        indptr, ids = self.side(which)
        return tuple(int(x) for x in ids[indptr[token] : indptr[token + 1]])

    def unspelled(self, which: str) -> int:
        indptr, _ = self.side(which)
        return int((np.diff(indptr) == 0).sum())

    def first_pieces(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, first piece)`` of every spelled token of ``which`` side (int64 arrays)."""
        indptr, ids = self.side(which)
        lens = np.diff(indptr)
        tok = np.flatnonzero(lens > 0).astype(np.int64)
        return tok, ids[indptr[tok]].astype(np.int64)

    def first_piece_csr(self, which: str):
        """The 0/1 first-piece map as a :class:`~nemo_xtoken.vocab.projection.Projection`-like CSR (rows: ``which``'s tokens)."""
        key = ("first_csr", which)
        if key not in self._cache:
            tok, first = self.first_pieces(which)
            n = self.student_vocab_size if which == "student" else self.teacher_vocab_size
            m = self.teacher_vocab_size if which == "student" else self.student_vocab_size
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(tok, minlength=n), out=indptr[1:])
            self._cache[key] = _FirstPieceCSR(indptr, first.astype(np.int32), np.ones(first.size, dtype=np.float32), (n, m))
        return self._cache[key]

    def level1(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The coarsest partition both first positions can measure: ``(rep_s, rep_t, n_s, n_t)``.

        Student token ``v`` and teacher token ``t`` share a bucket when one's string starts with
        the other's, as their spellings say (``v``'s first piece is ``t``, or ``t``'s first piece
        is ``v``); buckets are the connected components of those links, each named by its lowest
        teacher id: ``rep_s [V_S]`` (``-1`` for a student token linked to no teacher token: its
        mass falls in no bucket), ``rep_t [V_T]``; ``n_s``/``n_t`` ``[V_T]``: how many student / teacher tokens
        each bucket holds (0 where the id names no bucket).
        """
        if "level1" in self._cache:
            return self._cache["level1"]
        v_s, v_t = self.shape
        parent = np.arange(v_s + v_t, dtype=np.int64)

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        s_tok, s_first = self.first_pieces("student")
        t_tok, t_first = self.first_pieces("teacher")
        for a, b in zip(s_tok.tolist(), (s_first + v_s).tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        for a, b in zip((t_tok + v_s).tolist(), t_first.tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.fromiter((find(i) for i in range(v_s + v_t)), dtype=np.int64, count=v_s + v_t)
        # name every component by its lowest teacher id
        name = np.full(v_s + v_t, -1, dtype=np.int64)
        t_roots = roots[v_s:]
        order = np.argsort(t_roots, kind="stable")  # teacher ids ascending within each root
        first = np.ones(order.size, dtype=bool)
        first[1:] = t_roots[order][1:] != t_roots[order][:-1]
        name[t_roots[order][first]] = order[first]
        rep_t = name[t_roots]
        rep_s = name[roots[:v_s]]
        n_s = np.bincount(rep_s[rep_s >= 0], minlength=v_t).astype(np.int64)
        n_t = np.bincount(rep_t, minlength=v_t).astype(np.int64)
        self._cache["level1"] = (rep_s, rep_t, n_s, n_t)
        return self._cache["level1"]

    def summary(self) -> dict[str, int]:
        """The partition's size (``xtoken distill --check``): level-1 buckets, how many merge several tokens, what falls nowhere."""
        rep_s, rep_t, n_s, n_t = self.level1()
        lens = np.diff(self.s_indptr)
        return {
            "level1_buckets": int((n_t > 0).sum()),
            "buckets_with_several_teacher_tokens": int((n_t > 1).sum()),
            "buckets_with_several_student_tokens": int((n_s > 1).sum()),
            "student_tokens_in_no_bucket": int((rep_s < 0).sum()),
            "student_tokens_spelled_by_several_teacher_tokens": int((lens > 1).sum()),
            "longest_student_spelling": int(lens.max()) if lens.size else 0,
        }

    def level1_csr(self, which: str) -> "_FirstPieceCSR":
        """0/1 map of ``which``'s tokens onto their level-1 bucket (named by a teacher id), as a CSR."""
        key = ("level1_csr", which)
        if key not in self._cache:
            rep_s, rep_t, _, _ = self.level1()
            rep = rep_s if which == "student" else rep_t
            tok = np.flatnonzero(rep >= 0).astype(np.int64)
            indptr = np.zeros(rep.size + 1, dtype=np.int64)
            np.cumsum(np.bincount(tok, minlength=rep.size), out=indptr[1:])
            self._cache[key] = _FirstPieceCSR(indptr, rep[tok].astype(np.int32), np.ones(tok.size, dtype=np.float32),
                                              (rep.size, self.teacher_vocab_size))
        return self._cache[key]

    def extensions(self, which: str) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
        """For every non-empty prefix ``P`` of a ``which``-token's spelling: ``(tokens, next piece or -1)``.

        ``next piece = -1``: the token's spelling is ``P`` itself (it ends there: the rest bucket
        of the next level).  Built once per side and cached (about a second for 150k tokens).
        """
        key = ("ext", which)
        if key in self._cache:
            return self._cache[key]
        indptr, ids = self.side(which)
        acc: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        il = ids.tolist()
        ip = indptr.tolist()
        for v in range(len(ip) - 1):
            a, b = ip[v], ip[v + 1]
            for r in range(a + 1, b + 1):
                p = tuple(il[a:r])
                e = acc.get(p)
                if e is None:
                    e = acc[p] = ([], [])
                e[0].append(v)
                e[1].append(il[r] if r < b else -1)
        out = {p: (np.asarray(t, dtype=np.int64), np.asarray(n, dtype=np.int64)) for p, (t, n) in acc.items()}
        self._cache[key] = out
        return out

    # ---- storage (numpy .npz, no pickle) ------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, s_indptr=self.s_indptr, s_ids=self.s_ids, t_indptr=self.t_indptr, t_ids=self.t_ids,
                 meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "Spellings":
        try:
            with np.load(path, allow_pickle=False) as z:
                sp = Spellings(z["s_indptr"], z["s_ids"], z["t_indptr"], z["t_ids"], int(z["s_indptr"].shape[0] - 1),
                               int(z["t_indptr"].shape[0] - 1), json.loads(bytes(z["meta"]).decode() or "{}"))
        except Exception as e:  # noqa: BLE001
            raise XTokenError(f"{path}: not a spellings file ({type(e).__name__}: {e}); delete it to rebuild") from e
        sp.validate(str(path))
        return sp


@dataclass
class _FirstPieceCSR:
    """A CSR with ``indptr``/``indices``/``data``/``shape`` (what :func:`~nemo_xtoken.parallel.plan.projection_csr` reads)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]


def _spell_all(src_cv, dst_info, dst_cv, progress: bool) -> list[list[int] | None]:
    from nemo_xtoken.vocab.projection import _retokenize, _teacher_key_index

    text_to_id, special_to_id = _teacher_key_index(dst_cv)
    out: list[list[int] | None] = [None] * src_cv.size
    pending: list[int] = []
    for i in range(src_cv.size):
        t = src_cv.text[i]
        if t is not None:
            hit = text_to_id.get(t)
            if hit is not None:
                out[i] = [hit]
            elif t:
                pending.append(i)
        elif src_cv.special[i] is not None:
            hit = special_to_id.get(src_cv.special[i])
            if hit is not None:
                out[i] = [hit]
    retok = _retokenize([src_cv.text[i] for i in pending], dst_info, dst_cv, progress)
    for i, ids in zip(pending, retok):
        out[i] = ids
    return out


def build_spellings(student_tokenizer: Any, teacher_tokenizer: Any, *, progress: bool = False) -> Spellings:
    """Spell every student token in teacher tokens and every teacher token in student tokens."""
    from nemo_xtoken.vocab.canonical import canonical_vocab
    from nemo_xtoken.vocab.tokenizer_io import load_tokenizer

    student = load_tokenizer(student_tokenizer)
    teacher = load_tokenizer(teacher_tokenizer)
    scv, tcv = canonical_vocab(student), canonical_vocab(teacher)
    sp = Spellings.from_lists(_spell_all(scv, teacher, tcv, progress), _spell_all(tcv, student, scv, progress))
    sp.meta = {"student": student.fingerprint, "teacher": teacher.fingerprint, "version": SPELLINGS_VERSION,
               "unspelled_student": sp.unspelled("student"), "unspelled_teacher": sp.unspelled("teacher")}
    return sp


def cached_spellings(student_tokenizer: Any, teacher_tokenizer: Any, *, cache_dir: str | os.PathLike[str] | None = None) -> Spellings:
    """:func:`build_spellings` cached by the two tokenizers' fingerprints under ``<cache>/spellings/``."""
    from nemo_xtoken.assets import cache_dir as default_cache_dir
    from nemo_xtoken.vocab.tokenizer_io import load_tokenizer

    student = load_tokenizer(student_tokenizer)
    teacher = load_tokenizer(teacher_tokenizer)
    key = json.dumps({"s": student.fingerprint, "t": teacher.fingerprint, "v": SPELLINGS_VERSION}, sort_keys=True)
    path = Path(cache_dir or default_cache_dir()) / "spellings" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            return Spellings.load(path)
        except XTokenError:
            pass
    sp = build_spellings(student, teacher)
    sp.save(path)
    return sp
