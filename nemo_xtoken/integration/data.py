"""Dual-tokenized dataset: one text, student ids + every teacher's ids + chunk alignments, Megatron-shaped samples.

**Documents.**  A document is the student's ids and, per cross-tokenizer teacher, that teacher's ids
and the student ↔ teacher :class:`~nemo_xtoken.align.Alignment` (:class:`Document`,
:class:`TeacherSide`; a plain ``(student_ids, teacher_ids, alignment)`` tuple is a one-teacher
document).  A teacher side may carry extra *per-teacher-token* arrays (:attr:`TeacherSide.fields`,
e.g. a cached teacher's per-position log-probabilities): they are cut and packed exactly like the
teacher's ids (the extension point for cached teachers).

**Cut points.**  Documents are only ever cut where *every* side can be cut: a student token offset
that is a chunk boundary in every teacher's alignment, with each teacher's matching token offset
(:func:`cut_points`).  A chunk is never split, on any side, so every chunk stays whole on both sides.

**Packing** (``packing=True``, what the shipped configs use).  Each epoch the documents are put in a
seeded order and concatenated into samples in lock-step: a sample holds at most ``seq_length + 1``
student tokens and, for every teacher ``m``, at most ``teacher_seq_length[m] + 1`` teacher tokens; a
document that does not fit the room left is cut at the last cut point that fits every budget and
continues in the next sample (so a document longer than a sample is split too).  Every run of
tokens from one document in a sample is a *segment*: position ids restart at 0 in each segment,
``segment_ids`` / ``teacher_segment_ids`` number them (the attention of one segment never sees
another: :func:`attention_inputs` turns them into an attention mask on Megatron's local attention
or into ``PackedSeqParams`` / ``cu_seqlens`` for Transformer Engine), the last position of a segment
predicts nothing (``loss_mask`` 0, chunk id ``-1``), and chunk ids are renumbered into the sample.
A packed sample therefore gives every document exactly the losses it would get alone
(``tests/test_packing_equivalence.py``).  Samples of an epoch are shuffled (seeded).

**Without packing** (``packing=False``, the earlier behaviour): one piece of one document per
sample, padded.  Pieces are chosen by the student budget; when a piece's teacher side exceeds the
teacher's budget, ``on_too_long="error"`` raises :class:`~nemo_xtoken.errors.XTokenError` naming the
document (at construction), ``"split"`` cuts the piece further.  Samples carry no segment fields.

**Windows.**  As in Megatron's GPT dataset, ``L + 1`` tokens give ``tokens = x[:-1]`` and
``labels = x[1:]``; the teacher side is cut to the same chunks.  The first chunk of each segment has
no predicting position and takes no part in the KD loss.

**Padding.**  Student fields are padded to ``seq_length``, teacher ``m``'s to its
``teacher_seq_length`` (pad id, ``loss_mask`` 0, chunk id ``-1``); padding continues the last
segment's position ids and segment id.  :func:`collate` stacks samples and
:func:`aligned_positions_from_batch` offsets the per-sample chunk ids into one flattened
:class:`~nemo_xtoken.align.AlignedPositions`.

**Several teachers.**  Teacher 0's fields use the plain keys (:data:`TEACHER_KEYS`); teacher ``m``'s
fields the keys given by ``teacher_keys[m]`` (default ``"<key>@<m>"``), which is how
:func:`~nemo_xtoken.integration.bridge.teacher_batches_from_batch` finds them.

**Order.**  Sample ``i`` of the stream is a pure function of ``(seed, i)``: resuming from Megatron's
``consumed_samples`` gives the same samples (each epoch's document order and sample order come from
``numpy.random.default_rng`` seeded with ``(seed, epoch)``).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError

__all__ = [
    "DocumentSource",
    "Document",
    "TeacherSide",
    "as_document",
    "TextDocuments",
    "PreprocessedDocuments",
    "MultiTeacherDocuments",
    "ConcatDocuments",
    "document_lengths",
    "cut_points",
    "DualTokenizedDataset",
    "PackingStats",
    "plan_pieces",
    "collate",
    "aligned_positions_from_batch",
    "attention_kind",
    "attention_inputs",
    "packed_attention_mask",
    "packed_seq_params",
    "student_model_inputs",
    "teacher_model_inputs",
    "config_documents",
    "dataset_from_config",
    "check_data",
    "format_data_check",
    "SAMPLE_KEYS",
    "STUDENT_KEYS",
    "TEACHER_KEYS",
    "PACKING_KEYS",
    "TEACHER_PACKING_KEYS",
]

#: What the student reads, and what each teacher reads (its ids and its alignment).
STUDENT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
TEACHER_KEYS = (
    "teacher_tokens",
    "teacher_position_ids",
    "student_chunk_ids",
    "teacher_chunk_ids",
    "student_targets",
    "teacher_targets",
    "n_chunks",
)
SAMPLE_KEYS = STUDENT_KEYS + TEACHER_KEYS
#: Packed samples only: the segment (document run) of every position, student side and per teacher.
#: Absent: one segment per sample (plain causal attention over the whole sequence).
PACKING_KEYS = ("segment_ids",)
TEACHER_PACKING_KEYS = ("teacher_segment_ids",)


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
            from nemo_xtoken.align.preprocess import iter_documents

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
        from nemo_xtoken.align.preprocess import PreprocessedCorpus

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


def cut_points(doc: Document) -> tuple[np.ndarray, np.ndarray]:
    """Where a document may be cut on every side: student offsets ``[P]`` and teacher offsets ``[n_teachers, P]``.

    A cut point is a student token offset that starts a chunk (or ends the document) in *every*
    teacher's alignment; its teacher offset is where that chunk starts on the teacher side (the
    earliest, so a teacher-only chunk at the cut goes with the text after it; the document's end takes
    every trailing teacher token).  ``0`` and the ends are always cut points.
    """
    n_s = int(doc.student_ids.shape[0])
    per: list[tuple[np.ndarray, np.ndarray]] = []
    common: np.ndarray | None = None
    for tv in doc.teachers:
        a = tv.alignment
        n_t = int(tv.ids.shape[0])
        s_b = np.append(np.asarray(a.student_chunks[:, 0], dtype=np.int64), n_s)
        t_b = np.append(np.asarray(a.teacher_chunks[:, 0], dtype=np.int64), n_t)
        u, first = np.unique(s_b, return_index=True)  # s_b is non-decreasing: the first has the earliest teacher offset
        t_u = t_b[first]
        t_u[-1] = n_t  # u[-1] == n_s
        per.append((u, t_u))
        common = u if common is None else np.intersect1d(common, u, assume_unique=True)
    assert common is not None
    ts = np.stack([t_u[np.searchsorted(u, common)] for u, t_u in per]) if per else np.zeros((0, common.size), np.int64)
    return common, ts


def plan_pieces(
    student_chunks: np.ndarray,
    teacher_chunks: np.ndarray,
    seq_length: int,
    teacher_seq_length: int,
    *,
    on_too_long: str = "error",
    doc: int | str = "?",
) -> list[tuple[int, int]]:
    """Cut one document's chunk list into pieces ``[k0, k1)`` that fit both budgets (chunks never split).

    ``*_chunks`` are ``[n_chunks, 2]`` token ranges (an :class:`~nemo_xtoken.align.Alignment`'s).
    The student side of a piece holds ≤ ``seq_length + 1`` tokens; the teacher side must hold ≤
    ``teacher_seq_length + 1`` (``on_too_long="error"``: raise; ``"split"``: cut further).
    """
    if on_too_long not in ("error", "split"):
        raise XTokenError(f"on_too_long must be 'error' or 'split', got {on_too_long!r}")
    n = int(student_chunks.shape[0])
    s_budget, t_budget = seq_length + 1, teacher_seq_length + 1
    pieces: list[tuple[int, int]] = []
    k0 = 0
    while k0 < n:
        s_start, t_start = student_chunks[k0, 0], teacher_chunks[k0, 0]
        # last k1 with student_chunks[k1-1, 1] - s_start ≤ budget (ends are non-decreasing)
        k1s = k0 + int(np.searchsorted(student_chunks[k0:, 1] - s_start, s_budget, "right"))
        k1t = k0 + int(np.searchsorted(teacher_chunks[k0:, 1] - t_start, t_budget, "right"))
        if on_too_long == "error":
            if k1s == k0:
                raise XTokenError(
                    f"document {doc}: chunk {k0} alone has {int(student_chunks[k0, 1] - s_start)} student tokens, more than "
                    f"seq_length + 1 = {s_budget}: raise seq_length"
                )
            if k1t < k1s:
                t_len = int(teacher_chunks[k1s - 1, 1] - t_start)
                raise XTokenError(
                    f"document {doc}: the teacher side of the text span of student tokens "
                    f"[{int(s_start)}, {int(student_chunks[k1s - 1, 1])}) has {t_len} teacher tokens, more than the teacher's "
                    f"maximum length + 1 = {t_budget}: raise the teacher's seq_length or set data.on_too_long: split"
                )
            k1 = k1s
        else:
            k1 = min(k1s, k1t)
            if k1 == k0:
                raise XTokenError(
                    f"document {doc}: chunk {k0} alone exceeds a budget (student {int(student_chunks[k0, 1] - s_start)} > "
                    f"{s_budget} or teacher {int(teacher_chunks[k0, 1] - t_start)} > {t_budget} tokens): raise seq_length"
                )
        pieces.append((k0, k1))
        k0 = k1
    return pieces


def _last_cut(cs: np.ndarray, ct: np.ndarray, s0: int, t0: np.ndarray, room_s: int, room_t: np.ndarray) -> int:
    """Index of the last cut point within ``room_s`` student and ``room_t[m]`` teacher tokens of ``(s0, t0)``."""
    c = int(np.searchsorted(cs, s0 + room_s, "right"))
    for m in range(ct.shape[0]):
        c = min(c, int(np.searchsorted(ct[m], t0[m] + room_t[m], "right")))
    return c - 1


def _window_cut(
    doc: Document, s0: int, t0: list[int], room_s: int, room_t: list[int], d: int, ls: int, lt: list[int]
) -> tuple[int, list[int]] | None:
    """The last cut point after ``(s0, t0)`` within ``room_s`` student and ``room_t[m]`` teacher tokens, or None.

    The same points as :func:`cut_points`, found without reading the whole document: student
    offset ``s`` (``0 < s < n``) is a cut point when it starts a chunk in every teacher's alignment
    (``chunk[s] != chunk[s-1]``), and teacher ``m``'s offset there is the number of its tokens in
    chunks up to ``chunk[s-1]``.  That offset stays within ``L = t0 + room_t`` exactly when
    ``chunk[s-1] < teacher_chunk[L]``, so each teacher's budget is one binary search; the last
    common chunk start below the tightest bound is then found by scanning back a few tokens.
    """
    n = int(doc.student_ids.shape[0])
    if n != ls or [int(tv.ids.shape[0]) for tv in doc.teachers] != list(lt):
        raise XTokenError(f"document {d}: its lengths ({n}, {[int(tv.ids.shape[0]) for tv in doc.teachers]}) differ from "
                          f"the document source's lengths() ({ls}, {list(lt)})")
    hi = min(s0 + room_s, n)
    for m, tv in enumerate(doc.teachers):
        limit = t0[m] + room_t[m]
        if limit < lt[m]:  # the teacher's budget ends inside the document: not at its end
            tc, sc = tv.alignment.teacher_chunk_ids, tv.alignment.student_chunk_ids
            hi = min(hi, int(np.searchsorted(sc, tc[limit], "left")), n - 1)
    if hi <= s0:
        return None
    if hi == n:  # the end of the document fits every budget
        return n, list(lt)
    w = 32
    while True:
        lo = max(s0 + 1, hi - w + 1)
        ok = np.ones(hi - lo + 1, dtype=bool)
        for tv in doc.teachers:
            sc = np.asarray(tv.alignment.student_chunk_ids[lo - 1 : hi + 1])
            ok &= sc[1:] != sc[:-1]
        idx = np.flatnonzero(ok)
        if idx.size:
            s = lo + int(idx[-1])
            t = [int(np.searchsorted(tv.alignment.teacher_chunk_ids, int(tv.alignment.student_chunk_ids[s - 1]) + 1, "left"))
                 for tv in doc.teachers]
            return s, t
        if lo == s0 + 1:
            return None
        w *= 4


@dataclass(frozen=True)
class Segment:
    """A run of one document's tokens in a sample: student ``[s0, s1)``, teacher ``m`` ``[t0[m], t1[m])``."""

    doc: int
    s0: int
    s1: int
    t0: tuple[int, ...]
    t1: tuple[int, ...]


_Piece = Segment  # the unpacked dataset's pieces (one segment per sample)


@dataclass(frozen=True)
class PackingStats:
    """How full the samples of one epoch are (computed from the plan, no sample built).

    ``loss_fraction``: student positions with ``loss_mask`` 1 over all student positions;
    ``teacher_fill[m]``: teacher ``m``'s positions holding a token over all its positions.
    """

    samples: int
    documents: int
    segments: int
    split_documents: int
    student_tokens: int
    loss_positions: int
    loss_fraction: float
    teacher_tokens: tuple[int, ...]
    teacher_fill: tuple[float, ...]


class DualTokenizedDataset:
    """Megatron-compatible samples of several tokenizations of the same text with their alignments.

    ``dataset[i]`` (``i`` any non-negative integer: the stream position) is a dict of tensors:
    ``tokens``, ``labels``, ``loss_mask`` (float), ``position_ids`` ``[seq_length]``; per teacher
    (plain keys for teacher 0, ``key + teacher_keys[m]`` for teacher ``m``): ``teacher_tokens``,
    ``teacher_position_ids`` ``[teacher_seq_length[m]]``, the per-position alignment
    ``student_chunk_ids``/``student_targets`` ``[seq_length]``, ``teacher_chunk_ids``/``teacher_targets``
    ``[teacher_seq_length[m]]`` (next-token shift applied, ``-1`` = no chunk), ``n_chunks`` (scalar)
    and the teacher side's extra fields; with ``packing=True`` also ``segment_ids`` and per teacher
    ``teacher_segment_ids``.  See the module docstring for cutting, packing, padding and order.

    ``documents`` items: :class:`Document` or ``(student_ids, teacher_ids, Alignment)``.
    ``teacher_seq_length`` / ``teacher_pad_id``: one value for every teacher, or one per teacher.
    """

    def __init__(
        self,
        documents: DocumentSource,
        *,
        seq_length: int,
        teacher_seq_length: int | Sequence[int],
        seed: int = 1234,
        pad_id: int = 0,
        teacher_pad_id: int | Sequence[int] = 0,
        on_too_long: str = "error",
        shuffle: bool = True,
        packing: bool = False,
        teacher_keys: Sequence[str] | None = None,
    ) -> None:
        if on_too_long not in ("error", "split"):
            raise XTokenError(f"on_too_long must be 'error' or 'split', got {on_too_long!r}")
        if len(documents) == 0:
            raise XTokenError("the dataset has no documents: check the input files")
        self.documents = documents
        self.n_teachers = len(as_document(documents[0], 0).teachers)
        M = self.n_teachers
        t_lens = [int(teacher_seq_length)] * M if isinstance(teacher_seq_length, (int, np.integer)) else [int(x) for x in teacher_seq_length]
        t_pads = [int(teacher_pad_id)] * M if isinstance(teacher_pad_id, (int, np.integer)) else [int(x) for x in teacher_pad_id]
        if len(t_lens) != M or len(t_pads) != M:
            raise XTokenError(f"{len(t_lens)} teacher lengths and {len(t_pads)} pad ids for documents with {M} teacher sides")
        if seq_length < 1 or min(t_lens) < 1:
            raise XTokenError(f"seq_length and teacher_seq_length must be ≥ 1, got {seq_length}, {t_lens}")
        keys = list(teacher_keys) if teacher_keys is not None else [""] + [f"@{m}" for m in range(1, M)]
        if len(keys) != M or len(set(keys)) != M:
            raise XTokenError(f"teacher_keys needs {M} distinct suffixes (one per teacher side), got {keys}")
        self.teacher_keys = keys
        self.seq_length = int(seq_length)
        self.teacher_seq_lengths = t_lens
        self.teacher_seq_length = t_lens[0]
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.teacher_pad_ids = t_pads
        self.teacher_pad_id = t_pads[0]
        self.shuffle = shuffle
        self.packing = bool(packing)
        self.on_too_long = on_too_long
        self._doc_cache: OrderedDict[int, Document] = OrderedDict()
        self._perm_cache: dict[int, np.ndarray] = {}
        if self.packing:
            self._s_len, self._t_len = document_lengths(documents)
            if self._t_len.shape != (M, len(documents)):
                raise XTokenError(f"document lengths have shape {self._t_len.shape}, expected ({M}, {len(documents)})")
            self._epoch_counts: list[int] = []
            self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
            self.pieces: list[Segment] = []
            if self._plan(0)[1].size <= 1:
                raise XTokenError("the dataset has no tokens: every document is empty")
        else:
            pieces: list[Segment] = []
            for d in range(len(documents)):
                pieces += self._plan_document(d)
            if not pieces:
                raise XTokenError("the dataset has no documents: check the input files")
            self.pieces = pieces

    # -- documents --

    def _doc(self, d: int) -> Document:
        doc = self._doc_cache.get(d)
        if doc is None:
            doc = as_document(self.documents[d], d)
            self._doc_cache[d] = doc
            if len(self._doc_cache) > 8:
                self._doc_cache.popitem(last=False)
        return doc

    def _budgets(self) -> tuple[int, np.ndarray]:
        return self.seq_length + 1, np.asarray(self.teacher_seq_lengths, dtype=np.int64) + 1

    def _plan_document(self, d: int) -> list[Segment]:
        """Unpacked: one document's pieces (each fits every budget; ``on_too_long`` decides teacher overflow)."""
        doc = self._doc(d)
        if doc.student_ids.shape[0] == 0:
            return []
        cs, ct = cut_points(doc)
        sb, tb = self._budgets()
        out, c0 = [], 0
        big = np.full(ct.shape[0], np.iinfo(np.int64).max // 4)
        while c0 < cs.size - 1:
            s0, t0 = int(cs[c0]), ct[:, c0]
            c_s = _last_cut(cs, ct, s0, t0, sb, big)  # the student budget alone
            c = _last_cut(cs, ct, s0, t0, sb, tb)
            if c_s == c0:
                raise XTokenError(
                    f"document {d}: the text between student tokens {s0} and {int(cs[c0 + 1])} cannot be cut on every side and "
                    f"has {int(cs[c0 + 1]) - s0} student tokens, more than seq_length + 1 = {sb}: raise seq_length"
                )
            if self.on_too_long == "error" and c < c_s:
                m = int(np.argmax(ct[:, c_s] - t0 > tb))
                who = "teacher side" if self.n_teachers == 1 else f"teacher side (teacher {m})"
                raise XTokenError(
                    f"document {d}: the {who} of the text span of student tokens [{s0}, {int(cs[c_s])}) has "
                    f"{int(ct[m, c_s] - t0[m])} teacher tokens, more than the teacher's maximum length + 1 = {int(tb[m])}: "
                    "raise the teacher's seq_length or set data.on_too_long: split"
                )
            if c == c0:
                m = int(np.argmax(ct[:, c0 + 1] - t0 > tb))
                raise XTokenError(
                    f"document {d}: the text between student tokens {s0} and {int(cs[c0 + 1])} cannot be cut on every side and "
                    f"has {int(ct[m, c0 + 1] - t0[m])} tokens of teacher {m}, more than its maximum length + 1 = {int(tb[m])}: "
                    "raise that teacher's seq_length"
                )
            out.append(Segment(d, s0, int(cs[c]), tuple(int(x) for x in t0), tuple(int(x) for x in ct[:, c])))
            c0 = c
        return out

    # -- packing plans --

    def _pack(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy lock-step packing of documents in ``order``: segments ``[n_seg, 3 + 2M]`` and sample pointers.

        Whole documents are placed from their lengths alone; only a document that must be cut is
        read, and only around the cut (:func:`_window_cut`).
        """
        M = self.n_teachers
        sb, tb = self.seq_length + 1, [x + 1 for x in self.teacher_seq_lengths]
        rows: list[tuple[int, ...]] = []
        ptr = [0]
        used_s, used_t = 0, [0] * M
        s_len, t_len = self._s_len.tolist(), self._t_len.T.tolist()
        for d in order.tolist():
            ls, lt = s_len[d], t_len[d]
            if ls == 0:
                continue
            s0, t0 = 0, [0] * M
            while True:
                room_s, room_t = sb - used_s, [tb[m] - used_t[m] for m in range(M)]
                if ls - s0 <= room_s and all(lt[m] - t0[m] <= room_t[m] for m in range(M)):
                    rows.append((d, s0, ls, *t0, *lt))
                    used_s += ls - s0
                    used_t = [used_t[m] + lt[m] - t0[m] for m in range(M)]
                    break
                cut = _window_cut(self._doc(d), s0, t0, room_s, room_t, d, ls, lt)
                if cut is not None and cut[0] - s0 >= 2:  # a segment with at least one predicting position
                    rows.append((d, s0, cut[0], *t0, *cut[1]))
                    ptr.append(len(rows))
                    used_s, used_t = 0, [0] * M
                    s0, t0 = cut
                elif used_s > 0 or any(used_t):
                    ptr.append(len(rows))  # close this sample, continue in a fresh one
                    used_s, used_t = 0, [0] * M
                else:
                    cs, ct = cut_points(self._doc(d))
                    nxt = int(np.searchsorted(cs, s0, "right"))
                    over = [f"student {int(cs[nxt]) - s0} > {sb}"] if cs[nxt] - s0 > sb else []
                    over += [f"teacher {m} {int(ct[m, nxt]) - t0[m]} > {tb[m]}" for m in range(M) if ct[m, nxt] - t0[m] > tb[m]]
                    raise XTokenError(
                        f"document {d}: the text between student tokens {s0} and {int(cs[nxt])} cannot be cut on every side "
                        f"and does not fit one sample ({', '.join(over)} tokens): raise seq_length / the teacher's seq_length"
                    )
        if used_s > 0 or any(used_t):
            ptr.append(len(rows))
        seg = np.asarray(rows, dtype=np.int64).reshape(-1, 3 + 2 * M)
        return seg, np.asarray(ptr, dtype=np.int64)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The packing plan of ``epoch`` (cached: the two most recent epochs)."""
        plan = self._plans.get(epoch)
        if plan is None:
            n = len(self.documents)
            order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            plan = self._pack(order)
            self._plans[epoch] = plan
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
            if epoch == len(self._epoch_counts):
                self._epoch_counts.append(int(plan[1].size - 1))
        return plan

    def _epoch_count(self, epoch: int) -> int:
        while len(self._epoch_counts) <= epoch:
            self._plan(len(self._epoch_counts))
        return self._epoch_counts[epoch]

    @property
    def num_pieces(self) -> int:
        """Samples per epoch (packed: in epoch 0; the count varies slightly with each epoch's order)."""
        return self._epoch_count(0) if self.packing else len(self.pieces)

    def __len__(self) -> int:
        return self.num_pieces

    def _locate(self, i: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of stream sample ``i``."""
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        if not self.packing:
            return divmod(int(i), len(self.pieces))
        e, rest = 0, int(i)
        while rest >= self._epoch_count(e):
            rest -= self._epoch_count(e)
            e += 1
        return e, rest

    def _perm(self, epoch: int, n: int, salt: int) -> np.ndarray:
        key = (epoch, salt)
        perm = self._perm_cache.get(key)  # type: ignore[arg-type]
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch, salt) if salt else (self.seed, epoch)).permutation(n)
            self._perm_cache = {key: perm}  # type: ignore[dict-item]  # one at a time: constant memory
        return perm

    def piece_index(self, i: int) -> int:
        """Which sample of its epoch the ``i``-th sample of the stream is (deterministic in ``(seed, i)``)."""
        epoch, j = self._locate(i)
        if not self.shuffle:
            return j
        n = len(self.pieces) if not self.packing else self._epoch_count(epoch)
        return int(self._perm(epoch, n, 0 if not self.packing else 1)[j])

    def segments(self, i: int) -> list[Segment]:
        """The segments (document runs) of stream sample ``i``."""
        epoch, j = self._locate(i)
        if not self.packing:
            return [self.pieces[self.piece_index(i)]]
        k = self.piece_index(i)
        seg, ptr = self._plan(epoch)
        M = self.n_teachers
        return [
            Segment(int(r[0]), int(r[1]), int(r[2]), tuple(int(x) for x in r[3 : 3 + M]), tuple(int(x) for x in r[3 + M :]))
            for r in seg[ptr[k] : ptr[k + 1]]
        ]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self._build(self.segments(i))

    def packing_stats(self, epoch: int = 0) -> PackingStats:
        """Loss-bearing fraction, teacher fill, segments and split documents of one epoch (from the plan)."""
        M = self.n_teachers
        if self.packing:
            seg, ptr = self._plan(epoch)
            n_samples = int(ptr.size - 1)
        else:
            seg = np.asarray([(p.doc, p.s0, p.s1, *p.t0, *p.t1) for p in self.pieces], dtype=np.int64).reshape(-1, 3 + 2 * M)
            n_samples = len(self.pieces)
        n_s = seg[:, 2] - seg[:, 1]
        n_t = seg[:, 3 + M :] - seg[:, 3 : 3 + M]
        docs, counts = np.unique(seg[:, 0], return_counts=True)
        S, Ts = self.seq_length, self.teacher_seq_lengths
        loss = int(np.maximum(n_s - 1, 0).sum())
        # the last token of a sample holding seq_length + 1 tokens is a label only (no position)
        t_tok = [int(n_t[:, m].sum()) for m in range(M)]
        if self.packing:
            starts = ptr[:-1]
            s_tot = np.add.reduceat(n_s, starts) if n_s.size else np.zeros(0, np.int64)
            s_pos = int(np.minimum(s_tot, S).sum())
            t_pos = [int(np.minimum(np.add.reduceat(n_t[:, m], starts), Ts[m]).sum()) for m in range(M)]
        else:
            s_pos = int(np.minimum(n_s, S).sum())
            t_pos = [int(np.minimum(n_t[:, m], Ts[m]).sum()) for m in range(M)]
        return PackingStats(
            samples=n_samples, documents=int(docs.size), segments=int(seg.shape[0]), split_documents=int((counts > 1).sum()),
            student_tokens=s_pos, loss_positions=loss, loss_fraction=loss / max(n_samples * S, 1),
            teacher_tokens=tuple(t_tok), teacher_fill=tuple(t_pos[m] / max(n_samples * Ts[m], 1) for m in range(M)),
        )

    # -- samples --

    def _make_sample(self, s_ids: np.ndarray, t_ids: np.ndarray, a: Any, p: Segment) -> dict[str, torch.Tensor]:
        """One unpacked sample of a one-teacher document given as a tuple (kept for callers of the piece API)."""
        doc = Document(np.asarray(s_ids), [TeacherSide(np.asarray(t_ids), a)])
        return self._build([p], {p.doc: doc})

    def _build(self, segments: Sequence[Segment], docs: dict[int, Document] | None = None) -> dict[str, torch.Tensor]:
        S, M = self.seq_length, self.n_teachers
        tokens = np.full(S, self.pad_id, np.int64)
        labels = np.full(S, self.pad_id, np.int64)
        loss_mask = np.zeros(S, np.float32)
        pos = np.zeros(S, np.int64)
        seg_ids = np.zeros(S, np.int64)
        out_t = []
        for m in range(M):
            T = self.teacher_seq_lengths[m]
            out_t.append({
                "teacher_tokens": np.full(T, self.teacher_pad_ids[m], np.int64),
                "teacher_position_ids": np.zeros(T, np.int64),
                "teacher_segment_ids": np.zeros(T, np.int64),
                "student_chunk_ids": np.full(S, -1, np.int64),
                "teacher_chunk_ids": np.full(T, -1, np.int64),
                "student_targets": np.zeros(S, np.int64),
                "teacher_targets": np.zeros(T, np.int64),
                "fields": {},
                "n_chunks": 0,
                "used": 0,
            })
        used = 0
        for j, sg in enumerate(segments):
            doc = docs[sg.doc] if docs is not None else self._doc(sg.doc)
            ids = np.asarray(doc.student_ids[sg.s0 : sg.s1], dtype=np.int64)
            n = ids.shape[0]
            w = min(n, S - used)  # slots this segment occupies (only a sample's last token may lack one)
            p = max(min(n - 1, S - used), 0)  # predicting positions
            tokens[used : used + w] = ids[:w]
            labels[used : used + p] = ids[1 : 1 + p]
            loss_mask[used : used + p] = 1.0
            if doc.student_loss_mask is not None:  # chat: only the loss-bearing targets
                loss_mask[used : used + p] = np.asarray(doc.student_loss_mask[sg.s0 + 1 : sg.s0 + 1 + p], dtype=np.float32)
            pos[used : used + w] = np.arange(w)
            seg_ids[used : used + w] = j
            for m, tv in enumerate(doc.teachers):
                o = out_t[m]
                T = self.teacher_seq_lengths[m]
                t0, t1 = sg.t0[m], sg.t1[m]
                t_ids = np.asarray(tv.ids[t0:t1], dtype=np.int64)
                sc = np.asarray(tv.alignment.student_chunk_ids[sg.s0 : sg.s1], dtype=np.int64)
                tc = np.asarray(tv.alignment.teacher_chunk_ids[t0:t1], dtype=np.int64)
                present = [x for x in (sc[:1], tc[:1]) if x.size]
                k0 = int(min(int(x[0]) for x in present)) if present else 0
                k1 = int(max(int(x[-1]) for x in (sc[-1:], tc[-1:]) if x.size)) + 1 if present else 0
                off = o["n_chunks"] - k0
                o["student_chunk_ids"][used : used + p] = sc[1 : 1 + p] + off
                if tv.student_kd_mask is not None:  # chat: positions predicting a token of a chunk without KD
                    kd = np.asarray(tv.student_kd_mask[sg.s0 + 1 : sg.s0 + 1 + p], dtype=bool)
                    o["student_chunk_ids"][used : used + p][~kd] = -1
                o["student_targets"][used : used + p] = ids[1 : 1 + p]
                tu, nt = o["used"], t_ids.shape[0]
                tw, tp = min(nt, T - tu), max(min(nt - 1, T - tu), 0)
                o["teacher_tokens"][tu : tu + tw] = t_ids[:tw]
                o["teacher_position_ids"][tu : tu + tw] = np.arange(tw)
                o["teacher_segment_ids"][tu : tu + tw] = j
                o["teacher_chunk_ids"][tu : tu + tp] = tc[1 : 1 + tp] + off
                if tv.teacher_kd_mask is not None:
                    kd = np.asarray(tv.teacher_kd_mask[t0 + 1 : t0 + 1 + tp], dtype=bool)
                    o["teacher_chunk_ids"][tu : tu + tp][~kd] = -1
                o["teacher_targets"][tu : tu + tp] = t_ids[1 : 1 + tp]
                for name, arr in tv.fields.items():
                    buf = o["fields"].get(name)
                    if buf is None:
                        buf = o["fields"][name] = np.zeros((T, *arr.shape[1:]), dtype=arr.dtype)
                    buf[tu : tu + tw] = arr[t0 : t0 + tw]
                o["used"] = tu + tw
                o["n_chunks"] += k1 - k0
            used += w
        # padding continues the last segment (its position ids and segment id)
        if segments and used < S:
            last = pos[used - 1] if used else -1
            pos[used:] = np.arange(last + 1, last + 1 + S - used)
            seg_ids[used:] = len(segments) - 1
        out: dict[str, torch.Tensor] = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(pos),
        }
        if self.packing:
            out["segment_ids"] = torch.from_numpy(seg_ids)
        for m, o in enumerate(out_t):
            T, tu, sfx = self.teacher_seq_lengths[m], o["used"], self.teacher_keys[m]
            if segments and tu < T:
                last = o["teacher_position_ids"][tu - 1] if tu else -1
                o["teacher_position_ids"][tu:] = np.arange(last + 1, last + 1 + T - tu)
                o["teacher_segment_ids"][tu:] = len(segments) - 1
            keys = TEACHER_KEYS + (TEACHER_PACKING_KEYS if self.packing else ())
            for k in keys:
                v = o[k]
                out[k + sfx] = torch.tensor(v, dtype=torch.long) if k == "n_chunks" else torch.from_numpy(v)
            for name, buf in o["fields"].items():
                out[name + sfx] = torch.from_numpy(buf)
        return out


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch (every field gains a leading batch dimension)."""
    if not samples:
        raise XTokenError("collate needs at least one sample")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def aligned_positions_from_batch(batch: dict[str, torch.Tensor]):
    """One flattened :class:`~nemo_xtoken.align.AlignedPositions` for a batch (b-major, ids offset per sample).

    Student positions are ``[B*S]`` (logits ``[B, S, V]`` flattened), teacher ``[B*T]``.
    """
    from nemo_xtoken.align import AlignedPositions

    sc, tc = batch["student_chunk_ids"], batch["teacher_chunk_ids"]
    n = batch["n_chunks"].reshape(-1).long()
    if sc.dim() != 2 or tc.dim() != 2 or sc.shape[0] != n.shape[0] or tc.shape[0] != n.shape[0]:
        raise XTokenError(
            f"aligned_positions_from_batch needs student_chunk_ids [B, S], teacher_chunk_ids [B, T] and n_chunks [B]; "
            f"got {tuple(sc.shape)}, {tuple(tc.shape)}, {tuple(n.shape)}"
        )
    off = torch.cumsum(n, 0) - n
    sc = torch.where(sc >= 0, sc + off[:, None], sc)
    tc = torch.where(tc >= 0, tc + off[:, None], tc)
    return AlignedPositions(
        sc.reshape(-1), tc.reshape(-1), batch["student_targets"].reshape(-1).long(), batch["teacher_targets"].reshape(-1).long(), int(n.sum())
    )


# ---- attention over packed samples -----------------------------------------------------------------
#
# How a model is told where one document ends, in one place (the Bridge forward step uses these for
# the student and for every teacher):
#   - Megatron's local attention (``DotProductAttention``, the CPU harness): an explicit boolean
#     mask ``[B, 1, S, S]`` (True = masked), causal inside each segment, nothing across segments;
#   - Transformer Engine's attention (GPU runs): ``PackedSeqParams`` in Megatron's THD format
#     (``cu_seqlens`` = segment starts), which also restarts RoPE per segment.
# A batch without segment ids, or whose samples hold one segment each, needs neither: the models'
# default causal mask is the same thing.


def attention_kind(model: Any) -> str:
    """``"mask"`` for Megatron's local attention, ``"thd"`` for Transformer Engine's (packed-sequence params).

    Reads the core attention of the first decoder layer of ``model`` (a Megatron ``GPTModel``, or
    anything wrapping one under ``.module``); anything else is treated as local attention.
    """
    m = model
    for _ in range(8):
        decoder = getattr(m, "decoder", None)
        if decoder is not None:
            layers = getattr(decoder, "layers", None)
            core = getattr(getattr(layers[0], "self_attention", None), "core_attention", None) if layers else None
            name = type(core).__name__ if core is not None else ""
            return "thd" if name.startswith("TE") or "Flash" in name else "mask"
        if not hasattr(m, "module"):
            break
        m = m.module
    return "mask"


def _segments_of(segment_ids: torch.Tensor) -> bool:
    """True when some sample holds more than one segment (packing changes the attention)."""
    return bool((segment_ids != segment_ids[:, :1]).any())


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]`` (True = masked): causal, and only within a segment."""
    if segment_ids.dim() != 2:
        raise XTokenError(f"segment_ids must be [B, S], got {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(segment_ids: torch.Tensor) -> Any:
    """Megatron's ``PackedSeqParams`` (THD format, ``cu_seqlens`` at segment starts) for a ``[1, S]`` sample.

    Transformer Engine reads one packed sequence per micro-batch: a batch of several samples is
    refused (set ``train.micro_batch_size: 1``, as Megatron's packed-sequence training does).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.dim() != 2 or segment_ids.shape[0] != 1:
        raise XTokenError(
            f"packed samples with Transformer Engine attention need one sample per micro-batch (Megatron's THD format), "
            f"got segment_ids of shape {tuple(segment_ids.shape)}: set train.micro_batch_size: 1"
        )
    ids = segment_ids[0]
    starts = torch.nonzero(ids[1:] != ids[:-1], as_tuple=True)[0] + 1
    cu = torch.cat([ids.new_zeros(1), starts, ids.new_full((1,), ids.shape[0])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def attention_inputs(segment_ids: torch.Tensor | None, kind: str = "mask") -> dict[str, Any]:
    """The attention keyword arguments of a Megatron GPT forward for a (possibly packed) batch.

    ``{"attention_mask": None}`` when nothing is packed; otherwise ``{"attention_mask": mask}``
    (``kind="mask"``) or ``{"attention_mask": None, "packed_seq_params": ...}`` (``kind="thd"``).
    """
    if kind not in ("mask", "thd"):
        raise XTokenError(f"attention kind must be 'mask' or 'thd', got {kind!r}")
    if segment_ids is None or not _segments_of(segment_ids):
        return {"attention_mask": None}
    if kind == "mask":
        return {"attention_mask": packed_attention_mask(segment_ids)}
    return {"attention_mask": None, "packed_seq_params": packed_seq_params(segment_ids)}


def student_model_inputs(batch: dict[str, torch.Tensor], kind: str = "mask") -> dict[str, Any]:
    """The student's forward inputs: ``input_ids``, ``position_ids`` and the attention of a packed batch."""
    att = attention_inputs(batch.get("segment_ids"), kind)
    if att["attention_mask"] is None and "packed_seq_params" not in att:
        att["attention_mask"] = batch.get("attention_mask")  # a mask the batch brings itself
    return {"input_ids": batch["tokens"], "position_ids": batch["position_ids"], **att}


def teacher_model_inputs(teacher_batch: dict[str, torch.Tensor], kind: str = "mask") -> dict[str, Any]:
    """One teacher's forward inputs from its fields (``teacher_tokens``, ``teacher_position_ids``, segments)."""
    att = attention_inputs(teacher_batch.get("teacher_segment_ids"), kind)
    if att["attention_mask"] is None and "packed_seq_params" not in att:
        att["attention_mask"] = teacher_batch.get("teacher_attention_mask")
    return {"input_ids": teacher_batch["teacher_tokens"], "position_ids": teacher_batch["teacher_position_ids"], **att}


# ---- from a run config: the training data and its check ----------------------------------------------


def _resolve_path(path: str, base_dir: str | Path | None) -> Path:
    """A ``data.paths`` entry: relative to the config's folder only (:func:`~nemo_xtoken.integration.config.resolve_input`)."""
    from nemo_xtoken.integration.config import resolve_input

    return Path(resolve_input(path, base_dir, "data.paths"))


def _teacher_plan(cfg: Any) -> tuple[list[int], list[str]]:
    """Config indices of the teachers the documents carry (the cross-tokenizer ones) and their batch-key suffixes.

    Same-tokenizer teachers (loss ``kl``) read the student's ids and need no side of their own; with
    only such teachers the first one's tokenizer gives the (identity) alignment.
    """
    cross = [m for m, t in enumerate(cfg.teachers) if t.loss != "kl"] or [0]
    return cross, [""] + [f"@{m}" for m in cross[1:]]


class _Head:
    """The first ``n`` documents of a source (``xtoken distill --check``)."""

    def __init__(self, source: DocumentSource, n: int) -> None:
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        s, t = document_lengths(self.source)
        return s[: self.n], t[:, : self.n]


def config_documents(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, limit: int | None = None) -> DocumentSource:
    """The documents of a run config's ``data`` section, with one side per cross-tokenizer teacher.

    ``data.format: jsonl|parquet``: every path (a file or a folder of them) is read and aligned in
    memory with each teacher's tokenizer.  ``preprocessed``: every path is an ``xtoken preprocess``
    folder; each is matched to the teachers by its recorded teacher tokenizer (one folder per teacher
    tokenizer, or several folders of consecutive parts per teacher, in ``data.paths`` order), and its
    student tokenizer must be the run's.  A cached teacher (``teachers.N.cache``) reads its cache's
    corpus with the cached rows as fields (:func:`~nemo_xtoken.offline.teachers.cached_teacher_source`:
    the folder of ``data.paths`` made with its tokenizer, or the input the cache was built from, must
    be the cached text).  ``limit``: the first documents only.
    """
    from nemo_xtoken.integration.config import ConfigError

    d = cfg.data
    if not d.paths:
        raise ConfigError("data.paths is empty: give .jsonl/.parquet files or folders, or `xtoken preprocess` output folders")
    paths = [_resolve_path(p, base_dir) for p in d.paths]
    for p in paths:
        if not p.exists():
            raise ConfigError(f"data.paths: {p} does not exist (relative paths resolve against the config's folder)")
    cross, _ = _teacher_plan(cfg)
    names = [cfg.teachers[m].name for m in cross]
    t_toks = [resources.teacher_tokenizers[n] for n in names]
    caches = {i: resources.caches[n] for i, n in enumerate(names) if n in (getattr(resources, "caches", None) or {})}
    if d.format == "chat":  # conversations: each side renders them with its own chat template (docs/chat.md)
        from nemo_xtoken.integration.chat_data import ChatDocuments

        if caches:
            raise ConfigError(
                f"teachers {[names[i] for i in caches]}: a cached teacher reads `xtoken preprocess --chat` output: preprocess the "
                "conversations with --chat, cache the teacher on that folder, and set data.format: preprocessed"
            )
        for p in paths:
            if p.is_file() and p.suffix not in (".jsonl", ".parquet"):
                raise ConfigError(f"data.paths: {p} is not a .jsonl or .parquet file but data.format is 'chat'")

        def tpl(x: str | None) -> str | None:
            return None if x is None or "{%" in x or "{{" in x else str(_resolve_path(x, base_dir))

        parts, left = [], limit
        for p in paths:
            if left is not None and left <= 0:
                break
            part = ChatDocuments(
                p, resources.student_tokenizer, t_toks if len(t_toks) > 1 else t_toks[0], loss_on=d.chat.loss_on,
                student_template=tpl(cfg.student.chat_template) if cfg.student.chat_template else None,
                teacher_templates=[tpl(cfg.teachers[m].chat_template) if cfg.teachers[m].chat_template else None for m in cross],
                template_kwargs={"enable_thinking": d.chat.enable_thinking}, limit=left,
            )
            parts.append(part)
            left = None if left is None else left - part.rows_read
        docs = ConcatDocuments(parts)
    elif d.format in ("jsonl", "parquet"):
        for p in paths:
            if p.is_file() and p.suffix != f".{d.format}":
                raise ConfigError(f"data.paths: {p} is not a .{d.format} file but data.format is {d.format!r}")
        if caches:  # cached teachers (teachers.N.cache): one source per teacher, a cached one with its rows
            from nemo_xtoken.offline.teachers import cached_teacher_source

            per = [
                cached_teacher_source(caches[i], names[i], data_format=d.format, paths=paths, folders=[], limit=limit) if i in caches
                else ConcatDocuments([TextDocuments(p, resources.student_tokenizer, t_toks[i], text_key=d.text_key, limit=limit) for p in paths])
                for i in range(len(cross))
            ]
            docs: DocumentSource = per[0] if len(per) == 1 else MultiTeacherDocuments(per)
        else:
            parts, left = [], limit
            for p in paths:
                if left is not None and left <= 0:
                    break
                part = TextDocuments(p, resources.student_tokenizer, t_toks if len(t_toks) > 1 else t_toks[0], text_key=d.text_key, limit=left)
                parts.append(part)
                left = None if left is None else left - len(part)
            docs = ConcatDocuments(parts)
    else:
        groups: dict[int, list[PreprocessedDocuments]] = {i: [] for i in range(len(cross))}
        s_fp = resources.student_tokenizer.fingerprint
        for p in paths:
            if not (p / "manifest.json").is_file():
                raise ConfigError(
                    f"data.paths: {p} is not a finished `xtoken preprocess` output (no manifest.json) but data.format is "
                    "'preprocessed': run `xtoken preprocess --output` into it, or set data.format: jsonl/parquet"
                )
            pre = PreprocessedDocuments(p)
            if pre.params.get("student_fingerprint") != s_fp:
                raise ConfigError(
                    f"data.paths: {p} was preprocessed with student tokenizer {pre.params.get('student_tokenizer')}, not the run's "
                    f"{cfg.student.tokenizer} (fingerprints differ): preprocess again with -s {cfg.student.tokenizer}"
                )
            owners = [i for i, tok in enumerate(t_toks) if tok.fingerprint == pre.params.get("teacher_fingerprint")]
            if not owners:
                raise ConfigError(
                    f"data.paths: {p} was preprocessed with teacher tokenizer {pre.params.get('teacher_tokenizer')}, which is "
                    f"none of the run's cross-tokenizer teachers' ({', '.join(f'{n}: {cfg.teachers[m].tokenizer}' for n, m in zip(names, cross))})"
                )
            for i in owners:
                groups[i].append(pre)
        missing = [names[i] for i, g in groups.items() if not g and i not in caches]  # a cached teacher: its cache's corpus
        if missing:
            raise ConfigError(
                f"data.paths has no `xtoken preprocess` folder for teacher(s) {missing}: preprocess the same input with "
                "each teacher's tokenizer (-t) and list every folder in data.paths"
            )
        sources = [g[0] if len(g) == 1 else ConcatDocuments(g) for i, g in groups.items() if i not in caches]
        if caches:  # cached teachers (teachers.N.cache): their corpus with the cached rows, in teacher order
            from nemo_xtoken.offline.teachers import cached_teacher_source

            for i in sorted(caches):
                sources.insert(i, cached_teacher_source(caches[i], names[i], data_format=d.format, paths=paths, folders=groups[i]))
        docs = sources[0] if len(sources) == 1 else MultiTeacherDocuments(sources)
    if limit is not None:
        docs = _Head(docs, limit)
    if len(docs) == 0:
        raise XTokenError(f"data.paths {[str(p) for p in paths]} hold no documents")
    return docs


def dataset_from_config(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, limit: int | None = None) -> DualTokenizedDataset:
    """The :class:`DualTokenizedDataset` of a run config (lengths, packing, seed, teacher keys from ``cfg``)."""
    cross, keys = _teacher_plan(cfg)
    docs = config_documents(cfg, resources, base_dir=base_dir, limit=limit)
    return DualTokenizedDataset(
        docs, seq_length=cfg.student.seq_length, teacher_seq_length=[cfg.teacher_seq_length(cfg.teachers[m]) for m in cross],
        seed=cfg.data.seed, on_too_long=cfg.data.on_too_long, packing=cfg.data.packing, teacher_keys=keys,
    )


def check_data(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, max_documents: int = 200) -> dict[str, Any]:
    """What ``xtoken distill --check`` says about the data: it reads, aligns and packs at the configured lengths.

    Reads the first ``max_documents`` documents of ``data.paths`` (every path must exist; the format
    must read), builds the run's dataset over them (raising as training would: a unit between cut
    points longer than a budget, a teacher side too long with ``on_too_long: error``) and reports
    tokens per side, the one-sided token fraction per teacher (tokens in chunks the other side lacks:
    they take no part in KD) and the packing: loss-bearing fraction, teacher fill, documents split.
    """
    from nemo_xtoken.integration.config import ConfigError

    for p in cfg.data.paths:
        if not _resolve_path(p, base_dir).exists():
            raise ConfigError(f"data.paths: {_resolve_path(p, base_dir)} does not exist")
    ds = dataset_from_config(cfg, resources, base_dir=base_dir, limit=max_documents)
    cross, _ = _teacher_plan(cfg)
    docs = ds.documents
    n = len(docs)
    s_tok = 0
    per = [{"teacher": cfg.teachers[m].name, "teacher_tokens": 0, "one_sided_student_tokens": 0, "one_sided_teacher_tokens": 0} for m in cross]
    for i in range(n):
        doc = as_document(docs[i], i)
        s_tok += int(doc.student_ids.shape[0])
        for r, tv in zip(per, doc.teachers):
            a = tv.alignment
            one = a.one_sided()
            r["teacher_tokens"] += int(tv.ids.shape[0])
            r["one_sided_student_tokens"] += int((a.student_chunks[one, 1] - a.student_chunks[one, 0]).sum())
            r["one_sided_teacher_tokens"] += int((a.teacher_chunks[one, 1] - a.teacher_chunks[one, 0]).sum())
    st = ds.packing_stats()
    warnings = []
    for m, (r, fill) in enumerate(zip(per, st.teacher_fill)):
        r["one_sided_fraction"] = (r["one_sided_student_tokens"] + r["one_sided_teacher_tokens"]) / max(s_tok + r["teacher_tokens"], 1)
        r["tokens_per_student_token"] = r["teacher_tokens"] / max(s_tok, 1)
        r["seq_length"] = ds.teacher_seq_lengths[m]
        r["fill"] = fill
        if ds.packing and st.samples > 1 and st.loss_fraction < 0.95 and fill > 0.97:
            need = int(np.ceil(r["tokens_per_student_token"] * ds.seq_length * 1.05 / 64) * 64)
            warnings.append(
                f"teacher {r['teacher']}: its seq_length {ds.teacher_seq_lengths[m]} is what limits the samples (it has "
                f"{r['tokens_per_student_token']:.3f} tokens per student token here; loss-bearing fraction {st.loss_fraction:.3f}): "
                f"raise teachers.{cross[m]}.seq_length to about {need}"
            )
    chat = _chat_check(docs, per, ds, st) if cfg.data.format in ("chat", "preprocessed") else None
    if chat is not None:
        warnings += chat.pop("warnings")
    if not ds.packing and st.loss_fraction < 0.5 and chat is None:
        warnings.append(f"without packing only {st.loss_fraction:.1%} of the student positions carry a loss: set data.packing: true")
    return {
        "documents_checked": n,
        "student_tokens": s_tok,
        "seq_length": ds.seq_length,
        "packing": ds.packing,
        "samples": st.samples,
        "loss_fraction": st.loss_fraction,
        "split_documents": st.split_documents,
        "teachers": per,
        "warnings": warnings,
        **({"chat": chat} if chat is not None else {}),
    }


def _chat_check(docs: Any, per: list[dict[str, Any]], ds: DualTokenizedDataset, st: PackingStats) -> dict[str, Any] | None:
    """The chat part of the data check: loss-bearing fraction, skipped rows, per teacher the assistant tokens in KD chunks
    and one rendered example per side with its loss mask (None: the documents are no conversations)."""
    from nemo_xtoken.align.chat import masked_text
    from nemo_xtoken.integration.chat_data import chat_sources

    n = len(docs)
    loss = 0
    have_mask = False
    for i in range(n):
        d = as_document(docs[i], i)
        if d.student_loss_mask is not None:
            have_mask = True
            loss += int(np.asarray(d.student_loss_mask[1:]).sum())
    if not have_mask:
        return None
    srcs = chat_sources(docs)
    out: dict[str, Any] = {
        "loss_tokens": loss,
        "loss_fraction": loss / max(st.samples * ds.seq_length, 1),
        "rows_read": sum(s.rows_read for s in srcs),
        "rows_skipped": sum(len(s.skipped) for s in srcs),
        "skipped": [r for s in srcs for _, r in s.skipped][:5],
        "warnings": sorted(set(w for s in srcs for w in s.warnings))[:3],
    }
    for m, r in enumerate(per):
        got = sum(s.coverage[m][0] for s in srcs)
        tot = sum(s.coverage[m][1] for s in srcs)
        r["assistant_tokens_in_kd_chunks"] = got / tot if tot else None
        ex = next((s.examples[m] for s in srcs if s.examples[m] is not None), None)
        if ex is not None:
            r["example"] = {"student": masked_text(ex.student), "teacher": masked_text(ex.teacher)}
    return out


def format_data_check(r: dict[str, Any]) -> str:
    """:func:`check_data`'s report as lines of text."""
    lines = [
        f"data: {r['documents_checked']} documents checked, {r['student_tokens']} student tokens; "
        f"{'packed' if r['packing'] else 'unpacked'} at seq_length {r['seq_length']}: {r['samples']} samples, "
        + (f"positions filled {r['loss_fraction']:.3f} (loss-bearing: below)" if r.get("chat") else f"loss-bearing fraction {r['loss_fraction']:.3f}")
        + f", {r['split_documents']} documents split",
    ]
    for t in r["teachers"]:
        lines.append(
            f"data: teacher {t['teacher']}: {t['teacher_tokens']} tokens ({t['tokens_per_student_token']:.3f} per student token), "
            f"seq_length {t['seq_length']} filled {t['fill']:.3f}; one-sided tokens {t['one_sided_fraction']:.2%} "
            f"(student {t['one_sided_student_tokens']}, teacher {t['one_sided_teacher_tokens']})"
        )
    c = r.get("chat")
    if c is not None:
        lines.append(
            f"data: chat: {c['rows_read']} conversation rows read, {c['rows_skipped']} skipped; loss-bearing (assistant) "
            f"fraction of the student positions {c['loss_fraction']:.3f}"
        )
        lines += [f"data: chat: skipped {x}" for x in c["skipped"]]
        for t in r["teachers"]:
            if t.get("assistant_tokens_in_kd_chunks") is not None:
                lines.append(f"data: chat: teacher {t['teacher']}: {t['assistant_tokens_in_kd_chunks']:.1%} of the assistant tokens in aligned (KD) chunks")
            if "example" in t:
                lines.append(f"data: chat: teacher {t['teacher']}: first conversation, loss-bearing tokens between ⟦ ⟧:")
                lines.append("--- student ---\n" + t["example"]["student"])
                lines.append("--- teacher ---\n" + t["example"]["teacher"])
    lines += [f"data: warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
