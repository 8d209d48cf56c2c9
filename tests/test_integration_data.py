"""Dual-tokenized dataset: both sides cut to the same text, alignment consistent, deterministic, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.data.packing import DualTokenizedDataset, plan_pieces
from nemo_xtoken.data.documents import PreprocessedDocuments, TextDocuments
from nemo_xtoken.data.batch import aligned_positions_from_batch, collate

TEXTS = [
    "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it.",
    "Hundreds of numbers: 201, 307, 999 and 12 more.\nNew line here.",
    "Short.",
    "The quick brown fox jumps over the lazy dog " * 6 + "then counted 123456 sheep.",
]


@pytest.fixture(scope="module")
def docs(llama3, qwen3):
    return TextDocuments(TEXTS, llama3, qwen3)


def _bytes(tb, ids) -> bytes:
    return b"".join(bytes(tb.buf[tb.start[i] : tb.start[i] + tb.length[i]]) for i in ids)


def _check_sample(x: dict, tbs, tbt, S: int, T: int) -> int:
    """Every chunk with positions on both sides predicts the same bytes on both sides; returns #chunks checked."""
    assert x["tokens"].shape == x["labels"].shape == x["loss_mask"].shape == x["student_chunk_ids"].shape == (S,)
    assert x["teacher_tokens"].shape == x["teacher_chunk_ids"].shape == x["teacher_targets"].shape == (T,)
    assert torch.equal(x["position_ids"], torch.arange(S)) and torch.equal(x["teacher_position_ids"], torch.arange(T))
    lm = x["loss_mask"].bool()
    assert torch.equal(x["student_chunk_ids"][~lm], torch.full_like(x["student_chunk_ids"][~lm], -1))
    # labels are the next tokens
    m = int(lm.sum())
    assert torch.equal(x["labels"][: m - 1], x["tokens"][1:m]) if m > 1 else True
    checked = 0
    for k in range(int(x["n_chunks"])):
        sp = (x["student_chunk_ids"] == k).nonzero().flatten()
        tp = (x["teacher_chunk_ids"] == k).nonzero().flatten()
        if len(sp) and len(tp):
            assert _bytes(tbs, x["labels"][sp].tolist()) == _bytes(tbt, x["teacher_targets"][tp].tolist())
            checked += 1
    return checked


def test_samples_align_chunk_by_chunk(docs, llama3, qwen3):
    from nemo_xtoken.align.core import token_bytes

    tbs, tbt = token_bytes(llama3), token_bytes(qwen3)
    ds = DualTokenizedDataset(docs, seq_length=16, teacher_seq_length=20, seed=0, on_too_long="split")
    assert len(ds) > len(TEXTS)  # long documents were cut
    total = sum(_check_sample(ds[i], tbs, tbt, 16, 20) for i in range(len(ds)))
    assert total > 20


def test_whole_document_matches_alignment_to_positions(docs):
    s_ids, t_ids, a = docs[0]
    S, T = len(s_ids) + 3, len(t_ids) + 5  # fits with padding
    ds = DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=T, shuffle=False)
    x = ds[0]
    ref = a.to_positions(s_ids, t_ids)
    n_s, n_t = len(s_ids), len(t_ids)
    assert torch.equal(x["student_chunk_ids"][: n_s - 1], ref.student_chunk_ids[: n_s - 1])
    assert torch.equal(x["teacher_chunk_ids"][: n_t - 1], ref.teacher_chunk_ids[: n_t - 1])
    assert torch.equal(x["teacher_targets"][: n_t - 1], ref.teacher_targets[: n_t - 1])
    assert (x["student_chunk_ids"][n_s - 1 :] == -1).all() and (x["teacher_chunk_ids"][n_t - 1 :] == -1).all()
    assert torch.equal(x["tokens"][:n_s], torch.as_tensor(s_ids)) and (x["tokens"][n_s:] == 0).all()
    assert torch.equal(x["teacher_tokens"][:n_t], torch.as_tensor(t_ids))
    assert float(x["loss_mask"].sum()) == n_s - 1 and int(x["n_chunks"]) == a.n_chunks


def test_pieces_never_split_chunks_and_fit_budgets(docs):
    for d in range(len(docs)):
        _, _, a = docs[d]
        pieces = plan_pieces(a.student_chunks, a.teacher_chunks, 8, 9, on_too_long="split")
        assert pieces[0][0] == 0 and pieces[-1][1] == a.n_chunks
        assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
        for k0, k1 in pieces:
            assert a.student_chunks[k1 - 1, 1] - a.student_chunks[k0, 0] <= 9
            assert a.teacher_chunks[k1 - 1, 1] - a.teacher_chunks[k0, 0] <= 10


def test_teacher_longer_than_its_maximum_is_an_error(docs):
    # numerals: Qwen3 splits digits, so the teacher side is longer than the student's
    with pytest.raises(XTokenError, match=r"document 0: the teacher side .* more than the teacher's maximum length \+ 1 = 9.*on_too_long: split"):
        DualTokenizedDataset(docs, seq_length=64, teacher_seq_length=8)
    DualTokenizedDataset(docs, seq_length=64, teacher_seq_length=8, on_too_long="split")


def test_deterministic_and_resumable(docs):
    a = DualTokenizedDataset(docs, seq_length=12, teacher_seq_length=16, seed=5, on_too_long="split")
    b = DualTokenizedDataset(docs, seq_length=12, teacher_seq_length=16, seed=5, on_too_long="split")
    c = DualTokenizedDataset(docs, seq_length=12, teacher_seq_length=16, seed=6, on_too_long="split")
    n = len(a)
    stream_a = [a.piece_index(i) for i in range(3 * n)]
    # resume: a fresh dataset asked from position 2n-3 on gives the same samples
    assert [b.piece_index(i) for i in range(2 * n - 3, 3 * n)] == stream_a[2 * n - 3 :]
    for i in (0, n + 1, 2 * n + 2):
        xa, xb = a[i], b[i]
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    assert sorted(stream_a[:n]) == list(range(n)) and sorted(stream_a[n : 2 * n]) == list(range(n))
    assert stream_a[:n] != stream_a[n : 2 * n] or n < 3  # epochs reshuffle
    assert [c.piece_index(i) for i in range(n)] != stream_a[:n]


def test_collate_and_flattened_alignment(docs):
    ds = DualTokenizedDataset(docs, seq_length=16, teacher_seq_length=24, on_too_long="split")
    batch = collate([ds[i] for i in range(3)])
    assert batch["tokens"].shape == (3, 16) and batch["teacher_tokens"].shape == (3, 24)
    ap = aligned_positions_from_batch(batch)
    assert ap.student_chunk_ids.shape == (48,) and ap.teacher_chunk_ids.shape == (72,)
    assert ap.n_chunks == int(batch["n_chunks"].sum())
    # sample 1's chunk 0 is chunk n_chunks[0] of the flattened batch
    n0 = int(batch["n_chunks"][0])
    s1 = batch["student_chunk_ids"][1]
    assert torch.equal(ap.student_chunk_ids[16:32], torch.where(s1 >= 0, s1 + n0, s1))
    assert ap.chunk_mask().sum() > 0


def test_from_jsonl_and_preprocessed(tmp_path, docs, llama3_path, qwen3_path):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    from_file = TextDocuments(p, llama3_path, qwen3_path)
    assert len(from_file) == len(TEXTS)
    assert all(np.array_equal(from_file[i][0], docs[i][0]) and from_file[i][2] == docs[i][2] for i in range(len(TEXTS)))
    from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess

    out = tmp_path / "pre"
    preprocess(str(p), str(out), PreprocessOptions(student_tokenizer=llama3_path, teacher_tokenizer=qwen3_path))
    pre = PreprocessedDocuments(out)
    assert len(pre) == len(TEXTS)
    x1 = DualTokenizedDataset(pre, seq_length=16, teacher_seq_length=24, seed=1, on_too_long="split")
    x2 = DualTokenizedDataset(docs, seq_length=16, teacher_seq_length=24, seed=1, on_too_long="split")
    for i in range(len(x1)):
        a, b = x1[i], x2[i]
        assert all(torch.equal(a[k], b[k]) for k in a), i


def test_bad_jsonl_line_is_named(tmp_path, llama3_path, qwen3_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(XTokenError, match=r"document 1: line 2 has no string field 'text'"):
        TextDocuments(p, llama3_path, qwen3_path)
