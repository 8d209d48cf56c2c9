"""The demo's data: three corpora, every tokenization, alignments, reduced vocabularies, evaluation prompts.

Built once in the parent process (seconds) and shared with the training workers by ``fork``.
Everything goes through the plugin's own pipeline: :func:`nemo_xtoken.align.align_batch` (span
alignment of the real tokenizers' segmentations) and
:class:`~nemo_xtoken.data.packing.DualTokenizedDataset` (Megatron-shaped samples with
per-position chunk ids, every token of a story in the loss).  One demo-specific step follows,
identical for every method: **vocabulary reduction** (:mod:`nemo_xtoken.demo.vocab_subset`):
models keep only the token ids the corpora use (plus, for a teacher, every id a kept student row
of W points to), so a tiny CPU model does not spend its time on a 128k-row output layer; W is the
real W restricted to those rows, no row loses mass.

One story is one sample (``seq_length`` is chosen so that none is cut), so the student side of
every teacher's dataset is the same sequence of samples: a student with two teachers reads one
batch and hands each teacher its own ids and alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_xtoken.demo.corpus import Story
from nemo_xtoken.demo.vocab_subset import VocabSubset, reduce_projection
from nemo_xtoken.errors import XTokenError

__all__ = ["DemoData", "SideData", "Samples", "EvalPrompts", "build_demo_data", "token_category", "pad_to", "CATEGORIES"]

#: next-token categories of the evaluation (by the text of the target token)
CATEGORIES = ("numeral", "word", "other")


def pad_to(n: int, multiple: int = 128) -> int:
    """Megatron-style padded vocabulary width."""
    return -(-n // multiple) * multiple


def token_category(text: str) -> str:
    """``numeral`` (digits, optionally after spaces), ``word`` (letters, optionally after one space) or ``other``."""
    t = text.lstrip(" ")
    if t.isdigit():
        return "numeral"
    if t.isalpha() and t.isascii() and len(text) - len(t) <= 1:
        return "word"
    return "other"


class _Docs:
    """A ``DocumentSource`` over aligned documents with ids mapped into the reduced vocabularies."""

    def __init__(self, docs: list[tuple[np.ndarray, np.ndarray, Any]]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int):
        return self.docs[i]


class Samples:
    """All samples of one corpus for one teacher, stacked once into ``[N, S]`` tensors.

    ``rows(idx)`` returns the samples ``idx`` trimmed to their longest member on each side (padding
    carries no loss, so a step costs what its stories need) with ``teacher_loss_mask`` (the
    teacher's own next-token positions) added.  ``order(seed)`` is the sample stream of
    :class:`~nemo_xtoken.data.packing.DualTokenizedDataset` with that seed: equal for every
    teacher of the same corpus, so the students of one seed read the same stories in the same order.
    """

    _STUDENT = ("tokens", "labels", "loss_mask", "position_ids", "student_chunk_ids", "student_targets")
    _TEACHER = ("teacher_tokens", "teacher_position_ids", "teacher_chunk_ids", "teacher_targets", "teacher_loss_mask")

    def __init__(self, docs: list[tuple[np.ndarray, np.ndarray, Any]], seq_length: int, teacher_seq_length: int) -> None:
        from nemo_xtoken.data.packing import DualTokenizedDataset
        from nemo_xtoken.data.batch import collate

        self._docs = _Docs(docs)
        self.seq_length, self.teacher_seq_length = seq_length, teacher_seq_length
        ds = DualTokenizedDataset(self._docs, seq_length=seq_length, teacher_seq_length=teacher_seq_length, shuffle=False)
        if ds.num_pieces != len(docs):
            raise XTokenError(f"a story does not fit seq_length {seq_length} / teacher_seq_length {teacher_seq_length}: raise them")
        rows = [ds[j] for j in range(len(docs))]
        self.fields = collate(rows)
        self.s_len = torch.tensor([min(len(d[0]), seq_length) for d in docs])
        self.t_len = torch.tensor([min(len(d[1]), teacher_seq_length) for d in docs])
        T = self.fields["teacher_tokens"].shape[1]
        self.fields["teacher_loss_mask"] = (torch.arange(T)[None] < (self.t_len - 1)[:, None]).float()
        self._orders: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.s_len.shape[0])

    def rows(self, idx) -> dict[str, torch.Tensor]:
        """The samples at ``idx``, trimmed to the longest on each side."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        S = int(self.s_len[idx].max())
        T = int(self.t_len[idx].max())
        out = {}
        for k, v in self.fields.items():
            if k in self._STUDENT:
                out[k] = v[idx, :S]
            elif k in self._TEACHER:
                out[k] = v[idx, :T]
            else:
                out[k] = v[idx]
        return out

    def order(self, seed: int):
        """The dataset whose ``piece_index(i)`` is sample ``i`` of the stream for ``seed``."""
        from nemo_xtoken.data.packing import DualTokenizedDataset

        ds = self._orders.get(seed)
        if ds is None:
            ds = DualTokenizedDataset(self._docs, seq_length=self.seq_length, teacher_seq_length=self.teacher_seq_length, seed=seed, shuffle=True)
            self._orders[seed] = ds
        return ds

    def batch(self, start: int, n: int, seed: int) -> dict[str, torch.Tensor]:
        """Stream samples ``start … start+n-1`` of the order for ``seed`` as one trimmed batch."""
        ds = self.order(seed)
        return self.rows([ds.piece_index(i) for i in range(start, start + n)])


class TeacherSamples:
    """A teacher's own tokenization of the teachers' corpus (no student side, no alignment: it trains on CE).

    Same batch interface as :class:`Samples` for the teacher fields; the order of a seed is one
    permutation per epoch drawn from ``numpy.random.default_rng((seed, epoch))``, as
    :class:`~nemo_xtoken.data.packing.DualTokenizedDataset` draws it.
    """

    def __init__(self, ids: list[np.ndarray], teacher_seq_length: int) -> None:
        n = len(ids)
        too_long = [i for i, x in enumerate(ids) if len(x) > teacher_seq_length + 1]
        if too_long:
            raise XTokenError(f"teacher story {too_long[0]} has {len(ids[too_long[0]])} tokens, more than teacher_seq_length + 1: raise it")
        T = teacher_seq_length
        tok = torch.zeros(n, T, dtype=torch.long)
        tgt = torch.zeros(n, T, dtype=torch.long)
        for i, x in enumerate(ids):
            x = torch.as_tensor(x, dtype=torch.long)
            m = min(len(x), T)
            tok[i, :m] = x[:m]
            tgt[i, : len(x) - 1] = x[1:]
        self.t_len = torch.tensor([min(len(x), T) for x in ids])
        self.fields = {
            "teacher_tokens": tok,
            "teacher_targets": tgt,
            "teacher_loss_mask": (torch.arange(T)[None] < (torch.tensor([len(x) for x in ids]) - 1)[:, None]).float(),
            "teacher_position_ids": torch.arange(T).expand(n, T).contiguous(),
        }
        self._perm: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.t_len.shape[0])

    def rows(self, idx) -> dict[str, torch.Tensor]:
        """The samples at ``idx``, trimmed to the longest."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        T = int(self.t_len[idx].max())
        return {k: v[idx, :T] for k, v in self.fields.items()}

    def _index(self, i: int, seed: int) -> int:
        epoch, j = divmod(int(i), len(self))
        if self._perm is None or self._perm[:2] != (seed, epoch):
            self._perm = (seed, epoch, np.random.default_rng((seed, epoch)).permutation(len(self)))
        return int(self._perm[2][j])

    def batch(self, start: int, n: int, seed: int) -> dict[str, torch.Tensor]:
        """Stream samples ``start … start+n-1`` of the order for ``seed`` as one trimmed batch."""
        return self.rows([self._index(i, seed) for i in range(start, start + n)])


@dataclass
class EvalPrompts:
    """Greedy-decoding prompts of one tokenization: the ids before each held-out answer."""

    ids: list[np.ndarray]  # reduced ids of the text before the answer (ends with the space token)
    answers: list[str]  # the answer's digits
    kinds: list[str]  # Answer.kind


@dataclass
class SideData:
    """One teacher's view of the corpora: the reduced W, the samples, decoding aids."""

    name: str
    projection: Any  # reduced W [student_subset, teacher_subset]; None for the student's own tokenizer
    subset: VocabSubset
    teacher_train: TeacherSamples  # the teachers' corpus in this teacher's tokenization
    student_train: Samples  # the students' corpus
    eval: Samples  # held-out stories
    token_texts: list[str]  # reduced id → text
    prompts: EvalPrompts  # this tokenizer's prompts (the teacher's own evaluation)
    spellings: Any = None  # partition-KL: both vocabularies' spellings in the reduced ids (set by run_demo when used)

    @property
    def vocab_size(self) -> int:
        return self.subset.size


@dataclass
class DemoData:
    """Everything the workers need; see the module docstring."""

    teacher_stories: list[Story]
    student_stories: list[Story]
    eval_stories: list[Story]
    student_subset: VocabSubset
    student_texts: list[str]
    student_prompts: EvalPrompts
    seq_length: int
    teacher_seq_length: int
    sides: dict[str, SideData] = field(default_factory=dict)

    @property
    def student_vocab_size(self) -> int:
        return self.student_subset.size

    def common_set_coverage(self) -> dict[str, dict[str, float]]:
        """Per teacher with a W: the fraction of the students' training tokens (and of its numeral tokens)
        whose W row is an exact match — GOLD's common set; the rest is where GOLD and H-KL differ."""
        from nemo_xtoken.vocab.projection import ROW_EXACT

        out: dict[str, dict[str, float]] = {}
        for name, side in self.sides.items():
            if side.projection is None:
                continue
            f = side.student_train.fields
            ids = f["tokens"][f["loss_mask"] > 0]  # every trained token (inputs; the same multiset as the labels but the first)
            exact = torch.from_numpy(side.projection.row_kind == ROW_EXACT)[ids]
            num = torch.tensor([token_category(self.student_texts[int(i)]) == "numeral" for i in ids])
            out[name] = {
                "exact_token_fraction": float(exact.float().mean()),
                "exact_numeral_fraction": float(exact[num].float().mean()) if bool(num.any()) else float("nan"),
            }
        return out

    def summary(self) -> dict[str, Any]:
        """Sizes of everything, for the JSON report."""
        s = next(iter(self.sides.values()))
        return {
            "teacher_stories": len(self.teacher_stories),
            "student_stories": len(self.student_stories),
            "eval_stories": len(self.eval_stories),
            "eval_answers": len(self.student_prompts.answers),
            "student_tokens": int(s.student_train.s_len.sum()),
            "student_loss_tokens": int(s.student_train.fields["loss_mask"].sum()),
            "student_vocab": self.student_vocab_size,
            "seq_length": self.seq_length,
            "teacher_seq_length": self.teacher_seq_length,
            **{f"{k}_vocab": v.vocab_size for k, v in self.sides.items()},
            **{f"{k}_teacher_tokens": int(v.teacher_train.t_len.sum()) for k, v in self.sides.items()},
            "common_set": self.common_set_coverage(),
        }


def _token_texts(tok: Any, subset: VocabSubset) -> list[str]:
    t = tok.tokenizer
    return [t.decode([int(i)], skip_special_tokens=False) for i in subset.kept]


def _prompts(tok: Any, stories: list[Story], full_ids: list[np.ndarray], sub: VocabSubset) -> EvalPrompts:
    """Each answer's prompt ids — checked to be a prefix of the story's own tokenization."""
    items = [(s, a) for s in stories for a in s.answers]
    docs = [d for d, s in enumerate(stories) for _ in s.answers]
    encs = tok.tokenizer.encode_batch([s.prompt(a) for s, a in items], add_special_tokens=False)
    ids = []
    for (s, a), e, d in zip(items, encs, docs):
        n = len(e.ids)
        if list(full_ids[d][:n]) != list(e.ids):
            raise XTokenError(f"the text before the answer of {s.text!r} does not tokenize as a prefix of the story: change the template")
        ids.append(sub.to_new(e.ids))
    return EvalPrompts(ids, [s.value(a) for s, a in items], [a.kind for _, a in items])


def build_demo_data(
    student_tok: Any,
    teachers: dict[str, tuple[Any, Any]],
    teacher_stories: list[Story],
    student_stories: list[Story],
    eval_stories: list[Story],
    *,
    seq_length: int,
    teacher_seq_length: int,
) -> DemoData:
    """Alignments and samples of the three corpora for every teacher (``{name: (tokenizer, full W or None)}``).

    A teacher with the student's tokenizer (``W`` None) keeps exactly the student's reduced
    vocabulary, so its logits and the student's share one id space (plain KL).
    """
    from nemo_xtoken.align import align_batch

    texts = [s.text for s in student_stories + eval_stories]
    n_st = len(student_stories)
    t_texts = [s.text for s in teacher_stories]
    batches, own = {}, {}
    for name, (tok, W) in teachers.items():
        if W is None and tok.fingerprint != student_tok.fingerprint:
            raise XTokenError(f"teacher {name}: no W given, but its tokenizer is not the student's: build W for it")
        ab = align_batch(texts, student_tok, tok)
        batches[name] = [ab[d] for d in range(len(texts))]  # (student ids, teacher ids, Alignment)
        # the teachers' corpus: this teacher's tokenization only (it trains on CE), template as align_batch
        own[name] = [np.asarray(e.ids, dtype=np.int64) for e in tok.tokenizer.encode_batch(t_texts, add_special_tokens=True)]
    first = next(iter(batches.values()))
    s_ids = [first[d][0] for d in range(len(texts))]
    # a same-tokenizer teacher shares the student's id space, so it includes that teacher's corpus
    ssub = VocabSubset.from_ids(*s_ids, *[x for n, (_, W) in teachers.items() if W is None for x in own[n]])
    data = DemoData(
        teacher_stories=teacher_stories,
        student_stories=student_stories,
        eval_stories=eval_stories,
        student_subset=ssub,
        student_texts=_token_texts(student_tok, ssub),
        student_prompts=_prompts(student_tok, eval_stories, s_ids[n_st:], ssub),
        seq_length=seq_length,
        teacher_seq_length=teacher_seq_length,
    )
    for name, (tok, W) in teachers.items():
        b = batches[name]
        t_ids = [b[d][1] for d in range(len(texts))]
        if W is None:
            red, tsub = None, ssub
        else:
            red, tsub = reduce_projection(W, ssub, np.concatenate(t_ids + own[name]))
        docs = [(ssub.to_new(b[d][0]), tsub.to_new(b[d][1]), b[d][2]) for d in range(len(texts))]
        data.sides[name] = SideData(
            name=name,
            projection=red,
            subset=tsub,
            teacher_train=TeacherSamples([tsub.to_new(x) for x in own[name]], teacher_seq_length),
            student_train=Samples(docs[:n_st], seq_length, teacher_seq_length),
            eval=Samples(docs[n_st:], seq_length, teacher_seq_length),
            token_texts=_token_texts(tok, tsub),
            prompts=_prompts(tok, eval_stories, t_ids[n_st:], tsub),
        )
    return data
