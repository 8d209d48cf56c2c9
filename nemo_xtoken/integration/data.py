"""Dual-tokenized dataset: one text, student ids + teacher ids + chunk alignment, Megatron-shaped samples.

**Windows.**  A document is cut into *pieces* at chunk boundaries only (a chunk is never split
across a cut): a piece holds at most ``seq_length + 1`` student tokens and, on the teacher side,
at most ``teacher_seq_length + 1`` tokens.  As in Megatron's GPT dataset a piece of ``L + 1``
tokens gives ``tokens = piece[:-1]`` and ``labels = piece[1:]``; the teacher side is cut to the
same chunks, so both sides cover exactly the same text span.  Pieces do not overlap, so the first
chunk of each piece has no predicting position and takes no part in the KD loss (CE loses one
label per piece, like non-overlapping Megatron samples).

**Too long for the teacher.**  Pieces are chosen by the student budget; when a piece's teacher
side exceeds ``teacher_seq_length + 1`` tokens, ``on_too_long="error"`` raises
:class:`~nemo_xtoken.errors.XTokenError` naming the document (before any model runs: the index
is built at construction), ``"split"`` cuts the piece further at chunk boundaries.

**Padding.**  Student fields are padded to ``seq_length``, teacher fields to ``teacher_seq_length``
(pad id, ``loss_mask`` 0, chunk id ``-1``), so batches stack and both sides keep their own fixed
length.  Chunk ids are local to the sample (``0 … n_chunks-1``); :func:`collate` stacks samples and
:func:`aligned_positions_from_batch` offsets the ids into one flattened
:class:`~nemo_xtoken.align.AlignedPositions` (``[B*S]`` student, ``[B*T]`` teacher positions).

**Order.**  Sample ``i`` of the stream is a pure function of ``(seed, i)``: each epoch is a
permutation of all pieces drawn from ``numpy.random.default_rng((seed, epoch))``, so training
resumes exactly from the number of consumed samples (Megatron's ``consumed_samples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError

__all__ = [
    "DocumentSource",
    "TextDocuments",
    "PreprocessedDocuments",
    "DualTokenizedDataset",
    "plan_pieces",
    "collate",
    "aligned_positions_from_batch",
    "SAMPLE_KEYS",
    "STUDENT_KEYS",
    "TEACHER_KEYS",
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


class DocumentSource(Protocol):
    """Anything indexable giving ``(student_ids, teacher_ids, Alignment)`` per document.

    A 4th element, ``{name: array [n_teacher_tokens, ...]}``, adds per-teacher-token fields to the
    samples (cut and zero-padded like ``teacher_tokens``): a cached teacher's rows.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, Any]: ...


class TextDocuments:
    """Documents from texts (a list, a ``.jsonl`` or a ``.parquet`` file), aligned once at construction.

    For large corpora run ``xtoken preprocess`` and use :class:`PreprocessedDocuments`; this class
    aligns every text in memory (fine for tests and small runs).  Texts that cannot be aligned
    raise, naming the document.
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
    ) -> None:
        from nemo_xtoken.align import align

        if isinstance(texts, (str, Path)):
            from nemo_xtoken.align.preprocess import iter_documents

            items = []
            for i, text, reason in iter_documents(texts, text_key):
                if text is None:
                    raise XTokenError(f"{texts}: document {i}: {reason}")
                items.append(text)
            texts = items
        self._docs: list[tuple[np.ndarray, np.ndarray, Any]] = []
        for i, text in enumerate(texts):
            try:
                a, s, t = align(text, student_tokenizer, teacher_tokenizer, student_add_bos=student_add_bos, teacher_add_bos=teacher_add_bos, return_ids=True)
            except XTokenError as e:
                raise XTokenError(f"document {i} cannot be aligned: {e}") from None
            self._docs.append((np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64), a))

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, Any]:
        return self._docs[i]


class PreprocessedDocuments:
    """Documents from an ``xtoken preprocess`` output folder (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        from nemo_xtoken.align.preprocess import PreprocessedCorpus

        self.corpus = PreprocessedCorpus(path)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, Any]:
        s, t, a = self.corpus[i]
        return s.astype(np.int64), t.astype(np.int64), a


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


@dataclass(frozen=True)
class _Piece:
    doc: int
    k0: int
    k1: int


class DualTokenizedDataset:
    """Megatron-compatible samples of two tokenizations of the same text with their alignment.

    ``dataset[i]`` (``i`` any non-negative integer: the stream position) is a dict of tensors:
    ``tokens``, ``labels``, ``loss_mask`` (float), ``position_ids`` ``[seq_length]``;
    ``teacher_tokens``, ``teacher_position_ids`` ``[teacher_seq_length]``; per-position alignment
    ``student_chunk_ids``/``student_targets`` ``[seq_length]``, ``teacher_chunk_ids``/
    ``teacher_targets`` ``[teacher_seq_length]`` (next-token shift applied, ``-1`` = no chunk),
    and ``n_chunks`` (scalar).  See the module docstring for cutting, padding and order.
    """

    def __init__(
        self,
        documents: DocumentSource,
        *,
        seq_length: int,
        teacher_seq_length: int,
        seed: int = 1234,
        pad_id: int = 0,
        teacher_pad_id: int = 0,
        on_too_long: str = "error",
        shuffle: bool = True,
    ) -> None:
        if seq_length < 1 or teacher_seq_length < 1:
            raise XTokenError(f"seq_length and teacher_seq_length must be ≥ 1, got {seq_length}, {teacher_seq_length}")
        self.documents = documents
        self.seq_length = int(seq_length)
        self.teacher_seq_length = int(teacher_seq_length)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.teacher_pad_id = int(teacher_pad_id)
        self.shuffle = shuffle
        pieces: list[_Piece] = []
        for d in range(len(documents)):
            a = documents[d][2]
            for k0, k1 in plan_pieces(a.student_chunks, a.teacher_chunks, self.seq_length, self.teacher_seq_length, on_too_long=on_too_long, doc=d):
                pieces.append(_Piece(d, k0, k1))
        if not pieces:
            raise XTokenError("the dataset has no documents: check the input files")
        self.pieces = pieces
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def num_pieces(self) -> int:
        """Samples per epoch."""
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def piece_index(self, i: int) -> int:
        """Which piece the ``i``-th sample of the stream is (deterministic in ``(seed, i)``)."""
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        n = len(self.pieces)
        epoch, j = divmod(int(i), n)
        if not self.shuffle:
            return j
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
            self._perm_cache = {epoch: perm}  # keep one epoch: constant memory
        return int(perm[j])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.pieces[self.piece_index(i)]
        item = self.documents[p.doc]
        sample = self._make_sample(*item[:3], p)
        if len(item) > 3:  # per-teacher-token fields (a cached teacher's rows): cut and padded like teacher_tokens
            a, T = item[2], self.teacher_seq_length
            t0, t1 = int(a.teacher_chunks[p.k0, 0]), int(a.teacher_chunks[p.k1 - 1, 1])
            for name, arr in item[3].items():
                rows = np.asarray(arr[t0 : min(t1, t0 + T)])
                out = np.zeros((T, *rows.shape[1:]), dtype=rows.dtype)
                out[: rows.shape[0]] = rows
                sample[name] = torch.from_numpy(out)
        return sample

    def _make_sample(self, s_ids: np.ndarray, t_ids: np.ndarray, a: Any, p: _Piece) -> dict[str, torch.Tensor]:
        S, T = self.seq_length, self.teacher_seq_length
        s0, s1 = int(a.student_chunks[p.k0, 0]), int(a.student_chunks[p.k1 - 1, 1])
        t0, t1 = int(a.teacher_chunks[p.k0, 0]), int(a.teacher_chunks[p.k1 - 1, 1])
        sp, tp = np.asarray(s_ids[s0:s1], dtype=np.int64), np.asarray(t_ids[t0:t1], dtype=np.int64)
        sc = np.asarray(a.student_chunk_ids[s0:s1], dtype=np.int64) - p.k0  # per token, local ids
        tc = np.asarray(a.teacher_chunk_ids[t0:t1], dtype=np.int64) - p.k0
        n_s, n_t = sp.shape[0], tp.shape[0]  # ≤ S + 1, ≤ T + 1
        # next-token shift: position q predicts token q+1 of the piece
        tokens = np.full(S, self.pad_id, np.int64)
        labels = np.full(S, self.pad_id, np.int64)
        loss_mask = np.zeros(S, np.float32)
        s_chunk = np.full(S, -1, np.int64)
        m_s = max(n_s - 1, 0)
        tokens[: min(n_s, S)] = sp[: min(n_s, S)]
        labels[:m_s] = sp[1:]
        loss_mask[:m_s] = 1.0
        s_chunk[:m_s] = sc[1:]
        t_tokens = np.full(T, self.teacher_pad_id, np.int64)
        t_targets = np.zeros(T, np.int64)
        t_chunk = np.full(T, -1, np.int64)
        m_t = max(n_t - 1, 0)
        t_tokens[: min(n_t, T)] = tp[: min(n_t, T)]
        t_targets[:m_t] = tp[1:]
        t_chunk[:m_t] = tc[1:]
        s_targets = labels.copy()
        s_targets[m_s:] = 0
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(S, dtype=torch.long),
            "teacher_tokens": torch.from_numpy(t_tokens),
            "teacher_position_ids": torch.arange(T, dtype=torch.long),
            "student_chunk_ids": torch.from_numpy(s_chunk),
            "teacher_chunk_ids": torch.from_numpy(t_chunk),
            "student_targets": torch.from_numpy(s_targets),
            "teacher_targets": torch.from_numpy(t_targets),
            "n_chunks": torch.tensor(p.k1 - p.k0, dtype=torch.long),
        }


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
