"""Offline teachers: a teacher's top-k distribution cached once on disk, distilled from without the teacher.

``sparse`` (:class:`SparseTeacher`: what every loss accepts in place of teacher logits),
``cache`` (the on-disk format, :func:`build_cache` = ``xtoken cache-teacher``, :class:`TeacherCache`),
``hf`` (loading any Hugging Face causal LM, GGUF included; :class:`HFTeacher`, a live HF teacher in
the Megatron loop).  See docs/offline-teachers.md.
"""

from nemo_xtoken.offline.sparse import FLOOR, SparseTeacher, dense_teacher, padded_vocab_size, shard_teacher, sparse_from_logits

__all__ = ["FLOOR", "SparseTeacher", "dense_teacher", "padded_vocab_size", "shard_teacher", "sparse_from_logits"]
