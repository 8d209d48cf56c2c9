"""The demo's data: price look-ups, both tokenizations, alignments, reduced vocabularies, answer masks.

Built once in the parent process (a few seconds) and shared with the training workers by ``fork``.
Everything goes through the plugin's own pipeline: :func:`nemo_xtoken.align.align_batch` (span
alignment of the real tokenizers' segmentations) and
:class:`~nemo_xtoken.integration.data.DualTokenizedDataset` (Megatron-shaped samples with
per-position chunk ids).  Two demo-specific steps follow, identical for every method:

- **vocabulary reduction** (:mod:`nemo_xtoken.demo.vocab_subset`): models keep only the token ids
  the corpus uses (plus, for a teacher, every id a kept student row of W points to), so a tiny
  CPU model does not spend its time on a 128k-row output layer; W is the real W restricted to
  those rows, no row loses mass;
- **answer-only loss**: CE and KD see only the positions that predict the answer and its final
  ``"."`` (the chunks from the answer numeral on).  The question's prices are random, so their
  tokens carry nothing to learn, and they would bury the answer's signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_xtoken.demo.corpus import PRICE_END, Problem, price_problems
from nemo_xtoken.demo.vocab_subset import VocabSubset, reduce_projection

__all__ = ["DemoData", "SideData", "build_demo_data", "numeral_ids", "pad_to"]


def pad_to(n: int, multiple: int = 128) -> int:
    """Megatron-style padded vocabulary width."""
    return -(-n // multiple) * multiple


def numeral_ids(texts: list[str]) -> np.ndarray:
    """Ids whose text is a 1- to 3-digit numeral (optionally after one leading space)."""
    return np.asarray([i for i, t in enumerate(texts) if t.strip(" ").isdigit() and 1 <= len(t.strip(" ")) <= 3], dtype=np.int64)


class _ReducedDocs:
    """A ``DocumentSource`` over aligned documents with ids mapped into the reduced vocabularies."""

    def __init__(self, batch: list, ssub: VocabSubset, tsub: VocabSubset, idx: list[int]) -> None:
        self.docs = []
        for d in idx:
            s, t, a = batch[d]
            self.docs.append((ssub.to_new(s), tsub.to_new(t), a))

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int):
        return self.docs[i]


class Materialized:
    """All samples of a dataset stacked once into tensors (``[N, S]`` per field); ``batch(i, n)`` slices.

    Batches are trimmed to their longest sample on each side (trailing padding carries no loss), so a
    step costs what its problems need.  Sample ``i`` of the stream is the dataset's sample ``i``
    (deterministic order, epochs reshuffled as :class:`DualTokenizedDataset` does).
    """

    _STUDENT = ("tokens", "labels", "loss_mask", "position_ids", "student_chunk_ids", "student_targets")
    _TEACHER = ("teacher_tokens", "teacher_position_ids", "teacher_chunk_ids", "teacher_targets", "teacher_loss_mask")

    def __init__(self, ds: "AnswerOnly") -> None:
        from nemo_xtoken.integration.data import collate

        self.ds = ds
        n = len(ds)
        rows = [ds.sample_of_piece(j) for j in range(n)]
        self.fields = collate(rows)
        self.s_len = torch.tensor([int(r["n_student"]) for r in rows])
        self.t_len = torch.tensor([int(r["n_teacher"]) for r in rows])

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, idx) -> dict[str, torch.Tensor]:
        """The samples at piece indices ``idx``, trimmed to the longest on each side."""
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

    def batch(self, start: int, n: int) -> dict[str, torch.Tensor]:
        """Stream samples ``start … start+n-1`` (the dataset's order) as one trimmed batch."""
        return self.rows([self.ds.ds.piece_index(i) for i in range(start, start + n)])


class AnswerOnly:
    """A :class:`DualTokenizedDataset` view whose loss positions are the answer's only.

    Chunk ids below the document's first answer chunk become ``-1`` on both sides (no KD there) and
    the student's ``loss_mask`` follows; ``teacher_loss_mask`` marks the teacher's answer positions
    (for training a teacher on its own tokens).  ``doc`` is added to each sample.
    """

    def __init__(self, ds: Any, answer_chunk: np.ndarray) -> None:
        self.ds = ds
        self.answer_chunk = answer_chunk

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample_of_piece(self.ds.piece_index(i))

    def sample_of_piece(self, j: int) -> dict[str, torch.Tensor]:
        """Piece ``j`` (= document ``j``: one problem is one piece) with the answer-only masks."""
        p = self.ds.pieces[j]
        s_ids, t_ids, al = self.ds.documents[p.doc]
        x = dict(self.ds._make_sample(s_ids, t_ids, al, p))
        doc = p.doc
        x["n_student"] = torch.tensor(min(len(s_ids), self.ds.seq_length))
        x["n_teacher"] = torch.tensor(min(len(t_ids), self.ds.teacher_seq_length))
        a = int(self.answer_chunk[doc])
        sc, tc = x["student_chunk_ids"], x["teacher_chunk_ids"]
        x["student_chunk_ids"] = torch.where(sc >= a, sc, torch.full_like(sc, -1))
        x["teacher_chunk_ids"] = torch.where(tc >= a, tc, torch.full_like(tc, -1))
        x["loss_mask"] = (x["student_chunk_ids"] >= 0).float() * x["loss_mask"]
        x["teacher_loss_mask"] = (x["teacher_chunk_ids"] >= 0).float()
        x["doc"] = torch.tensor(doc)
        return x


@dataclass
class SideData:
    """One teacher's view of the corpus: the reduced W, both datasets, decoding aids."""

    name: str
    projection: Any  # reduced W [student_subset, teacher_subset]
    subset: VocabSubset
    train: AnswerOnly
    eval: AnswerOnly
    train_m: Materialized
    eval_m: Materialized
    token_texts: list[str]  # reduced id → text
    numerals: np.ndarray  # reduced ids of numeral tokens
    eval_prompts: list[np.ndarray]  # reduced ids of the prompt up to the answer (incl. the space)

    @property
    def vocab_size(self) -> int:
        return self.subset.size


@dataclass
class DemoData:
    """Everything the workers need; see the module docstring."""

    train_problems: list[Problem]
    eval_problems: list[Problem]
    student_subset: VocabSubset
    student_texts: list[str]
    student_numerals: np.ndarray
    student_eval_prompts: list[np.ndarray]
    seq_length: int
    teacher_seq_length: int
    sides: dict[str, SideData] = field(default_factory=dict)

    @property
    def student_vocab_size(self) -> int:
        return self.student_subset.size

    def summary(self) -> dict[str, Any]:
        return {
            "train_problems": len(self.train_problems),
            "eval_problems": len(self.eval_problems),
            "student_vocab": self.student_vocab_size,
            "student_numeral_tokens": int(len(self.student_numerals)),
            "seq_length": self.seq_length,
            "teacher_seq_length": self.teacher_seq_length,
            **{f"{k}_vocab": v.vocab_size for k, v in self.sides.items()},
            **{f"{k}_numeral_tokens": int(len(v.numerals)) for k, v in self.sides.items()},
        }


def _token_texts(tok: Any, subset: VocabSubset) -> list[str]:
    t = tok.tokenizer
    return [t.decode([int(i)], skip_special_tokens=False) for i in subset.kept]


def _prompt_lengths(tok: Any, problems: list[Problem], full_ids: list[np.ndarray]) -> list[int]:
    """Tokens of ``prompt + " "`` — checked to be a prefix of the full text's tokens."""
    encs = tok.tokenizer.encode_batch([p.prompt + " " for p in problems], add_special_tokens=False)
    out = []
    for p, e, ids in zip(problems, encs, full_ids):
        n = len(e.ids)
        if list(ids[:n]) != list(e.ids):
            raise ValueError(f"the prompt of {p.text!r} does not tokenize as a prefix of the full text: adjust the template")
        out.append(n)
    return out


def build_demo_data(
    student_tok: Any,
    teachers: dict[str, tuple[Any, Any]],
    *,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    seq_length: int = 32,
    teacher_seq_length: int = 40,
    min_items: int = 2,
    max_items: int = 3,
) -> DemoData:
    """Problems, alignments and datasets for every teacher (``{name: (tokenizer, full W)}``)."""
    from nemo_xtoken.align import align_batch
    from nemo_xtoken.integration.data import DualTokenizedDataset

    kw = dict(min_items=min_items, max_items=max_items)
    train = price_problems(n_train, seed=seed + 1, **kw)
    seen = {p.text for p in train}
    eval_: list[Problem] = []
    for p in price_problems(20 * n_eval + 100, seed=seed + 2, **kw):  # held out: unseen, no repeats
        if p.text not in seen and len(eval_) < n_eval:
            eval_.append(p)
            seen.add(p.text)
    problems = train + eval_
    texts = [p.text + PRICE_END for p in problems]
    n_tr = len(train)
    batches = {}
    for name, (tok, _) in teachers.items():
        ab = align_batch(texts, student_tok, tok)
        batches[name] = [ab[d] for d in range(len(texts))]  # (student ids, teacher ids, Alignment)
    first = next(iter(batches.values()))
    s_ids = [first[d][0] for d in range(len(texts))]
    ssub = VocabSubset.from_ids(*s_ids)
    s_plen = _prompt_lengths(student_tok, problems, s_ids)
    s_texts = _token_texts(student_tok, ssub)
    data = DemoData(
        train_problems=train,
        eval_problems=eval_,
        student_subset=ssub,
        student_texts=s_texts,
        student_numerals=numeral_ids(s_texts),
        student_eval_prompts=[ssub.to_new(s_ids[n_tr + k][: s_plen[n_tr + k]]) for k in range(len(eval_))],
        seq_length=seq_length,
        teacher_seq_length=teacher_seq_length,
    )
    for name, (tok, W) in teachers.items():
        b = batches[name]
        t_ids = [b[d][1] for d in range(len(texts))]
        red, tsub = reduce_projection(W, ssub, np.concatenate(t_ids))
        t_plen = _prompt_lengths(tok, problems, t_ids)
        # the answer chunk: the chunk of the student's first answer token
        ans = np.asarray([int(b[d][2].student_chunk_ids[s_plen[d]]) for d in range(len(texts))], dtype=np.int64)
        for d in range(len(texts)):  # both sides start the answer at the same chunk
            if int(b[d][2].teacher_chunk_ids[t_plen[d]]) != ans[d]:
                raise ValueError(f"{texts[d]!r}: the answer does not start a chunk on both sides")
        t_texts = _token_texts(tok, tsub)

        def make(idx: list[int], shuffle: bool) -> AnswerOnly:
            ds = DualTokenizedDataset(
                _ReducedDocs(b, ssub, tsub, idx), seq_length=seq_length, teacher_seq_length=teacher_seq_length, seed=seed, shuffle=shuffle
            )
            if ds.num_pieces != len(idx):
                raise ValueError("a problem does not fit seq_length: raise seq_length / teacher_seq_length")
            return AnswerOnly(ds, ans[idx])

        tr, ev = make(list(range(n_tr)), True), make(list(range(n_tr, len(texts))), False)
        data.sides[name] = SideData(
            name=name,
            projection=red,
            subset=tsub,
            train=tr,
            eval=ev,
            train_m=Materialized(tr),
            eval_m=Materialized(ev),
            token_texts=t_texts,
            numerals=numeral_ids(t_texts),
            eval_prompts=[tsub.to_new(t_ids[n_tr + k][: t_plen[n_tr + k]]) for k in range(len(eval_))],
        )
    return data
