"""Span alignment: examples with the real tokenizers, offsets edge cases, storage, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from nemo_xtoken.align import Alignment, align, align_offsets, positions_from_token_chunks
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.vocab import load_tokenizer


def texts(a: Alignment, ids: np.ndarray, side: str, info) -> list[list[str]]:
    chunks = a.student_chunks if side == "s" else a.teacher_chunks
    return [[info.tokenizer.id_to_token(int(i)) for i in ids[x:y]] for x, y in chunks]


def test_llama3_qwen3_numeral_chunk(llama3, qwen3):
    a, s, t = align("In 201 days", llama3, qwen3, return_ids=True)
    assert a.n_chunks == 4
    s_tok, t_tok = texts(a, s, "s", llama3), texts(a, t, "t", qwen3)
    assert s_tok[2] == ["201"] and t_tok[2] == ["2", "0", "1"]
    assert s_tok == [["In"], ["Ġ"], ["201"], ["Ġdays"]]
    assert not a.one_sided().any()
    assert a.spans.tolist() == [[0, 2], [2, 3], [3, 6], [6, 11]]


def test_llama3_bos_adds_one_one_sided_chunk(llama3, qwen3):
    text = "In 201 days, 🎉 and 你好 — x=3.14159!\n"
    base, s0, t0 = align(text, llama3, qwen3, return_ids=True)
    bos, s1, t1 = align(text, llama3, qwen3, student_add_bos=True, return_ids=True)
    assert s1[0] == llama3.tokenizer.token_to_id("<|begin_of_text|>") and np.array_equal(s1[1:], s0)
    assert np.array_equal(t1, t0)
    assert bos.n_chunks == base.n_chunks + 1
    assert bos.student_chunks[0].tolist() == [0, 1] and bos.teacher_chunks[0].tolist() == [0, 0]
    assert bos.one_sided().tolist() == [True] + [False] * base.n_chunks
    np.testing.assert_array_equal(bos.student_chunks[1:], base.student_chunks + 1)
    np.testing.assert_array_equal(bos.teacher_chunks[1:], base.teacher_chunks)
    # the BOS already being there is not added twice
    again = align(text, llama3, qwen3, student_add_bos=True, teacher_add_bos=False)
    assert again == bos


def test_missing_bos_is_reported(llama3, qwen3):
    with pytest.raises(XTokenError, match="no BOS"):
        align("hi", llama3, qwen3, teacher_add_bos=True)


def test_split_multibyte_characters_align_on_bytes(llama3, qwen3, o200k):
    # Llama-3 splits 🎉 into 3 byte tokens, Qwen3 keeps one; 龘 is two byte tokens on both.
    a, s, t = align("🎉x龘", llama3, qwen3, return_ids=True)
    assert a.pairs() == [((0, 3), (0, 1)), ((3, 4), (1, 2)), ((4, 5), (2, 3)), ((5, 6), (3, 4))]
    assert a.spans.tolist() == [[0, 4], [4, 5], [5, 7], [7, 8]]
    b = align("🎉x龘", llama3, o200k)
    assert b.pairs()[:2] == [((0, 2), (0, 1)), ((2, 3), (1, 2))]  # ðŁ İ | ī  vs  ðŁİ | ī: on bytes


def test_normalizer_that_changes_text_is_reported(llama3, qwen3, llama3_path):
    # Qwen3 normalizes to NFC: a decomposed é cannot be aligned on the source text.
    with pytest.raises(XTokenError, match=r"changes the text: token 0 .*text\[0:"):
        align("e\u0301 ok", llama3, qwen3)
    lower = Tokenizer.from_file(llama3_path)
    lower.normalizer = normalizers.Lowercase()
    with pytest.raises(XTokenError, match=r"text\[3:9\] = ' Hello'"):
        align("say Hello", load_tokenizer(lower), qwen3)
    # the same text without the offending span aligns
    assert align("say hello", load_tokenizer(lower), qwen3).n_chunks == 2


def test_special_tokens_in_text_pair_with_their_pieces(llama3, qwen3):
    a, s, t = align("<|endoftext|>hi", llama3, qwen3, return_ids=True)
    assert a.n_chunks == 2 and not a.one_sided().any()
    assert texts(a, t, "t", qwen3)[0] == ["<|endoftext|>"] and len(texts(a, s, "s", llama3)[0]) == 7


def test_empty_text(llama3, qwen3):
    a = align("", llama3, qwen3)
    assert a.n_chunks == 0 and a.student_chunk_ids.size == 0
    b = align("", llama3, qwen3, student_add_bos=True)
    assert b.pairs() == [((0, 1), (0, 0))]


# ---- align_offsets on synthetic offsets ------------------------------------------------------


def test_zero_width_tokens_are_one_sided_chunks_everywhere():
    s = [(0, 0), (0, 2), (2, 4), (4, 4), (4, 6), (6, 6)]  # BOS, ab, cd, <sep>, ef, EOS
    t = [(0, 0), (0, 3), (3, 4), (4, 6), (6, 6), (6, 6)]  # BOS, abc, d, ef, EOS, EOS2
    a = align_offsets(np.array(s), np.array(t))
    assert a.pairs() == [
        ((0, 1), (0, 0)),  # student BOS (student one-sided chunks come first at a gap)
        ((1, 1), (0, 1)),  # teacher BOS
        ((1, 3), (1, 3)),  # "abcd"
        ((3, 4), (3, 3)),  # student <sep>
        ((4, 5), (3, 4)),  # "ef"
        ((5, 6), (4, 4)),
        ((6, 6), (4, 5)),
        ((6, 6), (5, 6)),
    ]
    assert a.one_sided().tolist() == [True, True, False, True, False, True, True, True]
    assert a.spans.tolist() == [[0, 0], [0, 0], [0, 4], [4, 4], [4, 6], [6, 6], [6, 6], [6, 6]]
    assert a.student_chunk_ids.tolist() == [0, 2, 2, 3, 4, 5]
    assert a.teacher_chunk_ids.tolist() == [1, 2, 2, 4, 6, 7]


def test_zero_width_token_inside_a_chunk_stays_in_it():
    s = [(0, 2), (2, 2), (2, 4)]  # a zero-width token between two tokens that the teacher joins
    t = [(0, 4)]
    a = align_offsets(np.array(s), np.array(t))
    assert a.pairs() == [((0, 3), (0, 1))]


def test_one_disagreement_does_not_merge_the_rest():
    # The student has an extra token in the middle, the rest is identical: chunks stay 1:1.
    s = [(0, 1), (1, 2), (2, 2), (2, 3), (3, 4)]
    t = [(0, 1), (1, 2), (2, 3), (3, 4)]
    a = align_offsets(np.array(s), np.array(t))
    assert a.n_chunks == 5 and a.one_sided().sum() == 1
    assert [p for p in a.pairs() if p[0][1] - p[0][0] > 1 or p[1][1] - p[1][0] > 1] == []


def test_overlapping_char_offsets_cut_only_after_the_group():
    # three byte tokens of one character (shared char offsets) vs one token
    a = align_offsets(np.array([(0, 1), (0, 1), (0, 1), (1, 2)]), np.array([(0, 1), (1, 2)]))
    assert a.pairs() == [((0, 3), (0, 1)), ((3, 4), (1, 2))]


@pytest.mark.parametrize(
    "s,t,match",
    [
        ([(0, 2), (2, 4)], [(0, 2), (2, 5)], "do not cover the same text"),
        ([(0, 2)], [], "do not cover the same text"),
        ([(0, 1), (2, 4)], [(0, 1), (1, 4)], "cover different text"),
        ([(1, 2)], [(0, 2)], "cover different text|do not cover"),
    ],
)
def test_offsets_that_cover_different_text_are_reported(s, t, match):
    with pytest.raises(XTokenError, match=match):
        align_offsets(np.array(s).reshape(-1, 2), np.array(t).reshape(-1, 2))


def test_bad_offset_arrays_are_reported():
    with pytest.raises(XTokenError, match=r"student_offsets must be an integer array \[n, 2\].*shape \(3,\)"):
        align_offsets(np.array([1, 2, 3]), np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(XTokenError, match=r"teacher_offsets\[1\] = \(3, 2\)"):
        align_offsets(np.array([(0, 3)]), np.array([(0, 3), (3, 2)]))


def _reference_align(s: list[tuple[int, int]], t: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """A token-by-token walk written for clarity (content tokens contiguous, non-overlapping)."""
    out = []
    i = j = 0
    while i < len(s) or j < len(t):
        # gap moves: zero-width tokens at a chunk boundary, student first
        if i < len(s) and s[i][0] == s[i][1]:
            out.append(((i, i + 1), (j, j)))
            i += 1
            continue
        if j < len(t) and t[j][0] == t[j][1]:
            out.append(((i, i), (j, j + 1)))
            j += 1
            continue
        i0, j0 = i, j
        se, te = s[i][1], t[j][1]
        i += 1
        j += 1
        while se != te:  # extend the side that is behind; zero-width tokens inside are absorbed
            if se < te:
                se = max(se, s[i][1])
                i += 1
            else:
                te = max(te, t[j][1])
                j += 1
        out.append(((i0, i), (j0, j)))
    return out


@st.composite
def tokenizations(draw):
    n = draw(st.integers(0, 40))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=n))) - {n}) if n > 1 else []

    def side():
        pts = [0] + sorted(set(c for c in cuts if draw(st.booleans()))) + [n] if n else [0]
        toks = [(a, b) for a, b in zip(pts[:-1], pts[1:]) if b > a]
        out = []
        for tok in toks + [None]:
            for _ in range(draw(st.integers(0, 1)) if draw(st.integers(0, 4)) == 0 else 0):
                p = out[-1][1] if out else 0
                out.append((p, p))
            if tok is not None:
                out.append(tok)
        return out

    return side(), side()


@settings(max_examples=300, deadline=None)
@given(tokenizations())
def test_align_offsets_matches_a_reference_walk(pair):
    s, t = pair
    a = align_offsets(np.array(s, dtype=np.int64).reshape(-1, 2), np.array(t, dtype=np.int64).reshape(-1, 2))
    assert a.pairs() == _reference_align(s, t)
    # per-token ids agree with the chunk arrays
    for ids, chunks in ((a.student_chunk_ids, a.student_chunks), (a.teacher_chunk_ids, a.teacher_chunks)):
        for k, (x, y) in enumerate(chunks):
            assert (ids[x:y] == k).all()


# ---- storage and positions -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_roundtrip(tmp_path, llama3, qwen3, suffix):
    a = align("In 201 days 🎉", llama3, qwen3, student_add_bos=True)
    p = tmp_path / f"a{suffix}"
    a.save(p)
    b = Alignment.load(p)
    assert b == a and np.array_equal(b.spans, a.spans)


def test_load_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, foo=np.zeros(3))
    with pytest.raises(XTokenError, match="not an alignment file"):
        Alignment.load(p)
    with pytest.raises(XTokenError, match="does not exist"):
        Alignment.load(tmp_path / "missing.npz")
    with pytest.raises(XTokenError, match="non-decreasing"):
        Alignment.from_chunk_ids(np.array([1, 0]), np.array([0, 1]), 2)


def test_to_positions_applies_the_next_token_shift(llama3, qwen3):
    a, s, t = align("In 201 days", llama3, qwen3, student_add_bos=True, return_ids=True)
    pos = a.to_positions(s, t)
    # student tokens: BOS In ' ' 201 ' days' -> chunk ids 0 1 2 3 4; positions predict the next token
    assert pos.student_chunk_ids.tolist() == [1, 2, 3, 4, -1]
    assert pos.student_targets.tolist() == s[1:].tolist() + [0]
    # teacher: In ' ' 2 0 1 ' days' -> chunks 1 2 3 3 3 4 -> shifted 2 3 3 3 4 -1
    assert pos.teacher_chunk_ids.tolist() == [2, 3, 3, 3, 4, -1]
    assert pos.chunk_mask().tolist() == [False, False, True, True, True]  # chunk 0: BOS (one-sided), chunk 1: no predictor
    ref = positions_from_token_chunks(
        torch.tensor(a.student_chunk_ids), torch.tensor(a.teacher_chunk_ids), torch.tensor(s), torch.tensor(t), a.n_chunks
    )
    assert torch.equal(ref.student_chunk_ids, pos.student_chunk_ids)
    masked = a.to_positions(s, t, student_loss_mask=np.array([1, 1, 0, 1, 1]))
    assert masked.student_chunk_ids.tolist() == [1, 2, -1, 4, -1]
    with pytest.raises(XTokenError, match="do not match the alignment"):
        a.to_positions(s[1:], t)


# ---- batches: one vectorized pass over many documents equals document-by-document -------------


@settings(max_examples=100, deadline=None)
@given(st.lists(tokenizations(), max_size=6))
def test_align_offsets_batch_equals_per_document(docs):
    from nemo_xtoken.align import align_offsets_batch

    s_l = [np.array(s, dtype=np.int64).reshape(-1, 2) for s, _ in docs]
    t_l = [np.array(t, dtype=np.int64).reshape(-1, 2) for _, t in docs]
    b = align_offsets_batch(s_l, t_l)
    assert len(b) == len(docs)
    for d in range(len(docs)):
        assert b[d][2] == align_offsets(s_l[d], t_l[d])


def test_align_batch_equals_align_and_names_bad_documents(llama3, qwen3):
    from nemo_xtoken.align import align_batch

    texts = ["In 201 days", "", "🎉x 你好世界龘 é", "e\u0301 bad", 5, "<|endoftext|>hi", "ok then\n\n"]
    b = align_batch(texts, llama3, qwen3, student_add_bos=True, on_error="skip")
    assert b.index.tolist() == [0, 1, 2, 5, 6] and [i for i, _ in b.rejected] == [3, 4]
    assert "changes the text" in b.rejected[0][1] and "not a string" in b.rejected[1][1]
    for d, i in enumerate(b.index):
        s, t, a = b[d]
        ra, rs, rt = align(texts[i], llama3, qwen3, student_add_bos=True, return_ids=True)
        assert a == ra and np.array_equal(s, rs) and np.array_equal(t, rt)
    assert b.one_sided_token_counts() == (5, 0)
    with pytest.raises(XTokenError, match="document 3: .*changes the text"):
        align_batch(texts[:4], llama3, qwen3)
    with pytest.raises(XTokenError, match=r"document 1: the two tokenizations"):
        from nemo_xtoken.align import align_offsets_batch

        align_offsets_batch([np.array([(0, 2)]), np.array([(0, 2)])], [np.array([(0, 2)]), np.array([(0, 1)])])


def test_template_bos_eos_are_one_sided_chunks(llama3_path, llama3, qwen3):
    """A tokenizer whose post-processor adds BOS and EOS: one one-sided chunk at each end."""
    from tokenizers.processors import TemplateProcessing

    from nemo_xtoken.align import align_batch

    tok = Tokenizer.from_file(llama3_path)
    tok.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001)]
    )
    templ = load_tokenizer(tok)
    text = "In 201 days <|end_of_text|> 🎉"  # the EOS text inside is a real (non-zero-width) special token
    base = align(text, llama3, qwen3)
    a, s, t = align(text, templ, qwen3, return_ids=True)
    assert s[0] == 128000 and s[-1] == 128001
    assert a.n_chunks == base.n_chunks + 2
    assert a.one_sided().tolist() == [True] + [False] * base.n_chunks + [True]
    np.testing.assert_array_equal(a.student_chunks[1:-1], base.student_chunks + 1)
    np.testing.assert_array_equal(a.teacher_chunks[1:-1], base.teacher_chunks)
    assert a.spans[-1].tolist() == [len(text.encode()), len(text.encode())]
    b = align_batch([text, "x", text], templ, qwen3)
    assert b[0][2] == a and b[2][2] == a and b[1][2].pairs() == [((0, 1), (0, 0)), ((1, 2), (0, 1)), ((2, 3), (1, 1))]
    # without the template, no one-sided chunk
    assert align(text, templ, qwen3, student_special_tokens=False) == base
