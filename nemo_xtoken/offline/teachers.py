"""A cached teacher inside ModelOpt's distillation model: no weights, its distribution read from the batch.

:class:`CachedTeacher` takes a teacher's place in the
:class:`~nemo_xtoken.integration.distill.TeacherBundle`: its forward returns the batch's
:class:`~nemo_xtoken.losses.sparse.SparseTeacher` (top-k ids, log-probabilities, rest mass), which
the criterion (:class:`~nemo_xtoken.integration.distill.XTokenLogitsLoss`) passes to the losses in
place of logits.  Nothing of the teacher is in memory but the cached rows of the micro-batch, and
live and cached teachers mix freely in one bundle.

The dataset carries a cached teacher's rows as per-teacher-token fields (:data:`CACHED_TEACHER_KEYS`,
teacher ``m ≥ 1`` with the ``"@m"`` suffix), cut and padded like its ids.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemo_xtoken.errors import XTokenError

__all__ = [
    "CACHED_TEACHER_KEYS", "CachedTeacher", "CachedTeacherDocuments", "cached_teacher_inputs", "is_cached_teacher",
]

#: Batch fields of a cached teacher: ``[B, T, k]`` ids, ``[B, T, k]`` log-probabilities, ``[B, T]`` rest log-mass.
CACHED_TEACHER_KEYS = ("teacher_topk_ids", "teacher_topk_log_probs", "teacher_rest_log_mass")


class CachedTeacher(nn.Module):
    """A teacher read from a cache: ``forward(teacher_topk_ids=…, teacher_topk_log_probs=…, teacher_rest_log_mass=…)``.

    Returns a :class:`~nemo_xtoken.losses.sparse.SparseTeacher` ``[B, T, k]`` over the teacher's
    ``teacher_vocab_size`` ids.  ``vocab_size`` is the padded width the criterion materializes
    (a multiple of the tensor-parallel size; what a Megatron teacher's output layer would have).
    No parameters, no state.
    """

    def __init__(self, teacher_vocab_size: int, padded: int, *, name: str = "cached") -> None:
        super().__init__()
        if padded < teacher_vocab_size:
            raise XTokenError(f"CachedTeacher {name}: padded width {padded} < {teacher_vocab_size} teacher ids")
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.vocab_size = int(padded)
        self.name = name

    def forward(self, teacher_topk_ids: torch.Tensor | None = None, teacher_topk_log_probs: torch.Tensor | None = None,
                teacher_rest_log_mass: torch.Tensor | None = None, **_: Any):
        from nemo_xtoken.losses.sparse import SparseTeacher

        if teacher_topk_ids is None or teacher_topk_log_probs is None or teacher_rest_log_mass is None:
            raise XTokenError(
                f"cached teacher {self.name}: the batch has no cached rows ({', '.join(CACHED_TEACHER_KEYS)}): build the "
                "dataset with the teacher's cache (teachers.N.cache, or CachedTeacherDocuments)"
            )
        return SparseTeacher(teacher_topk_ids.long(), teacher_topk_log_probs.float(), teacher_rest_log_mass.float(), self.teacher_vocab_size)


def is_cached_teacher(module: Any) -> bool:
    """Whether a teacher module is a :class:`CachedTeacher`."""
    return isinstance(module, CachedTeacher)


def cached_teacher_inputs(teacher_batch: dict[str, torch.Tensor], name: str = "cached") -> dict[str, torch.Tensor]:
    """A cached teacher's forward inputs from its batch fields (teacher ``m``'s fields, ``@m`` already stripped)."""
    missing = [k for k in CACHED_TEACHER_KEYS if teacher_batch.get(k) is None]
    if missing:
        raise XTokenError(
            f"cached teacher {name}: the batch lacks {missing} (has {sorted(teacher_batch)}): the dataset must carry the "
            "cache's rows (build it with the teacher's cache)"
        )
    return {k: teacher_batch[k] for k in CACHED_TEACHER_KEYS}


class _Rows:
    """Rows of a memory-mapped cache array read only when sliced, in the dtype the batch carries."""

    __slots__ = ("arr", "dtype")

    def __init__(self, arr: Any, dtype: Any) -> None:
        self.arr, self.dtype = arr, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.arr.shape)

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def __getitem__(self, key: Any) -> Any:
        import numpy as np

        return np.asarray(self.arr[key], dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        import numpy as np

        return np.asarray(self.arr, dtype=dtype or self.dtype)


class CachedTeacherDocuments:
    """The documents of a cached corpus with the cache's rows as per-teacher-token fields (a document source).

    ``cache``: a :class:`~nemo_xtoken.offline.cache.TeacherCache` or its folder; ``corpus``: the
    ``xtoken preprocess`` folder the dataset reads (default: the one the cache was built from), which
    must be the cached text (checked by content hash).  Items are one-teacher
    :class:`~nemo_xtoken.data.documents.Document`\\ s whose teacher side carries the fields
    :data:`CACHED_TEACHER_KEYS` (``[n_teacher_tokens, k+1]`` ids and log-probabilities, ``[n]`` rest
    log-mass, read from the memory-mapped cache only where a sample takes them): the dataset cuts and
    packs them exactly like the teacher's ids and names them with the teacher's key suffix (``@m``).
    """

    def __init__(self, cache: Any, corpus: Any = None) -> None:
        from nemo_xtoken.data.documents import PreprocessedDocuments
        from nemo_xtoken.offline.cache import TeacherCache

        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        if corpus is None:
            corpus = self.cache.corpus_path
        self._docs = PreprocessedDocuments(getattr(corpus, "path", corpus))
        self.corpus = self._docs.corpus
        self.cache.attach(self.corpus)
        self.params = self.corpus.params

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> Any:
        import numpy as np

        from nemo_xtoken.data.documents import Document, TeacherSide

        item = self._docs[i]  # the corpus's ids and (lazily built) alignment
        views = self.cache.views(i)
        fields = {k: _Rows(v, dt) for k, v, dt in zip(CACHED_TEACHER_KEYS, views, (np.int64, np.float32, np.float32))}
        if isinstance(item, Document):  # `xtoken preprocess --chat`: keep the loss and KD masks
            tv = item.teachers[0]
            return Document(item.student_ids, [TeacherSide(tv.ids, tv.alignment, fields, tv.student_kd_mask, tv.teacher_kd_mask)],
                            item.student_loss_mask)
        s, t, a = item
        return Document(s, [TeacherSide(t, a, fields)])

    def lengths(self) -> tuple[Any, Any]:
        """Student and teacher token counts per document (no document loaded)."""
        return self._docs.lengths()

    def source_index(self, i: int) -> int:
        """The input line/row of document ``i``."""
        return self._docs.source_index(i)
