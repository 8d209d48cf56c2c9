"""Offline teachers: a teacher's top-k distribution cached once on disk, distilled from without the teacher.

``cache`` (the on-disk format, :func:`build_cache` = ``xtoken cache-teacher``, :class:`TeacherCache`),
``hf`` (loading any Hugging Face causal LM, GGUF included; :class:`HFTeacher`, a live HF teacher in
the Megatron loop), ``teachers`` (the cached teacher in the Megatron loop).  See docs/offline-teachers.md.

The sparse teacher every loss accepts in place of teacher logits lives with the losses
(:mod:`nemo_xtoken.losses.sparse`; its tensor-parallel sharding :func:`~nemo_xtoken.parallel.comm.shard_teacher`);
its public names are re-exported here, where the docs and users' code import them
(``from nemo_xtoken.offline import SparseTeacher, sparse_from_logits``).
"""

from nemo_xtoken.losses.sparse import FLOOR, SparseTeacher, dense_teacher, padded_vocab_size, sparse_from_logits
from nemo_xtoken.parallel.comm import shard_teacher

__all__ = ["FLOOR", "SparseTeacher", "dense_teacher", "padded_vocab_size", "shard_teacher", "sparse_from_logits"]
