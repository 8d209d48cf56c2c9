"""Vocabulary reduction for CPU-sized demo models, identical for every method.

A tiny model with a 128k-row embedding spends its CPU time on the output layer; the demo keeps
only the ids its corpus uses.  The student keeps the ids its tokenization of the corpus produces
(plus the BOS/EOS it needs); the teacher keeps the ids of its own tokenization **and every teacher
id that a kept student row of W points to**, so no row of the reduced W loses mass and P-KL/H-KL
see exactly the real W restricted to these rows.  Segmentation is the real tokenizers' throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemo_xtoken.vocab.projection import Projection

__all__ = ["VocabSubset", "reduce_projection", "reduce_spellings"]


@dataclass
class VocabSubset:
    """Kept ids of one tokenizer, in increasing order; ``new = index of old id``."""

    kept: np.ndarray  # int64 [n], sorted original ids

    @staticmethod
    def from_ids(*id_lists) -> "VocabSubset":
        ids = np.unique(np.concatenate([np.asarray(list(x), dtype=np.int64).ravel() for x in id_lists]))
        return VocabSubset(ids)

    @property
    def size(self) -> int:
        return int(self.kept.shape[0])

    def to_new(self, ids) -> np.ndarray:
        """Map original ids to compact ids; an id outside the subset is an error (names it)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.kept, ids)
        ok = (pos < self.size) & (self.kept[np.minimum(pos, self.size - 1)] == ids)
        if not ok.all():
            bad = ids[~ok][:5].tolist()
            raise ValueError(f"ids {bad} are not in the reduced vocabulary ({self.size} ids): rebuild the subset from this corpus")
        return pos

    def to_old(self, ids) -> np.ndarray:
        return self.kept[np.asarray(ids, dtype=np.int64)]


def reduce_projection(proj: Projection, student: VocabSubset, teacher_ids) -> tuple[Projection, VocabSubset]:
    """W restricted to the kept student rows; the teacher subset grows to every column they use.

    Returns the reduced W (shape ``[student.size, teacher_subset.size]``) and the teacher subset.
    """
    rows = student.kept
    cols_used = np.concatenate([proj.indices[proj.indptr[s] : proj.indptr[s + 1]] for s in rows] or [np.zeros(0, np.int32)])
    tsub = VocabSubset.from_ids(np.asarray(teacher_ids, dtype=np.int64), cols_used.astype(np.int64))
    lengths = proj.indptr[rows + 1] - proj.indptr[rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.concatenate([np.arange(proj.indptr[s], proj.indptr[s + 1]) for s in rows] or [np.zeros(0, np.int64)]).astype(np.int64)
    reduced = Projection(
        indptr=indptr,
        indices=tsub.to_new(proj.indices[take]).astype(np.int32),
        data=proj.data[take].copy(),
        row_kind=proj.row_kind[rows].copy(),
        student_vocab_size=student.size,
        teacher_vocab_size=tsub.size,
        student_fingerprint=proj.student_fingerprint,
        teacher_fingerprint=proj.teacher_fingerprint,
        beta=proj.beta,
        gamma=proj.gamma,
        max_len=proj.max_len,
        top_k=proj.top_k,
        meta={**proj.meta, "reduced": {"student_ids": student.size, "teacher_ids": tsub.size}},
    )
    return reduced, tsub


def reduce_spellings(spellings, student: VocabSubset, teacher: VocabSubset):
    """The spellings of the kept tokens in the other side's kept ids (partition-KL in the demo).

    A spelling is cut before its first piece outside the other side's subset (a piece the reduced
    model cannot produce); a token whose first piece is outside has no spelling.  Kept student rows
    of W point inside the teacher subset, so student spellings of up to 4 pieces are never cut.
    """
    from nemo_xtoken.vocab.spellings import Spellings

    def side(which: str, mine: VocabSubset, other: VocabSubset) -> list[list[int]]:
        indptr, ids = spellings.side(which)
        out = []
        for v in mine.kept.tolist():
            piece = ids[indptr[v] : indptr[v + 1]]
            pos = np.searchsorted(other.kept, piece)
            ok = (pos < other.size) & (other.kept[np.minimum(pos, other.size - 1)] == piece)
            n = int(np.argmin(ok)) if not ok.all() else ok.size
            out.append(pos[:n].tolist())
        return out

    return Spellings.from_lists(side("student", student, teacher), side("teacher", teacher, student))
