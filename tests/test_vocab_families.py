"""W and the audit for SentencePiece families (Mistral/Llama-2, Gemma-3) and DeepSeek-V3 specials;
the tokenizer cache; ``--beta``; CLI-worded errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.cli.main import main
from nemo_xtoken.vocab import audit, build_projection, canonical_vocab, load_tokenizer
from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT, ROW_MULTI, _assemble_rows, _multi_weights


@pytest.fixture(scope="module")
def tok():
    return {n: load_tokenizer(str(tokenizer_path(n))) for n in ("llama3", "qwen3", "mistral", "gemma3", "deepseek_v3")}


@pytest.fixture(scope="module")
def w_llama3_gemma3(tok):
    return build_projection(tok["llama3"], tok["gemma3"])


@pytest.fixture(scope="module")
def w_gemma3_llama3(tok):
    return build_projection(tok["gemma3"], tok["llama3"])


@pytest.fixture(scope="module")
def w_llama3_mistral(tok):
    return build_projection(tok["llama3"], tok["mistral"])


def row(proj, s_info, t_info, text: str) -> list[tuple[str, float]]:
    scv, tcv = canonical_vocab(s_info), canonical_vocab(t_info)
    (s,) = [i for i in scv.lookup(text) if not scv.byte_fallback[i]]
    return [(tcv.raw[t], round(w, 4)) for t, w in proj.row(s)]


# ---- canonical strings ----------------------------------------------------------------------------


def test_gemma3_added_whitespace_tokens_are_spaces_not_the_character(tok):
    g = tok["gemma3"]
    cv = canonical_vocab(g)
    assert cv.family == "sentencepiece"
    assert cv.text[g.vocab["▁▁"]] == b"  " and cv.text[g.vocab["▁" * 31]] == b" " * 31
    assert cv.text[g.vocab["\n\n"]] == b"\n\n" and cv.text[g.vocab["\t\t"]] == b"\t\t"
    assert cv.text[g.vocab["<0x41>"]] == b"A" and cv.byte_fallback[g.vocab["<0x41>"]]
    assert not cv.byte_fallback[g.vocab["A"]]
    assert cv.text[g.vocab["<table>"]] == b"<table>"  # a non-special added token is its text
    assert int(cv.byte_fallback.sum()) == 256


def test_deepseek_gemma_and_qwen_specials_share_canonical_names(tok):
    d, g, q, l3 = (canonical_vocab(tok[n]) for n in ("deepseek_v3", "gemma3", "qwen3", "llama3"))
    assert d.special[d.raw.index("<｜begin▁of▁sentence｜>")] == "<bos>" == l3.special[l3.raw.index("<|begin_of_text|>")]
    assert d.special[d.raw.index("<｜end▁of▁sentence｜>")] == "<eos>" == l3.special[l3.raw.index("<|end_of_text|>")]
    assert g.special[g.raw.index("<start_of_turn>")] == "<sot>" == q.special[q.raw.index("<|im_start|>")]
    assert g.special[g.raw.index("<end_of_turn>")] == "<eot>" == q.special[q.raw.index("<|im_end|>")]


# ---- W -----------------------------------------------------------------------------------------------


def test_gemma3_whitespace_rows_map_to_spaces(tok, w_llama3_gemma3, w_gemma3_llama3):
    """Before: Gemma-3's ▁▁ mapped to Llama-3's byte pieces of '▁' (0.9091 '\\xe2\\x96', 0.0909 '\\x81')."""
    assert row(w_gemma3_llama3, tok["gemma3"], tok["llama3"], "  ") == [("ĠĠ", 1.0)]
    assert row(w_llama3_gemma3, tok["llama3"], tok["gemma3"], "  ") == [("▁▁", 1.0)]
    assert row(w_llama3_gemma3, tok["llama3"], tok["gemma3"], "    ") == [("▁▁▁▁", 1.0)]
    assert row(w_llama3_gemma3, tok["llama3"], tok["gemma3"], "\n\n") == [("\n\n", 1.0)]


def test_llama3_to_gemma3_whitespace_audit(tok, w_llama3_gemma3):
    """Before: 308 of 426 whitespace rows empty.  Now every empty one needs more than 4 Gemma tokens."""
    rep = audit(w_llama3_gemma3, tok["llama3"], tok["gemma3"])
    ws = rep.categories["whitespace"]
    assert ws["total"] == 426 and ws["empty"] < 40 and ws["exact"] > 60
    scv = canonical_vocab(tok["llama3"])
    from nemo_xtoken.vocab.audit import categorize

    for s in w_llama3_gemma3.empty_rows():
        if categorize(scv.text[s], False) == "whitespace":
            n = len(tok["gemma3"].tokenizer.encode(scv.text[s].decode(), add_special_tokens=False).ids)
            assert n > 4, (scv.display(int(s)), n)


def test_model_tokens_win_over_byte_fallback(tok, w_llama3_mistral):
    """Mistral's <0x41> also decodes to 'A', but the tokenizer writes 'A': W must map to that."""
    assert row(w_llama3_mistral, tok["llama3"], tok["mistral"], "A") == [("A", 1.0)]
    assert row(w_llama3_mistral, tok["llama3"], tok["mistral"], " the") == [("▁the", 1.0)]
    # a byte no Mistral piece holds maps to its byte-fallback token
    scv, tcv = canonical_vocab(tok["llama3"]), canonical_vocab(tok["mistral"])
    s = [i for i in range(scv.size) if scv.text[i] == b"\xe4"][0]
    assert [tcv.raw[t] for t, _ in w_llama3_mistral.row(s)] == ["<0xE4>"]


def test_retokenization_by_a_dummy_prefix_teacher_spells_the_text(tok, w_llama3_mistral):
    """Re-tokenization by Mistral (Prepend normalizer) must not carry the dummy ▁: pieces spell the token."""
    from nemo_xtoken.vocab.projection import _retokenize

    scv, tcv = canonical_vocab(tok["llama3"]), canonical_vocab(tok["mistral"])
    multi = np.flatnonzero(w_llama3_mistral.row_kind == ROW_MULTI)
    assert multi.size > 50_000
    sample = [int(s) for s in multi[::211]] + [i for i in range(scv.size) if scv.text[i] in (b" the", b"\xe4", b"a\xe4")]
    got = _retokenize([scv.text[s] for s in sample], tok["mistral"], tcv, False)
    for s, ids in zip(sample, got):
        assert ids is not None and b"".join(tcv.text[i] for i in ids) == scv.text[s], (scv.display(s), ids)
        if s in multi:  # W's row is the rule applied to these pieces
            want = _multi_weights(ids, 0.1, 4)
            assert [t for t, _ in w_llama3_mistral.row(s)] == [t for t, _ in want]
    assert row(w_llama3_mistral, tok["llama3"], tok["mistral"], "201") == [("2", 0.9009), ("0", 0.0901), ("1", 0.009)]


def test_sentencepiece_student_rows(tok):
    w = build_projection(tok["mistral"], tok["llama3"])
    scv, tcv = canonical_vocab(tok["mistral"]), canonical_vocab(tok["llama3"])
    assert w.counts()["empty"] < 20
    (bos,) = [i for i, s in enumerate(scv.special) if s == "<bos>"]
    assert [tcv.raw[t] for t, _ in w.row(bos)] == ["<|begin_of_text|>"]
    # every byte-fallback token maps exactly onto the byte-level token of that byte
    fb = np.flatnonzero(scv.byte_fallback)
    assert fb.size == 256 and all(w.row_kind[s] == ROW_EXACT for s in fb)
    rep = audit(w, tok["mistral"], tok["llama3"])
    assert rep.categories["byte_fallback"]["total"] == 256 and rep.categories["single_digits"]["total"] == 10


def test_deepseek_specials_map_exactly(tok):
    w = build_projection(tok["deepseek_v3"], tok["llama3"])
    dcv, lcv = canonical_vocab(tok["deepseek_v3"]), canonical_vocab(tok["llama3"])
    for name, want in (("<｜begin▁of▁sentence｜>", "<|begin_of_text|>"), ("<｜end▁of▁sentence｜>", "<|end_of_text|>")):
        s = dcv.raw.index(name)
        assert w.row_kind[s] == ROW_EXACT and [lcv.raw[t] for t, _ in w.row(s)] == [want]


def test_assemble_rows_equals_the_per_row_rule():
    """The vectorized CSR assembly equals ``_multi_weights`` row by row (duplicates, γ ≥ 1, L > top_k)."""
    rng = np.random.default_rng(0)
    multi = [(s, [int(x) for x in rng.integers(0, 6, size=rng.integers(1, 7))]) for s in range(0, 60, 2)]
    for gamma, top_k in ((0.1, 4), (1.0, 4), (2.0, 3), (0.5, 2)):
        indptr, idx, data = _assemble_rows(61, np.array([1, 3]), np.array([9, 8]), multi, gamma, top_k)
        for s, ids in multi:
            got = list(zip(idx[indptr[s]:indptr[s + 1]].tolist(), data[indptr[s]:indptr[s + 1]].tolist()))
            want = _multi_weights(ids, gamma, top_k)
            assert [t for t, _ in got] == [t for t, _ in want] and np.allclose([w for _, w in got], [w for _, w in want])
        assert idx[indptr[1]:indptr[2]].tolist() == [9] and idx[indptr[3]:indptr[4]].tolist() == [8]


# ---- --beta ----------------------------------------------------------------------------------------------


def test_beta_is_refused_with_the_reason_and_gamma_changes_w(tmp_path, capsys):
    """Before: `--beta 0.1` gave a W byte-identical to the default one, and `--beta 1.5` was accepted."""
    m2, l3 = str(tokenizer_path("mistral")), str(tokenizer_path("llama3"))
    argv = ["build-projection", "-s", m2, "-t", l3, "-o", str(tmp_path / "w.safetensors")]
    assert main(argv + ["--beta", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--beta was removed" in err and "cancels in the row normalization" in err and "--gamma" in err
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(TypeError):
        build_projection(m2, l3, beta=0.1)
    # γ is what shapes a row: Mistral 'equation' → Llama-3 'equ', 'ation'
    from nemo_xtoken.vocab import load_projection

    s_info, t_info = load_tokenizer(m2), load_tokenizer(l3)
    for gamma, want in (("0.1", [("equ", 0.9091), ("ation", 0.0909)]), ("0.5", [("equ", 0.6667), ("ation", 0.3333)])):
        assert main(argv + ["--gamma", gamma]) == 0
        w = load_projection(tmp_path / "w.safetensors", s_info, t_info)
        assert row(w, s_info, t_info, "equation") == want


# ---- the CLI speaks CLI ----------------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "nemo_xtoken.cli.main", *argv], capture_output=True, text=True)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", ["align_teacher_bos", "preprocess_student_bos", "shard_size", "workers", "gamma",
                                  "critical", "min_exact_fraction"])
def test_cli_errors_name_cli_options(case, tmp_path):
    l3, q3 = str(tokenizer_path("llama3")), str(tokenizer_path("qwen3"))
    inp = tmp_path / "d.jsonl"
    inp.write_text(json.dumps({"text": "hello"}) + "\n")
    pre = ["preprocess", "-s", l3, "-t", q3, "--input", str(inp), "--output", str(tmp_path / "o")]
    argv, needle = {
        "align_teacher_bos": (["align", "-s", l3, "-t", q3, "--text", "hi", "--teacher-bos"], "drop --teacher-bos"),
        "preprocess_student_bos": (["preprocess", "-s", q3, "-t", l3, "--input", str(inp), "--output", str(tmp_path / "o"),
                                    "--student-bos"], "drop --student-bos"),
        "shard_size": (pre + ["--shard-size", "0"], "argument --shard-size: must be >= 1"),
        "workers": (pre + ["--workers", "0"], "argument --workers: must be >= 1"),
        "gamma": (["build-projection", "-s", l3, "-t", q3, "-o", str(tmp_path / "w"), "--gamma", "0"], "argument --gamma: must be > 0"),
        "critical": (["audit", "-p", str(tmp_path / "w"), "-s", l3, "-t", q3, "--critical", "numbers"],
                     "--critical names unknown categories numbers"),
        "min_exact_fraction": (["audit", "-p", str(tmp_path / "w"), "-s", l3, "-t", q3, "--min-exact-fraction", "2"],
                               "argument --min-exact-fraction: must be between 0 and 1"),
    }[case]
    rc, err = _cli(*argv)
    assert rc == 2 and needle in err, err
    assert "add_bos" not in err and "shard_size" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_python_api_speaks_python():
    from nemo_xtoken.align import align
    from nemo_xtoken.errors import XTokenError

    with pytest.raises(XTokenError, match="pass teacher_add_bos=False"):
        align("hi", str(tokenizer_path("llama3")), str(tokenizer_path("qwen3")), teacher_add_bos=True)


# ---- the tokenizer cache ------------------------------------------------------------------------------------


def test_file_cache_reloads_a_rewritten_file(tmp_path):
    src = json.loads(tokenizer_path("mistral").read_text("utf-8"))
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(src), "utf-8")
    a = load_tokenizer(path)
    assert load_tokenizer(str(path)) is a and load_tokenizer(tmp_path) is a  # same file, same object
    src["added_tokens"].append({"id": 32000, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(src), "utf-8")
    b = load_tokenizer(path)
    assert b is not a and b.vocab_size == a.vocab_size + 1 and b.fingerprint != a.fingerprint


def test_object_cache_notices_changes_in_place():
    from tokenizers import Tokenizer, normalizers

    from nemo_xtoken.align import align

    t = Tokenizer.from_file(str(tokenizer_path("mistral")))
    a = load_tokenizer(t)
    assert load_tokenizer(t) is a
    assert align("In 201 days", str(tokenizer_path("llama3")), t).n_chunks == 5  # <s> | In | ' ' | 201 | ' days'
    t.add_special_tokens(["<extra_special>"])
    b = load_tokenizer(t)
    assert b is not a and b.vocab_size == a.vocab_size + 1
    t.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "\u2581")])
    c = load_tokenizer(t)
    assert c is not b
    from nemo_xtoken.errors import XTokenError

    with pytest.raises(XTokenError, match="changes the text"):
        align("In 201 days", str(tokenizer_path("llama3")), t)


def test_hf_tokenizer_object_is_cached_with_its_bos():
    from transformers import PreTrainedTokenizerFast

    from nemo_xtoken.align import align

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path("mistral")), bos_token="<s>")
    a = load_tokenizer(hf)
    assert load_tokenizer(hf) is a and a.config["bos_token"] == "<s>"
    al, s, _ = align("hi", hf, str(tokenizer_path("llama3")), student_add_bos=True, student_special_tokens=False,
                     return_ids=True)
    assert s.tolist() == [1, hf.convert_tokens_to_ids("▁hi")] and al.one_sided().tolist() == [True, False]
