"""Documents: the student's ids and, per cross-tokenizer teacher, its ids and the alignment, from texts or preprocessed folders.

A document is the student's ids and, per cross-tokenizer teacher, that teacher's ids and the student ↔
teacher :class:`~nemo_xtoken.align.Alignment` (:class:`Document`, :class:`TeacherSide`; a plain
``(student_ids, teacher_ids, alignment)`` tuple is a one-teacher document).  A *document source* is
anything indexable that gives documents (:class:`DocumentSource`): texts aligned in memory
(:class:`TextDocuments`), an ``xtoken preprocess`` folder (:class:`PreprocessedDocuments`), several
teachers' sources side by side (:class:`MultiTeacherDocuments`), several sources one after the other
(:class:`ConcatDocuments`).  The dataset that packs them: :mod:`nemo_xtoken.data.packing`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from nemo_xtoken.errors import XTokenError

__all__ = ["TeacherSide", "Document", "DocumentSource", "as_document", "TextDocuments", "PreprocessedDocuments", "MultiTeacherDocuments", "ConcatDocuments", "document_lengths"]


# ---- documents ----------------------------------------------------------------------------------


@dataclass
class TeacherSide:
    """One teacher's view of a document: its ids, the student ↔ teacher alignment, extra per-token arrays.

    ``fields[name]`` is an array ``[n_teacher_tokens, ...]`` (one row per teacher token, e.g. a
    cached teacher's top-k log-probabilities at that position); samples carry it under ``name``
    (teacher 0) or ``name + teacher_keys[m]``, cut, packed and zero-padded like ``teacher_tokens``.
    """

    ids: np.ndarray
    alignment: Any
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    # chat (nemo_xtoken.align.chat): bool per token, the token is in a chunk that carries KD (None: every chunk does)
    student_kd_mask: np.ndarray | None = None
    teacher_kd_mask: np.ndarray | None = None


@dataclass
class Document:
    """The student's ids and one :class:`TeacherSide` per cross-tokenizer teacher."""

    student_ids: np.ndarray
    teachers: list[TeacherSide]
    # chat: bool per student token, the token is a loss target (None: every token is)
    student_loss_mask: np.ndarray | None = None


class DocumentSource(Protocol):
    """Anything indexable giving a :class:`Document` or a ``(student_ids, teacher_ids, Alignment)`` tuple.

    An optional ``lengths()`` returning ``(student_lengths [n], teacher_lengths [n_teachers, n])``
    (or ``[n]`` for one teacher) lets packing plan without loading every document.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


def as_document(item: Any, doc: int | str = "?") -> Document:
    """A :class:`Document` from a document source's item (a ``Document`` or a one-teacher tuple), checked."""
    if isinstance(item, Document):
        d = item
    elif isinstance(item, tuple) and len(item) == 3:
        s, t, a = item
        d = Document(np.asarray(s), [TeacherSide(np.asarray(t), a)])
    else:
        raise XTokenError(
            f"document {doc}: a document source must give Document objects or (student_ids, teacher_ids, Alignment) "
            f"tuples, got {type(item).__name__}"
        )
    if not d.teachers:
        raise XTokenError(f"document {doc}: no teacher side (a cross-tokenizer document needs at least one teacher)")
    n_s = int(d.student_ids.shape[0])
    for m, tv in enumerate(d.teachers):
        a = tv.alignment
        if a.student_chunk_ids.shape[0] != n_s or a.teacher_chunk_ids.shape[0] != tv.ids.shape[0]:
            raise XTokenError(
                f"document {doc}, teacher {m}: the alignment covers {a.student_chunk_ids.shape[0]} student and "
                f"{a.teacher_chunk_ids.shape[0]} teacher tokens but the document has {n_s} and {tv.ids.shape[0]}: "
                "ids and alignment come from different tokenizations"
            )
        for name, arr, n in (("student_kd_mask", tv.student_kd_mask, n_s), ("teacher_kd_mask", tv.teacher_kd_mask, tv.ids.shape[0])):
            if arr is not None and arr.shape != (n,):
                raise XTokenError(f"document {doc}, teacher {m}: {name} has shape {arr.shape} for {n} tokens")
        for name, arr in tv.fields.items():
            if arr.shape[0] != tv.ids.shape[0]:
                raise XTokenError(
                    f"document {doc}, teacher {m}: field {name!r} has {arr.shape[0]} rows for {tv.ids.shape[0]} teacher tokens"
                )
    if d.student_loss_mask is not None and d.student_loss_mask.shape != (n_s,):
        raise XTokenError(f"document {doc}: student_loss_mask has shape {d.student_loss_mask.shape} for {n_s} student tokens")
    return d


class TextDocuments:
    """Documents from texts (a list, a ``.jsonl``/``.parquet`` file or a folder of them), aligned at construction.

    ``teacher_tokenizer`` may be a list (several teachers): items are then :class:`Document`\\ s with
    one side per teacher; with one tokenizer, ``(student_ids, teacher_ids, Alignment)`` tuples.
    For large corpora run ``xtoken preprocess`` and use :class:`PreprocessedDocuments`; this class
    aligns every text in memory (fine for tests and small runs).  Texts that cannot be aligned
    raise, naming the document.  ``limit`` reads only the first documents (``xtoken distill --check``).
    """

    def __init__(
        self,
        texts: Iterable[str] | str | Path,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        text_key: str = "text",
        student_add_bos: bool = False,
        teacher_add_bos: bool = False,
        limit: int | None = None,
        batch_size: int = 256,
    ) -> None:
        from nemo_xtoken.align import align_batch

        source = None
        if isinstance(texts, (str, Path)):
            from nemo_xtoken.data.corpus import iter_documents

            source = str(texts)
            items = []
            for i, text, reason in iter_documents(texts, text_key):
                if limit is not None and len(items) >= limit:
                    break
                if text is None:
                    raise XTokenError(f"{texts}: document {i}: {reason}")
                if text == "":
                    raise XTokenError(f"{texts}: document {i}: empty text (remove it, or run `xtoken preprocess`, which skips it)")
                items.append(text)
            texts = items
        else:
            texts = list(texts)[:limit] if limit is not None else list(texts)
        self.multi = isinstance(teacher_tokenizer, (list, tuple))
        teachers = list(teacher_tokenizer) if self.multi else [teacher_tokenizer]
        student: list[np.ndarray] = []
        sides: list[list[TeacherSide]] = [[] for _ in texts]
        for m, tok in enumerate(teachers):
            for b0 in range(0, len(texts), batch_size):
                chunk = texts[b0 : b0 + batch_size]
                try:
                    batch = align_batch(chunk, student_tokenizer, tok, student_add_bos=student_add_bos, teacher_add_bos=teacher_add_bos)
                except XTokenError as e:
                    where = f"{source}: " if source else ""
                    raise XTokenError(f"{where}{_shift_document_number(str(e), b0)} (teacher {m}): it cannot be aligned") from None
                for k in range(len(chunk)):
                    s, t, a = batch[k]
                    if m == 0:
                        student.append(np.asarray(s, dtype=np.int64))
                    sides[b0 + k].append(TeacherSide(np.asarray(t, dtype=np.int64), a))
        self._docs = [Document(s, sd) for s, sd in zip(student, sides)]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> Any:
        d = self._docs[i]
        if self.multi:
            return d
        return d.student_ids, d.teachers[0].ids, d.teachers[0].alignment

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Student lengths ``[n]`` and teacher lengths ``[n_teachers, n]``."""
        s = np.asarray([d.student_ids.shape[0] for d in self._docs], dtype=np.int64)
        m = len(self._docs[0].teachers) if self._docs else 1
        t = np.asarray([[d.teachers[j].ids.shape[0] for d in self._docs] for j in range(m)], dtype=np.int64).reshape(m, -1)
        return s, t


def _shift_document_number(msg: str, offset: int) -> str:
    """``"document 3: …"`` of a batch starting at ``offset`` → the document's number in the whole list."""
    if offset and msg.startswith("document "):
        head, _, rest = msg.partition(":")
        try:
            return f"document {int(head.split()[1]) + offset}:{rest}"
        except ValueError:
            pass
    return msg


class _LazyAlignment:
    """An :class:`~nemo_xtoken.align.Alignment` read from per-token chunk ids, built in full only when asked.

    Building a sample needs only slices of the chunk ids; the chunk table (``student_chunks`` …,
    validated by ``Alignment.from_chunk_ids``) is made on first use of any other attribute.
    """

    __slots__ = ("student_chunk_ids", "teacher_chunk_ids", "n", "_full")

    def __init__(self, student_chunk_ids: np.ndarray, teacher_chunk_ids: np.ndarray, n_chunks: int) -> None:
        self.student_chunk_ids, self.teacher_chunk_ids, self.n, self._full = student_chunk_ids, teacher_chunk_ids, int(n_chunks), None

    @property
    def n_chunks(self) -> int:
        return self.n

    def full(self) -> Any:
        """The complete :class:`~nemo_xtoken.align.Alignment`."""
        if self._full is None:
            from nemo_xtoken.align import Alignment

            self._full = Alignment.from_chunk_ids(self.student_chunk_ids, self.teacher_chunk_ids, self.n)
        return self._full

    def __getattr__(self, name: str) -> Any:
        return getattr(self.full(), name)

    def __eq__(self, other: object) -> bool:
        return self.full() == (other.full() if isinstance(other, _LazyAlignment) else other)

    __hash__ = None  # type: ignore[assignment]


class PreprocessedDocuments:
    """Documents from an ``xtoken preprocess`` output folder (memory-mapped; one teacher per folder)."""

    def __init__(self, path: str | Path) -> None:
        from nemo_xtoken.data.corpus import PreprocessedCorpus

        self.corpus = PreprocessedCorpus(path)
        self.params = self.corpus.params

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> Any:
        s, t, sc, tc, n = self.corpus.arrays(i)
        if self.corpus.chat:  # `xtoken preprocess --chat`: the loss and KD masks
            lm, skd, tkd = self.corpus.chat_masks(i)
            return Document(s.astype(np.int64), [TeacherSide(t.astype(np.int64), _LazyAlignment(sc, tc, n), student_kd_mask=skd,
                                                             teacher_kd_mask=tkd)], lm)
        return s.astype(np.int64), t.astype(np.int64), _LazyAlignment(sc, tc, n)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Student lengths ``[n]`` and teacher lengths ``[1, n]`` (from the shards' offsets, no document loaded)."""
        s, t = self.corpus.lengths()
        return s.astype(np.int64), t.astype(np.int64).reshape(1, -1)

    def source_index(self, i: int) -> int:
        """The input line/row of document ``i``."""
        return self.corpus.source_index(i)


class MultiTeacherDocuments:
    """Several one-teacher sources over the same documents (same student ids) as one multi-teacher source.

    E.g. one ``xtoken preprocess`` folder per teacher, made from the same input with the same student
    tokenizer.  Items are :class:`Document`\\ s with the sources' teacher sides in order; a document
    whose student ids differ between the sources raises, naming it.
    """

    def __init__(self, sources: Sequence[DocumentSource]) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise XTokenError("MultiTeacherDocuments needs at least one source")
        n = {len(s) for s in self.sources}
        if len(n) != 1:
            raise XTokenError(
                f"the teachers' document sources have different numbers of documents ({[len(s) for s in self.sources]}): "
                "preprocess the same input for every teacher"
            )
        self._lengths: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.sources[0])

    def __getitem__(self, i: int) -> Document:
        docs = [as_document(src[i], i) for src in self.sources]
        s = docs[0].student_ids
        for m, d in enumerate(docs[1:], 1):
            if not np.array_equal(d.student_ids, s):
                raise XTokenError(
                    f"document {i}: the student ids of source {m} differ from source 0's ({d.student_ids.shape[0]} vs "
                    f"{s.shape[0]} tokens): the sources were made from different inputs or student tokenizers"
                )
        return Document(s, [t for d in docs for t in d.teachers], docs[0].student_loss_mask)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Student lengths ``[n]`` and teacher lengths ``[n_teachers, n]``; student lengths must agree."""
        if self._lengths is None:
            parts = [document_lengths(s) for s in self.sources]
            s0 = parts[0][0]
            for m, (s, _) in enumerate(parts[1:], 1):
                if not np.array_equal(s, s0):
                    bad = int(np.flatnonzero(s != s0)[0])
                    raise XTokenError(
                        f"document {bad}: source {m} has {int(s[bad])} student tokens, source 0 {int(s0[bad])}: the sources "
                        "were made from different inputs or student tokenizers"
                    )
            self._lengths = (s0, np.concatenate([t for _, t in parts], 0))
        return self._lengths


class ConcatDocuments:
    """Several document sources one after another (e.g. the files of ``data.paths``)."""

    def __init__(self, parts: Sequence[DocumentSource]) -> None:
        self.parts = list(parts)
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated :func:`document_lengths` of the parts."""
        parts = [document_lengths(p) for p in self.parts]
        return np.concatenate([s for s, _ in parts]), np.concatenate([t for _, t in parts], 1)


def document_lengths(source: DocumentSource) -> tuple[np.ndarray, np.ndarray]:
    """Student lengths ``[n]`` and teacher lengths ``[n_teachers, n]`` (``source.lengths()`` if it has one)."""
    if hasattr(source, "lengths"):
        s, t = source.lengths()
        s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
        return s, t.reshape(-1, s.shape[0]) if t.ndim == 1 else t
    docs = [as_document(source[i], i) for i in range(len(source))]
    m = len(docs[0].teachers) if docs else 1
    s = np.asarray([d.student_ids.shape[0] for d in docs], dtype=np.int64)
    t = np.asarray([[d.teachers[j].ids.shape[0] for d in docs] for j in range(m)], dtype=np.int64).reshape(m, -1)
    return s, t
