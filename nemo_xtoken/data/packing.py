"""Lock-step packing: one text, student ids + every teacher's ids + chunk alignments, Megatron-shaped samples.

**Documents** (:mod:`nemo_xtoken.data.documents`).  A document is the student's ids and, per
cross-tokenizer teacher, that teacher's ids and the student ↔ teacher :class:`~nemo_xtoken.align.Alignment`
(:class:`~nemo_xtoken.data.documents.Document`, :class:`~nemo_xtoken.data.documents.TeacherSide`; a plain
``(student_ids, teacher_ids, alignment)`` tuple is a one-teacher document).  A teacher side may carry extra *per-teacher-token* arrays (:attr:`~nemo_xtoken.data.documents.TeacherSide.fields`,
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
another: :func:`~nemo_xtoken.data.batch.attention_inputs` turns them into an attention mask on Megatron's local attention
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
segment's position ids and segment id.  :func:`~nemo_xtoken.data.batch.collate` stacks samples and
:func:`~nemo_xtoken.data.batch.aligned_positions_from_batch` offsets the per-sample chunk ids into one flattened
:class:`~nemo_xtoken.align.AlignedPositions`.

**Several teachers.**  Teacher 0's fields use the plain keys (:data:`TEACHER_KEYS`); teacher ``m``'s
fields the keys given by ``teacher_keys[m]`` (default ``"<key>@<m>"``), which is how
:func:`~nemo_xtoken.integration.bridge.teacher_batches_from_batch` finds them.

**Order.**  Sample ``i`` of the stream is a pure function of ``(seed, i)``: resuming from Megatron's
``consumed_samples`` gives the same samples (each epoch's document order and sample order come from
``numpy.random.default_rng`` seeded with ``(seed, epoch)``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from nemo_xtoken.data.documents import Document, DocumentSource, TeacherSide, as_document, document_lengths
from nemo_xtoken.errors import XTokenError

__all__ = ["STUDENT_KEYS", "TEACHER_KEYS", "SAMPLE_KEYS", "PACKING_KEYS", "TEACHER_PACKING_KEYS", "cut_points", "plan_pieces", "Segment", "PackingStats", "DualTokenizedDataset"]

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
