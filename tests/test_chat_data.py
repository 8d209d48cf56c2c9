"""Conversations as training data: ``data.format: chat``, ``xtoken preprocess --chat``, ``--check``, offline teachers.

Real tokenizers and chat templates (Llama-3 student, Qwen3 teacher), the shipped instruct config
(``conf/llama32_1b_instruct__qwen3_4b_chat.yaml``) pointed at them, a tiny random Hugging Face
teacher with Qwen3's tokenizer for ``xtoken cache-teacher``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from nemo_xtoken.cli.main import main as xtoken
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.testing.text import random_conversations
from nemo_xtoken.integration.train import main as distill

CONF = Path(__file__).resolve().parents[1] / "conf" / "llama32_1b_instruct__qwen3_4b_chat.yaml"


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rows = random_conversations(24)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(5, json.dumps({"text": "a raw text row"}))  # no messages: skipped and counted
    lines.insert(9, json.dumps({"messages": [{"role": "tool", "content": "x"}]}))  # unknown role: skipped and counted
    p = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="module")
def local(tmp_path_factory, llama3_path, qwen3_path, w_llama3_qwen3):
    """Overrides pointing the shipped chat config at local tokenizers, W and tiny models of the same architectures."""
    from tests.bridge_tiny import write_tiny

    d = tmp_path_factory.mktemp("w")
    m = {k: str(write_tiny(k, d / k, seed=0, with_tokenizer=False)) for k in ("llama", "qwen3")}
    w = str(w_llama3_qwen3.save(d / "q.safetensors"))
    return [f"student.tokenizer={llama3_path}", f"student.model={m['llama']}", f"teachers.0.tokenizer={qwen3_path}",
            f"teachers.0.projection={w}", f"teachers.0.model={m['qwen3']}"]


def test_shipped_chat_config_check(chat_file, local, capsys):
    rc = distill(["--config", str(CONF), "--check", *local, f"data.paths=[{chat_file}]"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert re.search(r"data: 24 documents checked, \d+ student tokens; packed at seq_length 4096: 1 samples", err), err
    assert "data: chat: 26 conversation rows read, 2 skipped" in err
    assert "line 6: no 'messages' list" in err and "line 10: message 0 has role 'tool'" in err
    m = re.search(r"data: chat: teacher qwen3_4b: ([0-9.]+)% of the assistant tokens in aligned \(KD\) chunks", err)
    assert m and float(m.group(1)) >= 95.0, err
    # one rendered example per side, loss-bearing tokens marked
    assert "--- student ---\n<|begin_of_text|><|start_header_id|>" in err and "<|eot_id|>⟧" in err
    assert "--- teacher ---\n" in err and "<|im_end|>⟧" in err


def test_loss_on_all_and_bad_loss_on(chat_file, local, capsys):
    assert distill(["--config", str(CONF), "--check", *local, f"data.paths=[{chat_file}]", "data.chat.loss_on=everything"]) == 2
    assert "data.chat.loss_on: 'everything' is not one of ['assistant', 'all']" in capsys.readouterr().err


def test_nothing_aligned_is_an_error(tmp_path, llama3_path, qwen3_path, capsys):
    from nemo_xtoken.data.chat import ChatDocuments

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"messages": [{"role": "bot", "content": "y"}]}\nnot json\n')
    with pytest.raises(XTokenError, match=r"bad.jsonl: no conversation aligned: all 3 rows were skipped \(.*no 'messages' list"):
        ChatDocuments(bad, llama3_path, qwen3_path)
    from nemo_xtoken.assets import tokenizer_path

    with pytest.raises(XTokenError, match=r"teacher tokenizer .*mistral.* has no chat template"):  # said once, before any row
        ChatDocuments(bad, llama3_path, str(tokenizer_path("mistral")))
    with pytest.raises(XTokenError, match=r"chat template .*nope.jinja: no such file"):
        ChatDocuments(bad, llama3_path, qwen3_path, student_template=str(tmp_path / "nope.jinja"))
    rc = xtoken(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(bad), "--output", str(tmp_path / "o"), "--chat", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no document was aligned: all 3 documents were rejected" in err


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, chat_file, llama3_path, qwen3_path):
    out = tmp_path_factory.mktemp("pre") / "chat"
    rc = xtoken(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(chat_file), "--output", str(out), "--chat",
                 "--no-progress", "--shard-size", "10", "--json"])
    assert rc == 0
    return out


def test_preprocess_chat_equals_in_memory(preprocessed, chat_file, llama3_path, qwen3_path):
    from nemo_xtoken.data.chat import ChatDocuments
    from nemo_xtoken.data.documents import PreprocessedDocuments, as_document

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = ChatDocuments(chat_file, llama3_path, qwen3_path)
    pre = PreprocessedDocuments(preprocessed)
    assert len(pre) == len(mem) == 24
    man = json.loads((preprocessed / "manifest.json").read_text())
    assert man["totals"]["rejected"] == 2 and man["totals"]["assistant_tokens_in_kd_chunks"] == mem.coverage[0][0]
    for i in range(len(pre)):
        a, b = as_document(pre[i], i), mem[i]
        assert np.array_equal(a.student_ids, b.student_ids) and np.array_equal(a.student_loss_mask, b.student_loss_mask)
        ta, tb = a.teachers[0], b.teachers[0]
        assert np.array_equal(ta.ids, tb.ids)
        assert np.array_equal(ta.student_kd_mask, tb.student_kd_mask) and np.array_equal(ta.teacher_kd_mask, tb.teacher_kd_mask)
        assert np.array_equal(ta.alignment.student_chunk_ids, tb.alignment.student_chunk_ids)
    assert [pre.source_index(i) for i in range(3)] == [0, 1, 2] and pre.source_index(5) == 6  # line 6 was skipped


def test_preprocessed_chat_config_check(preprocessed, local, capsys):
    rc = distill(["--config", str(CONF), "--check", *local, f"data.paths=[{preprocessed}]", "data.format=preprocessed"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(r"loss-bearing \(assistant\) fraction of the student positions 0\.\d+", err), err


def test_cache_teacher_on_chat_data(tmp_path, preprocessed, qwen3_path, capsys):
    """An offline teacher cached over the teacher's rendering; its documents keep the chat masks."""
    from nemo_xtoken.data.packing import DualTokenizedDataset
    from nemo_xtoken.data.documents import PreprocessedDocuments, as_document
    from nemo_xtoken.offline.teachers import CachedTeacherDocuments
    from nemo_xtoken.testing.hf import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "t", qwen3_path, vocab_size=151936, max_positions=512)
    rc = xtoken(["cache-teacher", "--hf-model", str(tiny), "--input", str(preprocessed), "--top-k", "4", "--output", str(tmp_path / "c"),
                 "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cached = CachedTeacherDocuments(tmp_path / "c")
    plain = PreprocessedDocuments(preprocessed)
    d, p = as_document(cached[3], 3), as_document(plain[3], 3)
    assert np.array_equal(d.student_loss_mask, p.student_loss_mask)
    assert np.array_equal(d.teachers[0].teacher_kd_mask, p.teachers[0].teacher_kd_mask)
    assert d.teachers[0].fields["teacher_topk_ids"].shape[0] == d.teachers[0].ids.shape[0]
    a = DualTokenizedDataset(cached, seq_length=256, teacher_seq_length=256, packing=True, shuffle=False)
    b = DualTokenizedDataset(plain, seq_length=256, teacher_seq_length=256, packing=True, shuffle=False)
    for k in ("loss_mask", "student_chunk_ids", "teacher_chunk_ids"):
        assert np.array_equal(a[0][k].numpy(), b[0][k].numpy()), k
    assert 0 < float(a[0]["loss_mask"].sum()) < 256


def test_two_teachers_pack_in_lock_step(chat_file, llama3_path, qwen3_path):
    """Qwen3 and Gemma-3 teachers of one student: each side's masks and alignment per teacher, packed together."""
    from nemo_xtoken.assets import tokenizer_path
    from nemo_xtoken.data.chat import ChatDocuments
    from nemo_xtoken.data.packing import DualTokenizedDataset
    from nemo_xtoken.data.batch import aligned_positions_from_batch, collate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = ChatDocuments(chat_file, llama3_path, [qwen3_path, str(tokenizer_path("gemma3"))], limit=12)
    assert len(docs) == 10 and len(docs.skipped) == 2 and [c[0] == c[1] > 0 for c in docs.coverage] == [True, True]
    d = docs[0]
    assert len(d.teachers) == 2 and d.student_loss_mask is not None
    ds = DualTokenizedDataset(docs, seq_length=256, teacher_seq_length=[256, 256], packing=True, shuffle=False)
    b = collate([ds[i] for i in range(len(ds))])
    q = aligned_positions_from_batch(b)
    g = aligned_positions_from_batch({k[:-2] if k.endswith("@1") else k: v for k, v in b.items() if k.endswith("@1") or k not in
                                      {x[:-2] for x in b if x.endswith("@1")}})
    # KD chunks: as many as the documents' KD chunks (minus those a cut leaves without a predicting position), per teacher
    assert int(q.chunk_mask().sum()) > 0 and int(g.chunk_mask().sum()) > 0
    assert int(b["loss_mask"].sum()) == sum(int(docs[i].student_loss_mask[1:].sum()) for i in range(len(docs))) - sum(
        int(docs[sg.doc].student_loss_mask[sg.s0]) for i in range(len(ds)) for sg in ds.segments(i) if sg.s0 > 0)
