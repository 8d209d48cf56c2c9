"""Vocabulary bridge: canonical strings, W (examples, Table 8, identity, determinism), file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemo_xtoken.errors import ProjectionFileError, TokenizerLoadError, XTokenError
from nemo_xtoken.vocab import audit, build_projection, canonical_vocab, load_projection, load_tokenizer
from nemo_xtoken.vocab.canonical import SPECIAL_ALIASES, bytes_to_unicode
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_MULTI, ROW_NO_TOKEN, _multi_weights


def _row(proj, scv, tcv, text):
    (s,) = scv.lookup(text)
    return [(tcv.display(t), round(w, 4)) for t, w in proj.row(s)]


# ---- canonical strings ---------------------------------------------------------------------------


def test_byte_table_is_a_bijection_over_all_256_bytes():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_byte_table_is_hugging_faces():
    """The test oracles (tests/test_align_properties.py, tests/test_tokenizer_families.py) use this table: it is
    checked here against Hugging Face's own, written independently of the package."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

    assert bytes_to_unicode() == hf_bytes_to_unicode()


def test_byte_level_tokens_decode_to_their_bytes(llama3, qwen3):
    cv = canonical_vocab(llama3)
    assert cv.family == "byte_level"
    (the,) = [i for i, r in enumerate(cv.raw) if r == "Ġthe"]
    assert cv.text[the] == b" the"
    (nl,) = [i for i, r in enumerate(cv.raw) if r == "Ċ"]
    assert cv.text[nl] == b"\n"
    # Partial UTF-8 sequences stay bytes, never U+FFFD.
    partial = [t for t in cv.text if t is not None and not _is_utf8(t)]
    assert len(partial) > 100
    assert all(b"\xef\xbf\xbd" not in t for t in partial)
    assert canonical_vocab(qwen3).lookup("201") == []  # Qwen3 splits digits: no multi-digit tokens


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_special_tokens_of_two_families_share_canonical_names(llama3, qwen3, o200k):
    lv, qv, ov = canonical_vocab(llama3), canonical_vocab(qwen3), canonical_vocab(o200k)
    assert lv.special[lv.raw.index("<|end_of_text|>")] == "<eos>"
    assert qv.special[qv.raw.index("<|endoftext|>")] == "<eos>"
    assert ov.special[ov.raw.index("<|endoftext|>")] == "<eos>"
    assert lv.special[lv.raw.index("<|begin_of_text|>")] == "<bos>"
    assert lv.special[lv.raw.index("<|eot_id|>")] == qv.special[qv.raw.index("<|im_end|>")] == "<eot>"
    assert SPECIAL_ALIASES["<s>"] == "<bos>" and SPECIAL_ALIASES["</s>"] == "<eos>"


def test_o200k_has_gaps_in_its_id_space(o200k):
    cv = canonical_vocab(o200k)
    assert cv.size == 200019  # ids 200000…200017 stand for no token, <|endofprompt|> is 200018
    assert cv.text[200005] is None and cv.special[200005] is None
    assert cv.special[200018] == "<|endofprompt|>"


def _sentencepiece_tokenizer(tmp_path):
    """A small SentencePiece-style BPE (Metaspace, byte fallback), as Llama-2/Mistral tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "t", "h", "e", "▁t", "▁th", "▁the", "1", "2", "0", "▁1", "H", "u", "n", "d"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "1")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    path = tmp_path / "sp" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_sentencepiece_pieces_and_byte_fallback(tmp_path):
    info = load_tokenizer(_sentencepiece_tokenizer(tmp_path))
    cv = canonical_vocab(info)
    assert cv.family == "sentencepiece"
    assert cv.text[info.vocab["▁the"]] == b" the"
    assert cv.text[info.vocab["<0x41>"]] == b"A"
    assert cv.text[info.vocab["<0xE4>"]] == b"\xe4"  # a partial UTF-8 byte stays a byte
    assert cv.special[info.vocab["<s>"]] == "<bos>" and cv.special[info.vocab["</s>"]] == "<eos>"


def test_sentencepiece_student_against_byte_level_teacher(tmp_path, llama3):
    sp = load_tokenizer(_sentencepiece_tokenizer(tmp_path))
    proj = build_projection(sp, llama3)
    scv, tcv = canonical_vocab(sp), canonical_vocab(llama3)
    assert _row(proj, scv, tcv, " the") == [(" the", 1.0)]
    assert _row(proj, scv, tcv, "A") == [("A", 1.0)]
    (bos,) = [i for i, s in enumerate(scv.special) if s == "<bos>"]
    assert [tcv.display(t) for t, _ in proj.row(bos)] == ["<|begin_of_text|>"]


# ---- W: the paper's examples, identity, structure -------------------------------------------------


def test_hundreds_maps_to_hund_reds_under_o200k(llama3, o200k, w_llama3_o200k):
    assert _row(w_llama3_o200k, canonical_vocab(llama3), canonical_vocab(o200k), "Hundreds") == [
        ("Hund", 0.9091),
        ("reds", 0.0909),
    ]


def test_201_maps_to_its_digits_under_qwen3(llama3, qwen3, w_llama3_qwen3):
    assert _row(w_llama3_qwen3, canonical_vocab(llama3), canonical_vocab(qwen3), "201") == [
        ("2", 0.9009),
        ("0", 0.0901),
        ("1", 0.009),
    ]
    # …and stays whole under o200k, where numerals are single tokens as in Llama-3.


def test_multi_token_weights_follow_beta_gamma():
    for ids, want in [
        ([7, 8], [0.909091, 0.090909]),
        ([7, 8, 9], [0.900901, 0.09009, 0.009009]),
        ([7, 8, 9, 10], [0.9, 0.09, 0.009, 0.0009]),
    ]:
        got = _multi_weights(ids, 0.1, 4)
        assert [t for t, _ in got] == ids
        np.testing.assert_allclose([w for _, w in got], want, atol=1e-4)  # DESIGN.md quotes these to 4 decimals (L=4: 0.90009 → "0.9000")
        exact = [0.9 * 0.1**i for i in range(len(ids))]
        np.testing.assert_allclose([w for _, w in got], np.array(exact) / sum(exact), rtol=1e-12)
    # Repeated teacher tokens accumulate ("00" → "0", "0").
    assert _multi_weights([5, 5], 0.1, 4) == [(5, 1.0)]


def test_a_tokenizer_against_itself_is_the_identity(llama3):
    proj = build_projection(llama3, llama3)
    n = proj.student_vocab_size
    assert proj.shape == (n, n) and proj.nnz == n
    np.testing.assert_array_equal(proj.indices, np.arange(n))
    np.testing.assert_array_equal(proj.data, np.ones(n, dtype=np.float32))
    assert (proj.row_kind == ROW_EXACT).all()


def test_rows_are_normalized_sorted_and_at_most_top_k(w_llama3_qwen3, w_llama3_o200k):
    for proj in (w_llama3_qwen3, w_llama3_o200k):
        lengths = np.diff(proj.indptr)
        assert lengths.max() <= proj.top_k
        sums = np.add.reduceat(proj.data, proj.indptr[:-1][lengths > 0])
        np.testing.assert_allclose(sums, 1.0, atol=1e-6)
        assert ((lengths == 0) == np.isin(proj.row_kind, [ROW_EMPTY, ROW_NO_TOKEN])).all()
        assert (lengths[proj.row_kind == ROW_EXACT] == 1).all()
        for s in np.nonzero(lengths > 1)[0][:2000]:
            w = proj.data[proj.indptr[s] : proj.indptr[s + 1]]
            assert (np.diff(w) <= 0).all()
        assert set(np.unique(proj.row_kind)) <= {ROW_EMPTY, ROW_EXACT, ROW_MULTI, ROW_NO_TOKEN}


def test_every_multi_token_row_spells_the_student_token(llama3, qwen3, w_llama3_qwen3):
    """Pass 2 is exact in bytes: the teacher tokens, in weight order, concatenate to the student text."""
    scv, tcv = canonical_vocab(llama3), canonical_vocab(qwen3)
    multi = np.nonzero(w_llama3_qwen3.row_kind == ROW_MULTI)[0]
    assert len(multi) > 10000
    for s in multi[::7]:
        ids = [t for t, _ in w_llama3_qwen3.row(int(s))]
        # distinct teacher ids in first-occurrence order cover the text (repeats merged), so check containment
        assert all(tcv.text[t] is not None and tcv.text[t] in scv.text[s] for t in ids)


def test_empty_rows_are_counted_not_dropped(w_llama3_qwen3):
    c = w_llama3_qwen3.counts()
    assert c["empty"] == len(w_llama3_qwen3.empty_rows()) > 0
    assert sum(c.values()) == w_llama3_qwen3.student_vocab_size


def test_to_torch_pads_both_vocabularies(w_llama3_qwen3):
    import torch

    w = w_llama3_qwen3.to_torch(student_padded=128_256 + 128, teacher_padded=151_936)
    assert w.layout == torch.sparse_csr and w.shape == (128_384, 151_936)
    assert w.crow_indices()[-1].item() == w_llama3_qwen3.nnz
    assert (w.crow_indices()[-129:] == w_llama3_qwen3.nnz).all()  # padded student rows are empty
    with pytest.raises(XTokenError, match="padded sizes"):
        w_llama3_qwen3.to_torch(teacher_padded=1000)


# ---- coverage audit: the paper's Table 8 -------------------------------------------------------------


def test_table8_llama3_vs_qwen3_numerals_outside_common_set(llama3, qwen3, w_llama3_qwen3):
    rep = audit(w_llama3_qwen3, llama3, qwen3)
    assert rep.categories["two_digit_numerals"] == {"total": 100, "exact": 0, "mapped": 100, "empty": 0}
    assert rep.categories["three_digit_numerals"] == {"total": 1000, "exact": 0, "mapped": 1000, "empty": 0}
    assert rep.categories["single_digits"]["exact"] == 10
    assert rep.recommended_loss == "p_kl"


def test_table8_llama3_vs_o200k_numerals_inside_common_set(llama3, o200k, w_llama3_o200k):
    rep = audit(w_llama3_o200k, llama3, o200k)
    assert rep.categories["two_digit_numerals"] == {"total": 100, "exact": 100, "mapped": 100, "empty": 0}
    assert rep.categories["three_digit_numerals"] == {"total": 1000, "exact": 1000, "mapped": 1000, "empty": 0}
    assert rep.recommended_loss == "h_kl"
    assert rep.empty_rows == w_llama3_o200k.counts()["empty"]
    total = sum(c["total"] for c in rep.categories.values())
    assert total == w_llama3_o200k.student_vocab_size - w_llama3_o200k.counts()["no_token"]


def test_audit_critical_categories_are_configurable(llama3, qwen3, w_llama3_qwen3):
    assert audit(w_llama3_qwen3, llama3, critical=["single_digits"]).recommended_loss == "h_kl"
    with pytest.raises(XTokenError, match="unknown critical categories"):
        audit(w_llama3_qwen3, llama3, critical=["numbers"])


# ---- file format ------------------------------------------------------------------------------------


def test_save_load_round_trip_and_identical_bytes(tmp_path, llama3, qwen3, w_llama3_qwen3):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w_llama3_qwen3.save(a)
    build_projection(llama3, qwen3).save(b)  # a second, independent build
    assert a.read_bytes() == b.read_bytes()
    back = load_projection(a, llama3, qwen3)
    for name in ("indptr", "indices", "data", "row_kind"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w_llama3_qwen3, name))
    assert back.shape == w_llama3_qwen3.shape and (back.beta, back.gamma, back.max_len) == (0.9, 0.1, 4)
    assert back.student_fingerprint == llama3.fingerprint and back.teacher_fingerprint == qwen3.fingerprint


def test_loading_with_other_tokenizers_names_the_side(tmp_path, llama3, qwen3, o200k, w_llama3_qwen3):
    p = tmp_path / "w.safetensors"
    w_llama3_qwen3.save(p)
    with pytest.raises(ProjectionFileError, match="another teacher tokenizer"):
        load_projection(p, llama3, o200k)
    with pytest.raises(ProjectionFileError, match="another student tokenizer"):
        load_projection(p, qwen3, qwen3)


def test_fingerprint_ignores_file_formatting(tmp_path, qwen3_path):
    """Merges as "a b" strings or ["a", "b"] pairs, any indentation: same tokenizer, same fingerprint."""
    spec = json.loads(open(qwen3_path, encoding="utf-8").read())
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    assert load_tokenizer(other).fingerprint == load_tokenizer(qwen3_path).fingerprint


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    notjson = tmp_path / "notjson.json"
    notjson.write_bytes(b"\x00\x01 not json")
    with pytest.raises(TokenizerLoadError, match="not a JSON file"):
        load_tokenizer(notjson)
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}')
    with pytest.raises(TokenizerLoadError, match="not a tokenizer"):
        load_tokenizer(other)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": []}))
    with pytest.raises(TokenizerLoadError, match="empty vocabulary"):
        load_tokenizer(empty)


def test_bad_projection_files(tmp_path, w_llama3_qwen3):
    from safetensors.numpy import save_file

    with pytest.raises(ProjectionFileError, match="does not exist"):
        load_projection(tmp_path / "nope.safetensors")
    good = tmp_path / "w.safetensors"
    w_llama3_qwen3.save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ProjectionFileError, match="truncated"):
        load_projection(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ProjectionFileError, match="not an nemo_xtoken projection"):
        load_projection(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("definitely not safetensors")
    with pytest.raises(ProjectionFileError):
        load_projection(garbage)


# ---- tokenizer sources ----------------------------------------------------------------------------


def test_tokenizer_from_a_hugging_face_folder(tmp_path, qwen3_path, qwen3):
    import shutil

    folder = tmp_path / "Qwen3-4B"
    folder.mkdir()
    shutil.copy(qwen3_path, folder / "tokenizer.json")
    info = load_tokenizer(folder)
    assert info.fingerprint == qwen3.fingerprint and info.vocab_size == 151_669


def test_tokenizer_from_a_cached_hub_name_offline(tmp_path, monkeypatch, llama3_path, llama3):
    """A hub name resolves from the local Hugging Face cache only (no network)."""
    import shutil

    import huggingface_hub.constants as hf_constants

    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(llama3_path, snap / "tokenizer.json")
    (tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "refs").mkdir()
    (tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_tokenizer("meta-llama/Llama-3.2-1B").fingerprint == llama3.fingerprint
    with pytest.raises(TokenizerLoadError, match="offline"):
        load_tokenizer("nobody/not-a-cached-model")


def test_cached_projection_reuses_and_repairs_its_file(tmp_path, llama3, qwen3, w_llama3_qwen3):
    from nemo_xtoken.vocab import cached_projection

    a = cached_projection(llama3, qwen3, cache_dir=tmp_path)
    (f,) = list((tmp_path / "projections").iterdir())
    np.testing.assert_array_equal(a.indices, w_llama3_qwen3.indices)
    stamp = f.stat().st_mtime_ns
    cached_projection(llama3, qwen3, cache_dir=tmp_path)
    assert f.stat().st_mtime_ns == stamp  # reused, not rebuilt
    f.write_bytes(b"damaged")
    b = cached_projection(llama3, qwen3, cache_dir=tmp_path)  # rebuilt, not trusted
    np.testing.assert_array_equal(b.data, w_llama3_qwen3.data)
    other = cached_projection(llama3, qwen3, cache_dir=tmp_path, max_len=3)
    assert other.max_len == 3 and len(list((tmp_path / "projections").iterdir())) == 2
