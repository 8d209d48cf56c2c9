"""Conversations as documents of the dual-tokenized dataset (``data.format: chat``).

Each row (``{"messages": [...]}`` in a ``.jsonl``/``.parquet`` file) is rendered by the student and
by every cross-tokenizer teacher with its own chat template and aligned
(:func:`nemo_xtoken.align.chat.align_chat`); the :class:`~nemo_xtoken.data.documents.Document`
carries the student's loss mask (assistant contents and end-of-turn tokens, or every token) and,
per teacher, which tokens are in chunks that carry KD.  Packing, cutting and padding are the
dataset's (several conversations per sample, each with exactly the losses it has alone).

Rows that cannot be used (no ``messages``, an unknown role, a template that fails to render) are
skipped and counted, never dropped silently: :attr:`ChatDocuments.skipped` lists them with the
reason, a warning says how many, and a file with no usable row raises.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

from nemo_xtoken.errors import XTokenError

__all__ = ["ChatDocuments", "chat_sources"]


class ChatDocuments:
    """Conversations of a ``.jsonl``/``.parquet`` file (or folder), rendered and aligned with every teacher at construction.

    ``teacher_tokenizer``: one tokenizer or a list (items are then multi-teacher
    :class:`~nemo_xtoken.data.documents.Document`\\ s).  ``student_template`` /
    ``teacher_templates``: chat templates (Jinja file or string) replacing the tokenizers' own (None:
    the ``chat_template`` of ``tokenizer_config.json``).  ``limit``: the first rows only.
    """

    def __init__(
        self,
        path: Any,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        loss_on: str = "assistant",
        student_template: str | None = None,
        teacher_templates: Sequence[str | None] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        from nemo_xtoken.align.chat import align_chat, chat_template
        from nemo_xtoken.data.corpus import read_conversations
        from nemo_xtoken.data.documents import Document, TeacherSide
        from nemo_xtoken.vocab import load_tokenizer

        self.path = str(path)
        multi = isinstance(teacher_tokenizer, (list, tuple))
        teachers = [load_tokenizer(t) for t in (teacher_tokenizer if multi else [teacher_tokenizer])]
        t_templates = list(teacher_templates) if teacher_templates is not None else [None] * len(teachers)
        if len(t_templates) != len(teachers):
            raise XTokenError(f"{len(t_templates)} teacher chat templates for {len(teachers)} teachers")
        S = load_tokenizer(student_tokenizer)
        # a missing or unreadable chat template is said once, before any row
        student_template = chat_template(S, student_template, side="student")
        t_templates = [chat_template(T, tt, side="teacher") for T, tt in zip(teachers, t_templates)]
        self.rows_read = 0
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.coverage = [[0, 0] for _ in teachers]  # per teacher: assistant tokens in KD chunks, assistant tokens
        self.examples: list[Any] = [None] * len(teachers)  # the first ChatAlignment per teacher
        self.source_rows: list[str] = []
        self._docs: list[Any] = []
        for where, row, reason in read_conversations(path, limit):
            self.rows_read += 1
            if row is None:
                self.skipped.append((where, f"{where}: {reason}"))
                continue
            try:
                cas = [align_chat(row, S, T, loss_on=loss_on, student_template=student_template, teacher_template=tt,
                                  template_kwargs=template_kwargs, where=where) for T, tt in zip(teachers, t_templates)]
            except XTokenError as e:
                self.skipped.append((where, str(e)))
                continue
            sides = [TeacherSide(np.asarray(ca.teacher.ids, dtype=np.int64), ca.alignment, student_kd_mask=ca.student_kd_mask(),
                                 teacher_kd_mask=ca.teacher_kd_mask()) for ca in cas]
            for m, ca in enumerate(cas):
                got, tot = ca.assistant_coverage()
                self.coverage[m][0] += got
                self.coverage[m][1] += tot
                if self.examples[m] is None:
                    self.examples[m] = ca
            self.warnings += [w for ca in cas for w in ca.warnings]
            self._docs.append(Document(np.asarray(cas[0].student.ids, dtype=np.int64), sides, cas[0].student.loss.copy()))
            self.source_rows.append(where)
        self.multi = multi
        if not self._docs:
            if self.rows_read == 0:
                raise XTokenError(f"{path} holds no conversations (it is empty or has only blank lines)")
            raise XTokenError(self.nothing_aligned())
        if self.skipped:
            warnings.warn(f"{path}: {len(self.skipped)} of {self.rows_read} conversation rows skipped (first: {self.skipped[0][1]})",
                          stacklevel=2)

    def nothing_aligned(self) -> str:
        """Why no row was used, in one line (reasons counted)."""
        import re

        reasons = Counter(re.sub(r"^.*?(?:line|row) \d+: ", "", r) for _, r in self.skipped)
        top = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(3))
        return f"{self.path}: no conversation aligned: all {self.rows_read} rows were skipped ({top})"

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> Any:
        return self._docs[i]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Student lengths ``[n]`` and teacher lengths ``[n_teachers, n]``."""
        s = np.asarray([d.student_ids.shape[0] for d in self._docs], dtype=np.int64)
        m = len(self._docs[0].teachers) if self._docs else 1
        t = np.asarray([[d.teachers[j].ids.shape[0] for d in self._docs] for j in range(m)], dtype=np.int64).reshape(m, -1)
        return s, t


def chat_sources(source: Any) -> list[ChatDocuments]:
    """The :class:`ChatDocuments` inside a document source (through concatenations and heads)."""
    if isinstance(source, ChatDocuments):
        return [source]
    out: list[ChatDocuments] = []
    for attr in ("parts", "sources"):
        for p in getattr(source, attr, None) or []:
            out += chat_sources(p)
    inner = getattr(source, "source", None)
    if inner is not None:
        out += chat_sources(inner)
    return out
