"""`xtoken cache-teacher`: the cache holds the teacher's exact top-k rows; resumable; refuses what does not match.

A tiny random Hugging Face Llama with the real Qwen3 tokenizer (151,669 ids) and a wider output
layer (151,936 columns, as Qwen3's checkpoints) is written by the test; the corpus is real English
text (State of the Union passages) tokenized by the real Llama-3 (student) and Qwen3 tokenizers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nemo_xtoken.data.corpus import PreprocessedCorpus
from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess
from nemo_xtoken.assets import text_corpus
from nemo_xtoken.cli.main import main
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.offline import sparse_from_logits
from nemo_xtoken.offline.cache import CacheOptions, TeacherCache, build_cache
from nemo_xtoken.offline.hf import load_hf_teacher
from nemo_xtoken.testing.hf import write_tiny_llama
from nemo_xtoken.data.corpus import short_passages, write_jsonl

V_QWEN, V_MODEL = 151669, 151936


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen3_path):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "teacher", qwen3_path, vocab_size=V_MODEL, max_positions=128, scale=8.0)


@pytest.fixture(scope="module")
def teacher(tiny):
    return load_hf_teacher(str(tiny))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_jsonl(short_passages(text_corpus("sotu"), 5, max_chars=200), tmp_path_factory.mktemp("docs") / "docs.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory, docs, tiny, llama3_path):
    """``xtoken cache-teacher`` on raw text (preprocessed on the way into CACHE/corpus, 3 shards)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cache") / "c"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["cache-teacher", "--hf-model", str(tiny), "--input", str(docs), "-s", llama3_path, "--top-k", "8",
                   "--output", str(out), "--batch-size", "3", "--shard-size", "2", "--json"])
    assert rc == 0
    return out, json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def corpus_dir(built):
    return built[0] / "corpus"


def _expected_rows(teacher, ids: np.ndarray, k: int, window: int | None = None, next_token: bool = True):
    """The teacher on each window of one document alone, then top-k + next token + exact rest."""
    n = len(ids)
    window = window or n
    ids = np.array(ids, dtype=np.int64)
    nxt = np.append(ids[1:], -1)
    parts = []
    for a in range(0, n, window):
        b = min(a + window, n)
        with torch.no_grad():
            logits = teacher.model(input_ids=torch.from_numpy(ids[a:b]).long()[None]).logits[0]
        parts.append(sparse_from_logits(logits, k, vocab_size=V_QWEN, targets=torch.from_numpy(nxt[a:b]) if next_token else None))
    return (torch.cat([p.ids for p in parts]).numpy(), torch.cat([p.log_probs for p in parts]).numpy(),
            torch.cat([p.rest_log_mass for p in parts]).numpy())


def test_cache_rows_are_the_teachers_exact_top_k(built, corpus_dir, teacher):
    out, report = built
    corpus = PreprocessedCorpus(corpus_dir)
    cache = TeacherCache(out).attach(corpus)
    assert report["documents"] == len(corpus) == len(cache) == 5 and report["shards"] == 3
    assert cache.entries == 9 and cache.vocab_size == V_QWEN and cache.top_k == 8
    assert report["tokens"] == sum(len(corpus[i][1]) for i in range(len(corpus)))
    for d in range(len(corpus)):
        _, t_ids, _ = corpus[d]
        ids, lp, rest = cache.rows(d, 0, len(t_ids))
        e_ids, e_lp, e_rest = _expected_rows(teacher, t_ids, 8)
        assert np.array_equal(ids, e_ids), d
        # float32 forwards of another batch shape: a few ulps of the logits, relative to the magnitude
        np.testing.assert_allclose(lp, e_lp, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(rest, e_rest, rtol=1e-5, atol=2e-5)
        # a distribution: entries + rest = 1; the next token is an entry at every position but the last
        total = np.exp(lp).sum(1) + np.exp(rest)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        assert all(int(t_ids[j + 1]) in ids[j] for j in range(len(t_ids) - 1))
    # the sparse rows of a span, as the dataset reads them
    st = cache.sparse(2, 3, 7)
    assert st.shape == (4,) and st.k == 9 and st.vocab_size == V_QWEN
    st.check()
    assert (out / "teacher_tokenizer" / "tokenizer.json").is_file()


def test_bytes_per_token_is_what_is_on_disk(built):
    out, report = built
    on_disk = sum(f.stat().st_size for f in (out / "shards").rglob("*.npy"))
    headers = 3 * 3 * 128  # numpy .npy headers (128 bytes each, 3 arrays × 3 shards)
    assert report["bytes_per_token"] == 9 * (4 + 4) + 4  # Qwen3 ids need int32; fp32 log-probabilities
    assert on_disk - headers == report["bytes_per_token"] * report["tokens"]


def test_long_documents_run_in_windows(tmp_path, corpus_dir, teacher):
    out = tmp_path / "win"
    build_cache(corpus_dir, out, CacheOptions(top_k=4, max_length=8, keep_next_token=False), teacher=teacher, progress=False)
    corpus = PreprocessedCorpus(corpus_dir)
    cache = TeacherCache(out).attach(corpus)
    _, t_ids, _ = corpus[0]
    assert len(t_ids) > 16  # at least three windows
    ids, lp, _ = cache.rows(0, 0, len(t_ids))
    e_ids, e_lp, _ = _expected_rows(teacher, t_ids, 4, window=8, next_token=False)
    assert cache.entries == 4 and np.array_equal(ids, e_ids)
    np.testing.assert_allclose(lp, e_lp, rtol=1e-5, atol=2e-5)  # float32 forwards of another batch shape
    # a window starts from a fresh context: position 8 differs from the whole-document run
    f_ids, f_lp, _ = _expected_rows(teacher, t_ids, 4, next_token=False)
    assert not np.allclose(lp[8], f_lp[8], atol=1e-3)
    np.testing.assert_allclose(lp[:8], f_lp[:8], rtol=1e-5, atol=2e-5)


def test_resume_skips_done_shards_and_gives_the_same_bytes(tmp_path, built, corpus_dir, teacher):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in (copy / "shards").rglob("*.npy")}
    shutil.rmtree(copy / "shards" / "00001")
    (copy / "shards" / ".00002.tmp-999").mkdir()  # debris of an interrupted run: ignored, replaced
    (copy / "manifest.json").unlink()
    r = build_cache(corpus_dir, copy, CacheOptions(top_k=8, batch_size=3), teacher=teacher, progress=False)
    assert r["shards_skipped"] == 2 and r["shards"] == 3
    after = {p.relative_to(copy): p.read_bytes() for p in (copy / "shards").rglob("*.npy") if not p.parent.name.startswith(".")}
    assert after.keys() == before.keys()
    for k in before:
        if "00001" in str(k):
            got = np.load(copy / k)
            want = np.load(out / k)
            assert np.array_equal(got, want) if got.dtype.kind in "iu" else np.allclose(got, want, atol=1e-6)
        else:
            assert after[k] == before[k]
    TeacherCache(copy).attach(PreprocessedCorpus(corpus_dir))


def test_refuses_other_settings_and_other_weights(built, corpus_dir, teacher):
    import copy

    from nemo_xtoken.offline.hf import LoadedTeacher

    out, _ = built
    with pytest.raises(XTokenError, match="top_k: 8 → 16"):
        build_cache(corpus_dir, out, CacheOptions(top_k=16), teacher=teacher, progress=False)
    with pytest.raises(XTokenError, match="store_dtype"):
        build_cache(corpus_dir, out, CacheOptions(top_k=8, store_dtype="fp16"), teacher=teacher, progress=False)
    other = copy.deepcopy(teacher.model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # another checkpoint of the same architecture
    tuned = LoadedTeacher(other, teacher.tokenizer, teacher.source, teacher.dtype, teacher.device)
    with pytest.raises(XTokenError, match="weights_sha256"):
        build_cache(corpus_dir, out, CacheOptions(top_k=8), teacher=tuned, progress=False)


def test_teacher_tokenizer_mismatch_is_refused(tmp_path, corpus_dir, docs, teacher):
    from nemo_xtoken.offline.hf import LoadedTeacher

    foreign = tmp_path / "foreign"
    shutil.copytree(corpus_dir, foreign)
    m = json.loads((foreign / "manifest.json").read_text())
    m["params"]["teacher_fingerprint"] = "0" * 64  # a corpus tokenized for another teacher
    m["params"]["teacher_tokenizer"] = "o200k/tokenizer.json"
    (foreign / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(XTokenError, match="preprocessed with teacher tokenizer o200k.*uses another tokenizer"):
        build_cache(foreign, tmp_path / "c", CacheOptions(top_k=4), teacher=teacher, progress=False)
    narrow = torch.nn.Module()
    narrow.config = teacher.model.config
    narrow.get_output_embeddings = lambda: torch.nn.Linear(16, 1000, bias=False)
    with pytest.raises(XTokenError, match="1000 output columns but its tokenizer has 151669 ids"):
        build_cache(corpus_dir, tmp_path / "c2", CacheOptions(top_k=4), teacher=LoadedTeacher(narrow, teacher.tokenizer, "narrow", "fp32", "cpu"), progress=False)
    with pytest.raises(XTokenError, match="--student-tokenizer is needed"):
        build_cache(docs, tmp_path / "c3", CacheOptions(top_k=4), teacher=teacher, progress=False)


def test_a_changed_corpus_is_refused(tmp_path, corpus_dir, teacher, built):
    pre, out = tmp_path / "pre", tmp_path / "c"
    shutil.copytree(corpus_dir, pre)
    shutil.copytree(built[0], out)
    TeacherCache(out).attach(PreprocessedCorpus(pre))  # the same text elsewhere: accepted
    ids = np.load(pre / "shards" / "00001" / "teacher_ids.npy")
    ids[5] = (ids[5] + 1) % 1000  # one token of the corpus changed since the cache was built
    np.save(pre / "shards" / "00001" / "teacher_ids.npy", ids)
    with pytest.raises(XTokenError, match="built from other text .*shard 1"):
        TeacherCache(out).attach(PreprocessedCorpus(pre))
    with pytest.raises(XTokenError, match="shard 1 was cached from other text"):
        build_cache(pre, out, CacheOptions(top_k=8), teacher=teacher, progress=False)
    shutil.rmtree(pre / "shards" / "00002")
    m = json.loads((pre / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]
    (pre / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(XTokenError, match="covers 3 corpus shards, the corpus .* has 2"):
        TeacherCache(out).attach(PreprocessedCorpus(pre))


def test_cli_resumes_and_gives_one_line_errors(tmp_path, built, docs, tiny, llama3_path, capsys):
    out, report = built
    assert report["documents"] == 5 and report["shards"] == 3 and report["shards_skipped"] == 0
    assert (out / "corpus" / "manifest.json").is_file()
    args = ["cache-teacher", "--hf-model", str(tiny), "--input", str(docs), "-s", llama3_path, "--top-k", "8",
            "--output", str(out), "--shard-size", "2", "--json"]
    assert main(args) == 0  # resumed: everything done already
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 3
    assert main(["cache-teacher", "--hf-model", str(tmp_path / "nope"), "--input", str(docs), "--top-k", "4", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load" in err[0] and "nope" in err[0]
    assert main(["cache-teacher", "--hf-model", str(tiny), "--input", str(docs), "-s", llama3_path, "--top-k", "0", "--output", str(tmp_path / "y")]) == 2
    assert "--top-k must be ≥ 1" in capsys.readouterr().err


def test_fp16_storage_bytes(tmp_path, corpus_dir, teacher):
    r = build_cache(corpus_dir, tmp_path / "h", CacheOptions(top_k=4, store_dtype="fp16"), teacher=teacher, progress=False)
    assert r["bytes_per_token"] == 5 * (4 + 2) + 4  # Qwen3 ids need int32; fp16 log-probabilities
    assert np.load(tmp_path / "h" / "shards" / "00000" / "log_probs.npy").dtype == np.float16
    assert np.load(tmp_path / "h" / "shards" / "00000" / "ids.npy").dtype == np.int32


@pytest.mark.slow
def test_two_workers_write_the_same_cache(tmp_path, corpus_dir, tiny, built):
    out, _ = built
    r = build_cache(corpus_dir, tmp_path / "w2", CacheOptions(top_k=8, batch_size=3), hf_model=str(tiny), workers=2, progress=False)
    assert r["workers"] == 2 and r["shards"] == 3
    for s in ("00000", "00001", "00002"):
        assert np.array_equal(np.load(tmp_path / "w2" / "shards" / s / "ids.npy"), np.load(out / "shards" / s / "ids.npy"))
        np.testing.assert_allclose(np.load(tmp_path / "w2" / "shards" / s / "log_probs.npy"), np.load(out / "shards" / s / "log_probs.npy"), rtol=1e-5, atol=1e-6)  # float32 forwards in other processes (thread counts)
