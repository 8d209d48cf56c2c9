"""`xtoken preprocess` and `xtoken align`: output format, reader, workers, resumption, report, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nemo_xtoken.align import align
from nemo_xtoken.data.corpus import PreprocessedCorpus
from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess
from nemo_xtoken.cli.main import main
from nemo_xtoken.errors import XTokenError

DOCS = [
    {"text": "In 201 days the price rose 3.5%."},
    {"text": "你好，世界！🎉 emoji and CJK"},
    {"body": "no text field"},
    {"text": "def f(x):\n    return x ** 2\n"},
    {"text": "e\u0301 decomposed"},  # Qwen3's NFC normalizer changes it: rejected with the span
    {"text": ""},
    {"text": 42},
    {"text": "<|endoftext|> literal special token"},
]


@pytest.fixture()
def corpus_file(tmp_path):
    p = tmp_path / "docs.jsonl"
    with open(p, "w") as f:
        for d in DOCS:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
        f.write("{not json\n")
    return p


def opts(llama3_path, qwen3_path, **kw):
    return PreprocessOptions(student_tokenizer=llama3_path, teacher_tokenizer=qwen3_path, shard_size=3, student_add_bos=True, **kw)


def test_preprocess_writes_aligned_documents(tmp_path, corpus_file, llama3_path, qwen3_path, llama3, qwen3):
    r = preprocess(corpus_file, tmp_path / "out", opts(llama3_path, qwen3_path), progress=False)
    assert r["input_documents"] == 9 and r["documents"] == 4 and r["rejected"] == 5 and r["shards"] == 3
    reasons = {x["index"]: x["reason"] for x in r["rejected_documents"]}
    assert "no string field 'text'" in reasons[2] and "changes the text" in reasons[4] and "empty" in reasons[5]
    assert "field 'text' is a number, not a string" in reasons[6] and "not JSON" in reasons[8]  # the field exists
    c = PreprocessedCorpus(tmp_path / "out")
    assert len(c) == 4 and [c.source_index(i) for i in range(4)] == [0, 1, 3, 7]
    tot_s = tot_t = chunks = 0
    for i in range(4):
        s, t, a = c[i]
        ref, rs, rt = align(DOCS[c.source_index(i)]["text"], llama3, qwen3, student_add_bos=True, return_ids=True)
        assert np.array_equal(s, rs) and np.array_equal(t, rt) and a == ref
        tot_s, tot_t, chunks = tot_s + len(s), tot_t + len(t), chunks + a.n_chunks
    assert (r["student_tokens"], r["teacher_tokens"], r["chunks"]) == (tot_s, tot_t, chunks)
    assert r["one_sided_student_tokens"] == 4 and r["one_sided_teacher_tokens"] == 0  # one BOS per document
    s_len, t_len = c.lengths()
    assert s_len.tolist() == [len(c[i][0]) for i in range(4)]
    with pytest.raises(IndexError):
        c[4]
    # memory-mapped arrays on disk
    assert isinstance(np.load(tmp_path / "out/shards/00000/student_ids.npy", mmap_mode="r"), np.memmap)


def test_workers_give_identical_output(tmp_path, corpus_file, llama3_path, qwen3_path):
    preprocess(corpus_file, tmp_path / "w1", opts(llama3_path, qwen3_path), workers=1, progress=False)
    r2 = preprocess(corpus_file, tmp_path / "w2", opts(llama3_path, qwen3_path), workers=2, progress=False)
    assert r2["documents"] == 4
    for shard in ("00000", "00001", "00002"):
        for f in sorted((tmp_path / "w1/shards" / shard).iterdir()):
            assert f.read_bytes() == (tmp_path / "w2/shards" / shard / f.name).read_bytes(), f


def test_resume_skips_completed_shards(tmp_path, corpus_file, llama3_path, qwen3_path):
    out = tmp_path / "out"
    preprocess(corpus_file, out, opts(llama3_path, qwen3_path), progress=False)
    before = (out / "shards/00002/teacher_ids.npy").read_bytes()
    shutil.rmtree(out / "shards/00001")  # as if interrupted before this shard was renamed into place
    (out / "shards/.00002.tmp-999").mkdir()  # a half-written shard of a killed worker
    (out / "shards/00002/DONE.json").unlink()  # no completion marker: redone
    (out / "manifest.json").unlink()
    r = preprocess(corpus_file, out, opts(llama3_path, qwen3_path), progress=False)
    assert r["shards_skipped"] == 1 and r["documents"] == 4 and r["rejected"] == 5
    assert (out / "shards/00002/teacher_ids.npy").read_bytes() == before
    assert not (out / "shards/.00002.tmp-999").exists() and r["stale_shards_removed"] == [".00002.tmp-999"]
    assert len(PreprocessedCorpus(out)) == 4
    with pytest.raises(XTokenError, match="other settings .*shard_size"):
        preprocess(corpus_file, out, PreprocessOptions(llama3_path, qwen3_path, shard_size=5, student_add_bos=True), progress=False)


def test_input_errors(tmp_path, llama3_path, qwen3_path):
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(XTokenError, match="needs pyarrow: `pip install pyarrow`"):
            preprocess(pq, tmp_path / "o", opts(llama3_path, qwen3_path), progress=False)
    with pytest.raises(XTokenError, match="does not exist"):
        preprocess(tmp_path / "missing.jsonl", tmp_path / "o2", opts(llama3_path, qwen3_path), progress=False)
    with pytest.raises(XTokenError, match="no manifest.json"):
        PreprocessedCorpus(tmp_path)


def test_parquet_input(tmp_path, llama3_path, qwen3_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["In 201 days", "hello"]}), tmp_path / "d.parquet")
    r = preprocess(tmp_path / "d.parquet", tmp_path / "o", opts(llama3_path, qwen3_path, field="content"), progress=False)
    assert r["documents"] == 2


def test_cli_align_and_preprocess(tmp_path, corpus_file, llama3_path, qwen3_path, capsys):
    assert main(["align", "-s", llama3_path, "-t", qwen3_path, "--text", "In 201 days", "--json", "--student-bos"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chunks"][0]["one_sided"] and out["chunks"][0]["student_tokens"] == ["<|begin_of_text|>"]
    c = out["chunks"][3]
    assert c["text"] == "201" and c["student_tokens"] == ["201"] and c["teacher_tokens"] == ["2", "0", "1"]
    assert main(["align", "-s", llama3_path, "-t", qwen3_path, "--text", "In 201 days"]) == 0
    assert "'201'" in capsys.readouterr().out
    assert main(["align", "-s", llama3_path, "-t", qwen3_path, "--text", "e\u0301"]) == 2
    assert "changes the text" in capsys.readouterr().err
    rc = main(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(corpus_file), "--output",
               str(tmp_path / "cli"), "--shard-size", "4", "--workers", "2", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "documents: 4 aligned of 9 read (5 rejected)" in text and "rejected document 4" in text


def test_worker_start_failure_is_an_error_not_a_hang(tmp_path, llama3_path):
    """A worker initializer that raises would make multiprocessing respawn workers forever; ours
    keeps the error and raises it from the first shard, where the parent process sees it."""
    from nemo_xtoken.data import preprocess as pp

    missing = tmp_path / "gone" / "tokenizer.json"
    pp._init_worker(PreprocessOptions(str(llama3_path), str(missing)))
    try:
        with pytest.raises(XTokenError, match="worker could not start.*gone"):
            pp._process_shard((0, str(tmp_path / "out"), [(0, "some text", None)]))
    finally:
        pp._W.clear()


# ---- resume identity, exit codes, blank lines, folders, cost of rejected documents (issue 15) -----


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


TEXTS_A = ["In 201 days the price rose 3.5%.", "def f(x):\n    return x ** 2\n", "Call me Ishmael.", "Some years ago.",
           "Never mind how long.", "Having little or no money."]


def test_resume_with_another_input_is_refused_and_overwrite_starts_over(tmp_path, llama3_path, qwen3_path):
    a = _write(tmp_path / "a.jsonl", TEXTS_A)
    b = _write(tmp_path / "b.jsonl", ["A wholly different corpus.", "Two documents."])
    out = tmp_path / "out"
    o = opts(llama3_path, qwen3_path)
    assert preprocess(a, out, o, progress=False)["shards"] == 2
    before = (out / "manifest.json").read_text()
    with pytest.raises(XTokenError, match=r"another input .*a\.jsonl.*b\.jsonl: .* bytes before.*--overwrite to start over"):
        preprocess(b, out, o, progress=False)
    assert (out / "manifest.json").read_text() == before  # nothing changed
    r = preprocess(b, out, o, progress=False, overwrite=True)
    assert r["documents"] == 2 and r["shards"] == 1 and r["shards_skipped"] == 0
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]  # no stale shard of a.jsonl
    c = PreprocessedCorpus(out)
    assert len(c) == 2 and json.loads((out / "params.json").read_text())["input"].endswith("b.jsonl")


def test_same_size_edit_is_refused_and_a_moved_copy_resumes(tmp_path, llama3_path, qwen3_path):
    a = _write(tmp_path / "a.jsonl", TEXTS_A)
    out = tmp_path / "out"
    o = opts(llama3_path, qwen3_path)
    preprocess(a, out, o, progress=False)
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(a.read_bytes())  # same content, another path and modification time
    r = preprocess(moved, out, o, progress=False)
    assert r["shards_skipped"] == 2 and r["documents"] == 6
    assert json.loads((out / "manifest.json").read_text())["params"]["input"].endswith("elsewhere.jsonl")
    edited = a.read_bytes().replace(b"Ishmael", b"Ishmaex")  # same size, other content
    a.write_bytes(edited)
    with pytest.raises(XTokenError, match="same size, different content"):
        preprocess(a, out, o, progress=False)


def test_nothing_aligned_is_an_error_naming_the_field(tmp_path, llama3_path, qwen3_path, capsys):
    p = tmp_path / "body.jsonl"
    p.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS_A)))
    with pytest.raises(XTokenError, match=r"no document was aligned: all 6 documents were rejected \(6× has no string field 'text'\); "
                       r"the first document has the fields \['body', 'id'\]: pass --field"):
        preprocess(p, tmp_path / "o", opts(llama3_path, qwen3_path), progress=False)
    rc = main(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(p), "--output", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "pass --field" in capsys.readouterr().err
    rc = main(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(p), "--output", str(tmp_path / "o3"),
               "--no-progress", "--field", "body"])
    assert rc == 0 and "documents: 6 aligned of 6 read (0 rejected)" in capsys.readouterr().out
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(XTokenError, match="holds no documents"):
        preprocess(blank, tmp_path / "o4", opts(llama3_path, qwen3_path), progress=False)
    # every document changed by the teacher's normalizer: the tokenizers are named
    nfc = _write(tmp_path / "nfc.jsonl", ["e\u0301 one", "cafe\u0301 two"])
    with pytest.raises(XTokenError, match=r"no document was aligned.*changes the text.*could not align them"):
        preprocess(nfc, tmp_path / "o5", opts(llama3_path, qwen3_path), progress=False)


def test_blank_lines_are_skipped_not_counted(tmp_path, llama3_path, qwen3_path):
    p = tmp_path / "gaps.jsonl"
    p.write_text("\n" + json.dumps({"text": "first"}) + "\n\n   \n" + json.dumps({"text": "second"}) + "\n\n")
    r = preprocess(p, tmp_path / "o", opts(llama3_path, qwen3_path), progress=False)
    assert (r["input_documents"], r["documents"], r["rejected"]) == (2, 2, 0)
    c = PreprocessedCorpus(tmp_path / "o")
    assert [c.source_index(i) for i in range(2)] == [1, 4]  # the documents' lines (0-based)


def test_folder_input(tmp_path, llama3_path, qwen3_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _write(d / "part-0.jsonl", TEXTS_A[:2])
    _write(d / "part-1.jsonl", TEXTS_A[2:5])
    (d / "README.txt").write_text("not data")
    r = preprocess(d, tmp_path / "o", opts(llama3_path, qwen3_path), progress=False)
    assert r["documents"] == 5
    c = PreprocessedCorpus(tmp_path / "o")
    assert [c.source_index(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert [len(c[i][0]) for i in range(5)] == [len(align(t, llama3_path, qwen3_path, student_add_bos=True, return_ids=True)[1]) for t in TEXTS_A[:5]]
    ident = json.loads((tmp_path / "o/params.json").read_text())["input_identity"]
    assert ident["folder"] and [f["name"] for f in ident["files"]] == ["part-0.jsonl", "part-1.jsonl"]
    _write(d / "part-2.jsonl", TEXTS_A[5:])  # a file added to the folder: another input
    with pytest.raises(XTokenError, match="it had 2 file"):
        preprocess(d, tmp_path / "o", opts(llama3_path, qwen3_path), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(XTokenError, match=r"input .*empty is a folder without \.jsonl or \.parquet files \(it holds \['notes.txt'\]\)"):
        preprocess(empty, tmp_path / "o2", opts(llama3_path, qwen3_path), progress=False)


def test_rejected_documents_cost_one_alignment_pass(monkeypatch, llama3, qwen3):
    """Each rejected document used to re-run the alignment of the whole batch; now the batch is aligned once."""
    from nemo_xtoken.align import core

    calls = []
    real = core._align_encoded
    monkeypatch.setattr(core, "_align_encoded", lambda *a: calls.append(1) or real(*a))
    texts = [t if i % 3 else t + " cafe\u0301" for i, t in enumerate(TEXTS_A * 3)]
    b = core.align_batch(texts, llama3, qwen3, on_error="skip")
    assert len(b.rejected) == 6 and len(b) == 12 and len(calls) == 1
    assert [i for i, _ in b.rejected] == [0, 3, 6, 9, 12, 15] and all("changes the text" in r for _, r in b.rejected)
    for k, i in enumerate(b.index.tolist()):  # the accepted ones equal their single-document alignment
        ref, s, t = align(texts[i], llama3, qwen3, return_ids=True)
        assert np.array_equal(b[k][0], s) and b[k][2] == ref
    with pytest.raises(XTokenError, match="document 0: .*changes the text"):
        core.align_batch(texts, llama3, qwen3, on_error="raise")


def test_reader_is_exported_from_the_data_package(tmp_path, corpus_file, llama3_path, qwen3_path):
    import nemo_xtoken.data as D
    from nemo_xtoken.data import PreprocessedCorpus as Exported, PreprocessOptions as ExportedOptions
    from nemo_xtoken.data import corpus, preprocess as module

    assert Exported is corpus.PreprocessedCorpus and ExportedOptions is module.PreprocessOptions
    assert {"PreprocessedCorpus", "PreprocessOptions"} == set(D.__all__)
    preprocess(corpus_file, tmp_path / "out", opts(llama3_path, qwen3_path), progress=False)
    assert len(Exported(tmp_path / "out")) == 4
