"""Lock-step packing: documents concatenated into full samples on the student side and every teacher side.

Real tokenizers (Llama-3 student; Qwen3 and o200k teachers) on real English text (State of the
Union addresses, Moby-Dick chapters).  What must hold: every token of every document lands in
exactly one sample, on every side, in order; each segment (a run of one document) covers the same
text on every side; nothing predicts across documents; chunk ids are renumbered into the sample;
the plan's statistics equal the built samples; the stream is a pure function of (seed, index).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_xtoken.align.core import token_bytes
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.data.documents import Document, MultiTeacherDocuments, PreprocessedDocuments, TeacherSide, TextDocuments, as_document
from nemo_xtoken.data.packing import DualTokenizedDataset, cut_points
from nemo_xtoken.data.batch import attention_inputs, collate, packed_attention_mask, packed_seq_params


def _real_texts(n_chars: int = 60_000) -> list[str]:
    """Moby-Dick chapters (long and short documents) plus a few with numerals and code, ~``n_chars`` in all."""
    from nemo_xtoken.assets import text_corpus

    texts, total = [], 0
    with open(text_corpus("moby-dick")) as f:
        for line in f:
            t = json.loads(line)["text"]
            texts.append(t)
            total += len(t)
            if total > n_chars:
                break
    texts += [
        "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it.",
        "def f(x):\n    return x ** 2  # 201 squared is 40401\n",
        "Short.",
    ]
    return texts


@pytest.fixture(scope="module")
def texts():
    return _real_texts()


@pytest.fixture(scope="module")
def docs2(texts, llama3, qwen3, o200k):
    """Two teachers (Qwen3, o200k) per document."""
    return TextDocuments(texts, llama3, [qwen3, o200k])


@pytest.fixture(scope="module")
def tbs(llama3, qwen3, o200k):
    return token_bytes(llama3), [token_bytes(qwen3), token_bytes(o200k)]


def _bytes(tb, ids) -> bytes:
    ids = [int(i) for i in ids]
    return b"".join(bytes(tb.buf[tb.start[i] : tb.start[i] + tb.length[i]]) for i in ids)


def _runs(seg: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    """(segment id, start, end) runs of the first ``n`` slots."""
    out, start = [], 0
    for q in range(1, n + 1):
        if q == n or seg[q] != seg[start]:
            out.append((int(seg[start]), start, q))
            start = q
    return out


def test_cut_points_are_chunk_boundaries_of_every_teacher(docs2):
    for d in range(len(docs2)):
        doc = docs2[d]
        cs, ct = cut_points(doc)
        assert cs[0] == 0 and cs[-1] == len(doc.student_ids) and (np.diff(cs) > 0).all()
        for m, tv in enumerate(doc.teachers):
            a = tv.alignment
            assert ct[m, 0] == 0 and ct[m, -1] == len(tv.ids) and (np.diff(ct[m]) >= 0).all()
            # every interior cut: the tokens before it are in chunks < the chunks of the tokens after it, both sides
            for s, t in zip(cs[1:-1], ct[m, 1:-1]):
                before = max(a.student_chunk_ids[s - 1], a.teacher_chunk_ids[t - 1] if t > 0 else -1)
                after = min(a.student_chunk_ids[s], a.teacher_chunk_ids[t] if t < len(tv.ids) else 1 << 60)
                assert before < after
        assert cs.size > 0.3 * len(doc.student_ids) or len(doc.student_ids) < 10  # English text: many common cuts


def test_packed_epoch_covers_every_token_once_on_every_side(docs2, tbs):
    S, T = (256, [272, 256])
    ds = DualTokenizedDataset(docs2, seq_length=S, teacher_seq_length=T, packing=True, seed=3)
    n = len(ds)
    assert n > 10
    got_s: dict[int, list] = {}
    got_t: dict[int, list[list]] = {}
    tbs_s, tbs_t = tbs
    for i in range(n):
        x = ds[i]
        segs = ds.segments(i)
        assert x["tokens"].shape == (S,) and x["teacher_tokens"].shape == (T[0],) and x["teacher_tokens@1"].shape == (T[1],)
        assert sum(s.s1 - s.s0 for s in segs) <= S + 1
        for m in range(2):
            assert sum(s.t1[m] - s.t0[m] for s in segs) <= T[m] + 1
        runs = _runs(x["segment_ids"], min(S, sum(s.s1 - s.s0 for s in segs)))
        assert [r[0] for r in runs] == list(range(len(segs)))
        for (j, a, b), sg in zip(runs, segs):
            doc = docs2[sg.doc]
            assert torch.equal(x["tokens"][a:b], torch.as_tensor(doc.student_ids[sg.s0 : sg.s0 + b - a]))
            assert torch.equal(x["position_ids"][a:b], torch.arange(b - a))  # per-document positions
            assert x["loss_mask"][b - 1] == 0 or b == S  # the segment's last position predicts nothing
            assert (x["loss_mask"][a : b - 1] == 1).all()
            assert torch.equal(x["labels"][a : b - 1], x["tokens"][a + 1 : b])
            got_s.setdefault(sg.doc, []).append((sg.s0, sg.s1))
            text = _bytes(tbs_s, doc.student_ids[sg.s0 : sg.s1])
            for m, sfx in enumerate(("", "@1")):
                tv = doc.teachers[m]
                assert _bytes(tbs_t[m], tv.ids[sg.t0[m] : sg.t1[m]]) == text  # the same text on every side
                got_t.setdefault(sg.doc, [[], []])[m].append((sg.t0[m], sg.t1[m]))
            # teacher segments: the same order, restarting positions
            for m, sfx in enumerate(("", "@1")):
                truns = _runs(x["teacher_segment_ids" + sfx], min(T[m], sum(s.t1[m] - s.t0[m] for s in segs)))
                assert [r[0] for r in truns] == [r[0] for r in runs if segs[r[0]].t1[m] > segs[r[0]].t0[m]]
        # padding: loss 0, no chunk
        pad = x["loss_mask"] == 0
        assert (x["student_chunk_ids"][pad] == -1).all() and (x["student_chunk_ids@1"][pad] == -1).all()
    assert sorted(got_s) == [d for d in range(len(docs2)) if len(docs2[d].student_ids)]
    # every cut the packer made is a cut point (a chunk boundary of every teacher, with its teacher offsets)
    cuts = 0
    for i in range(n):
        for sg in ds.segments(i):
            if sg.s1 < len(docs2[sg.doc].student_ids):
                cs, ct = cut_points(docs2[sg.doc])
                k = int(np.searchsorted(cs, sg.s1))
                assert cs[k] == sg.s1 and tuple(ct[:, k].tolist()) == sg.t1, sg
                cuts += 1
    assert cuts > 5
    for d, ranges in got_s.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == len(docs2[d].student_ids)
        assert all(p[1] == q[0] for p, q in zip(ranges, ranges[1:]))  # contiguous, no overlap
        for m in range(2):
            tr = sorted(got_t[d][m])
            assert tr[0][0] == 0 and tr[-1][1] == len(docs2[d].teachers[m].ids)
            assert all(p[1] == q[0] for p, q in zip(tr, tr[1:]))


def test_packed_chunks_predict_the_same_bytes_on_both_sides(docs2, tbs):
    ds = DualTokenizedDataset(docs2, seq_length=128, teacher_seq_length=[144, 128], packing=True, seed=0)
    tbs_s, tbs_t = tbs
    checked = 0
    for i in range(min(len(ds), 12)):
        x = ds[i]
        for m, sfx in enumerate(("", "@1")):
            sc, tc = x["student_chunk_ids" + sfx], x["teacher_chunk_ids" + sfx]
            nk = int(x["n_chunks" + sfx])
            assert sc.max() < nk and tc.max() < nk
            for k in range(nk):
                sp, tp = (sc == k).nonzero().flatten(), (tc == k).nonzero().flatten()
                if len(sp) and len(tp):
                    assert _bytes(tbs_s, x["student_targets" + sfx][sp]) == _bytes(tbs_t[m], x["teacher_targets" + sfx][tp])
                    # a chunk never spans two segments
                    assert x["segment_ids"][sp].unique().numel() == 1
                    assert x["teacher_segment_ids" + sfx][tp].unique().numel() == 1
                    checked += 1
    assert checked > 500


def test_a_whole_document_gets_its_own_alignment_in_the_sample(docs2):
    """A document packed whole has the chunk ids of ``Alignment.to_positions`` shifted to its slots."""
    ds = DualTokenizedDataset(docs2, seq_length=512, teacher_seq_length=[560, 512], packing=True, seed=1)
    found = 0
    for i in range(len(ds)):
        x, segs = ds[i], ds.segments(i)
        a_s, off = 0, 0
        t_used = 0
        for sg in segs:
            doc = docs2[sg.doc]
            n = sg.s1 - sg.s0
            whole = sg.s0 == 0 and sg.s1 == len(doc.student_ids) and a_s + n <= 512
            tv = doc.teachers[0]
            nt = sg.t1[0] - sg.t0[0]
            if whole and t_used + nt <= 560:
                ref = tv.alignment.to_positions(doc.student_ids, tv.ids)
                sc = x["student_chunk_ids"][a_s : a_s + n - 1]
                assert torch.equal(sc, torch.where(ref.student_chunk_ids[: n - 1] >= 0, ref.student_chunk_ids[: n - 1] + off, -1))
                tc = x["teacher_chunk_ids"][t_used : t_used + nt - 1]
                assert torch.equal(tc, torch.where(ref.teacher_chunk_ids[: nt - 1] >= 0, ref.teacher_chunk_ids[: nt - 1] + off, -1))
                assert torch.equal(x["teacher_targets"][t_used : t_used + nt - 1], ref.teacher_targets[: nt - 1])
                found += 1
            k = tv.alignment.teacher_chunk_ids
            ks = tv.alignment.student_chunk_ids
            ids = np.concatenate([ks[sg.s0 : sg.s1], k[sg.t0[0] : sg.t1[0]]])
            off += int(ids.max() - ids.min() + 1)
            a_s += n
            t_used += nt
        assert int(x["n_chunks"]) == off
    assert found >= 3


def test_plan_statistics_equal_the_built_samples_and_packing_fills_samples(docs2):
    S, T = 1024, [1152, 1152]  # longer than most of these documents: unpacked samples are mostly padding
    packed = DualTokenizedDataset(docs2, seq_length=S, teacher_seq_length=T, packing=True, seed=2)
    plain = DualTokenizedDataset(docs2, seq_length=S, teacher_seq_length=T, on_too_long="split", seed=2)
    for ds in (packed, plain):
        st = ds.packing_stats()
        xs = [ds[i] for i in range(len(ds))]
        assert st.samples == len(ds)
        assert st.loss_positions == int(sum(float(x["loss_mask"].sum()) for x in xs))
        assert st.loss_fraction == pytest.approx(st.loss_positions / (len(ds) * S))
        for m, sfx in enumerate(("", "@1")):  # positions holding a teacher token
            held = sum(int((x["teacher_tokens" + sfx] != 0).sum()) for x in xs)
            ends = [min(T[m], sum(s.t1[m] - s.t0[m] for s in ds.segments(i))) for i in range(len(ds))]
            assert st.teacher_fill[m] == pytest.approx(sum(ends) / (len(ds) * T[m]))
            assert abs(held - sum(ends)) <= 0.01 * sum(ends)  # (a real token may have id 0: "!")
    sp, su = packed.packing_stats(), plain.packing_stats()
    # real text, real tokenizers: every packed sample but the epoch's last (partial) one is full
    per_sample = sorted(float(packed[i]["loss_mask"].mean()) for i in range(len(packed)))
    assert min(per_sample[1:]) > 0.98 and sp.loss_fraction > 0.9, (per_sample, sp)
    assert su.loss_fraction < 0.8 * sp.loss_fraction, su  # one piece per sample pads the rest
    assert sp.samples < su.samples
    assert sp.split_documents > 0 and sp.documents == su.documents


def test_stream_is_a_pure_function_of_seed_and_index(docs2):
    kw = dict(seq_length=200, teacher_seq_length=[220, 200], packing=True)
    a = DualTokenizedDataset(docs2, seed=5, **kw)
    b = DualTokenizedDataset(docs2, seed=5, **kw)
    c = DualTokenizedDataset(docs2, seed=6, **kw)
    n0 = len(a)
    n1 = a._epoch_count(1)
    # resume: a fresh dataset asked from deep into epoch 1 gives the same samples
    for i in (n0 + n1 - 1, n0 + 3, 2, n0 - 1, n0 + n1 + 4):
        xa, xb = a[i], b[i]
        assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa), i
    assert [a.segments(i) for i in range(5)] != [c.segments(i) for i in range(5)]
    # every epoch covers every document; epochs are ordered differently
    for e, (lo, hi) in enumerate(((0, n0), (n0, n0 + n1))):
        docs = {s.doc for i in range(lo, hi) for s in a.segments(i)}
        assert docs == set(range(len(docs2))), e
    assert [a.segments(i) for i in range(n0)] != [a.segments(n0 + i) for i in range(min(n0, n1))]


def test_one_teacher_tuples_and_preprocessed_folders_pack_the_same(tmp_path, texts, llama3_path, qwen3_path, o200k_path):
    from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess

    sub = texts[-4:]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in sub))
    outs = []
    for name, tok in (("q", qwen3_path), ("o", o200k_path)):
        preprocess(str(p), str(tmp_path / name), PreprocessOptions(llama3_path, tok, shard_size=4), progress=False)
        outs.append(PreprocessedDocuments(tmp_path / name))
    kw = dict(seq_length=96, teacher_seq_length=[104, 96], packing=True, seed=4)
    from_folders = DualTokenizedDataset(MultiTeacherDocuments(outs), **kw)
    from_text = DualTokenizedDataset(TextDocuments(p, llama3_path, [qwen3_path, o200k_path]), **kw)
    assert len(from_folders) == len(from_text)
    for i in range(len(from_text)):
        x, y = from_folders[i], from_text[i]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), i
    one = DualTokenizedDataset(outs[0], seq_length=96, teacher_seq_length=104, packing=True, seed=4)
    assert "teacher_tokens@1" not in one[0] and one[0]["teacher_tokens"].shape == (104,)
    # a source made from another input is refused, naming the document
    q = tmp_path / "other.jsonl"
    q.write_text("".join(json.dumps({"text": t + " extra"}) + "\n" for t in sub))
    preprocess(str(q), str(tmp_path / "x"), PreprocessOptions(llama3_path, o200k_path, shard_size=4), progress=False)
    with pytest.raises(XTokenError, match=r"document 0: .*source 1 .*source 0.*different inputs"):
        DualTokenizedDataset(MultiTeacherDocuments([outs[0], PreprocessedDocuments(tmp_path / "x")]), **kw)


def test_teacher_fields_are_packed_like_teacher_ids(docs2):
    """The extension point for cached teachers: per-teacher-token arrays travel with the teacher's ids."""

    class WithFields:
        def __len__(self):
            return len(docs2)

        def __getitem__(self, i):
            d = docs2[i]
            sides = [TeacherSide(t.ids, t.alignment, {"teacher_cached": np.stack([t.ids * 2.0, -t.ids], 1).astype(np.float32)}) for t in d.teachers]
            return Document(d.student_ids, sides)

        def lengths(self):
            return docs2.lengths()

    ds = DualTokenizedDataset(WithFields(), seq_length=128, teacher_seq_length=[140, 128], packing=True, seed=0)
    for i in range(4):
        x = ds[i]
        for sfx in ("", "@1"):
            f, ids = x["teacher_cached" + sfx], x["teacher_tokens" + sfx]
            n = min(ids.shape[0], sum(s.t1[0 if not sfx else 1] - s.t0[0 if not sfx else 1] for s in ds.segments(i)))
            assert f.shape == (ids.shape[0], 2) and f.dtype == torch.float32
            assert torch.equal(f[:n, 0], ids[:n].float() * 2) and torch.equal(f[:n, 1], -ids[:n].float())
            assert (f[n:] == 0).all()


def test_document_errors_name_the_document(docs2, llama3, qwen3):
    d = docs2[0]
    bad = Document(d.student_ids[:-1], d.teachers)
    with pytest.raises(XTokenError, match="document 7, teacher 0: the alignment covers"):
        as_document(bad, 7)
    with pytest.raises(XTokenError, match="document 3: a document source must give"):
        as_document([1, 2], 3)
    # a budget smaller than one unit that cannot be cut
    with pytest.raises(XTokenError, match=r"document \d+: the text between student tokens .* does not fit one sample"):
        DualTokenizedDataset(docs2, seq_length=1, teacher_seq_length=1, packing=True)


def test_attention_inputs_for_packed_batches():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    m = packed_attention_mask(seg)
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.bool
    allowed = ~m[0, 0]
    for q in range(8):
        for k in range(8):
            assert bool(allowed[q, k]) == (k <= q and seg[0, q] == seg[0, k])
    p = packed_seq_params(seg)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 5, 8] and p.max_seqlen_q == 3
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_kv is p.cu_seqlens_q
    with pytest.raises(XTokenError, match="micro_batch_size: 1"):
        packed_seq_params(seg.expand(2, -1))
    # one segment per sample: the model's own causal mask is the same thing
    assert attention_inputs(torch.zeros(2, 8, dtype=torch.long), "mask") == {"attention_mask": None}
    assert attention_inputs(None, "thd") == {"attention_mask": None}
    assert set(attention_inputs(seg, "thd")) == {"attention_mask", "packed_seq_params"}
    with pytest.raises(XTokenError, match="'mask' or 'thd'"):
        attention_inputs(seg, "flash")


def test_collated_packed_batch_keeps_every_field(docs2):
    ds = DualTokenizedDataset(docs2, seq_length=64, teacher_seq_length=[72, 64], packing=True)
    b = collate([ds[i] for i in range(3)])
    assert b["segment_ids"].shape == (3, 64) and b["teacher_segment_ids@1"].shape == (3, 64)
    assert b["n_chunks@1"].shape == (3,)
