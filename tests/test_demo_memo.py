"""The demo's MemoTeacher: a frozen teacher's logits computed once per story are the live teacher's.

The full demo reads each student story about 25 times; the memo makes every epoch after the first
free.  These tests pin what makes that safe: the memoized logits equal a live forward of the same
rows at any batch width and composition, a wider request recomputes, non-standard inputs and
``live=True`` bypass the memo, and a KD student trained for several epochs gives the same loss
curve with the memo as with the teacher run live at every step.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def fast_data(llama3, qwen3, o200k):
    from nemo_xtoken.demo.corpus import story_splits
    from nemo_xtoken.demo.data import build_demo_data
    from nemo_xtoken.demo.run import FAST
    from nemo_xtoken.vocab import cached_projection

    toks = {"qwen3": qwen3, "o200k": o200k, "llama3": llama3}
    teachers = {n: (t, None if n == "llama3" else cached_projection(llama3, t)) for n, t in toks.items()}
    cfg = replace(FAST, n_student_stories=40)
    t, s, e = story_splits(cfg.n_teacher_stories, cfg.n_student_stories, cfg.n_eval_stories, seed=cfg.corpus_seed)
    return cfg, build_demo_data(llama3, teachers, t, s, e, seq_length=cfg.seq_length, teacher_seq_length=cfg.teacher_seq_length)


def _in_megatron(fn, *args):
    """Run ``fn(*args)`` in a fresh forked process with a one-rank CPU Megatron (as the demo's jobs run)."""
    from nemo_xtoken.cpu.megatron import spawn

    return spawn(_entry, 1, fn, *args, timeout=600)[0]


def _entry(rank, world, fn, *args):
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, init_megatron_cpu

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=3)
    with cpu_megatron_patches():
        return fn(*args)


def _memo_vs_live(cfg, data):
    from nemo_xtoken.demo.train import MemoTeacher, _build, _mask

    side = data.sides["o200k"]
    teacher = _build(side.vocab_size, cfg.teacher_size, data.teacher_seq_length, 5).eval()
    memo = MemoTeacher(teacher)
    train = side.student_train
    out = []
    with torch.no_grad():
        # epoch 1 in batches of 4, then the same stories in other batches (2 epochs), then one wide batch of all
        orders = [list(range(len(train))), list(range(len(train)))[::-1], [(7 * i) % len(train) for i in range(len(train))]]
        for order in orders:
            for i in range(0, len(order), 4):
                b = train.rows(order[i : i + 4])
                ids = b["teacher_tokens"]
                args = (ids, b["teacher_position_ids"], _mask(ids.shape[1]))
                got, want = memo(*args), teacher(*args)
                # positions past a row's own length are padding: the loss never reads them, compare real ones
                n = (ids != 0).cumsum(1).argmax(1) + 1
                for r in range(ids.shape[0]):
                    out.append(float((got[r, : n[r]] - want[r, : n[r]]).abs().max()))
        hits_before = memo.hits
        ids = train.rows(list(range(len(train))))["teacher_tokens"]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        memo(ids, pos, _mask(ids.shape[1]))
        wide_hits = memo.hits - hits_before
        odd = (pos + 1, memo.hits)  # shifted positions: not the standard input, must run live
        memo(ids, odd[0], _mask(ids.shape[1]))
        bypassed = memo.hits == odd[1]
        live = MemoTeacher(teacher, live=True)
        live(ids, pos, _mask(ids.shape[1]))
    return {"max_diff": max(out), "hits": memo.hits, "misses": memo.misses, "n": len(train), "wide_hits": wide_hits,
            "bypassed": bypassed, "live_memo": len(live._memo)}


def test_memo_equals_live_teacher_at_any_batch(fast_data):
    cfg, data = fast_data
    r = _in_megatron(_memo_vs_live, cfg, data)
    assert r["max_diff"] <= 1e-5, r  # same rows, other batch compositions: float rounding at most
    assert r["misses"] >= r["n"] and r["hits"] >= 2 * r["n"] - 4, r  # epochs 2 and 3 served from the memo
    assert r["bypassed"] and r["live_memo"] == 0, r


def _train_student(cfg, data, weights, live, kd_weight=None):
    from nemo_xtoken.demo import train
    from nemo_xtoken.demo.train import Job, TeacherUse

    train.set_shared(data, None)
    job = Job(name="s", kind="student", teachers=(TeacherUse("qwen3", "p_kl"),), steps=15, batch=8, lr=cfg.student_lr,
              size=cfg.size, seed=1, data_seed=1, eval_every=100, n_eval_curve=4, teacher_weights={"qwen3": weights},
              teacher_size=cfg.teacher_size, teacher_seed=cfg.teacher_seed, live_teachers=live, kd_weight=kd_weight)
    return train._train(job)


def _save_teacher(cfg, data, path):
    from safetensors.torch import save_file

    from nemo_xtoken.demo.train import _build, _tensor_state

    save_file(_tensor_state(_build(data.sides["qwen3"].vocab_size, cfg.teacher_size, data.teacher_seq_length, cfg.teacher_seed)), path)


def test_memo_student_trains_as_with_live_teacher(fast_data, tmp_path):
    """15 steps of 8 over 40 stories: three epochs, the last two from the memo; the loss curve is the live one."""
    cfg, data = fast_data
    w = str(tmp_path / "teacher.safetensors")
    _in_megatron(_save_teacher, cfg, data, w)
    memo = _in_megatron(_train_student, cfg, data, w, False)
    live = _in_megatron(_train_student, cfg, data, w, True)
    a, b = torch.tensor(memo["curves"]["loss"]), torch.tensor(live["curves"]["loss"])
    assert a.shape == (15,) and torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    assert torch.allclose(torch.tensor(memo["curves"]["kd"]), torch.tensor(live["curves"]["kd"]), rtol=1e-4, atol=1e-7)
    assert memo["exact"] == live["exact"]


def test_fixed_kd_weight_student(fast_data, tmp_path):
    """--kd-weight w: the student's loss is CE + w·KD at every step (not dynamic scaling), and the probe uses w."""
    cfg, data = fast_data
    w = str(tmp_path / "teacher.safetensors")
    _in_megatron(_save_teacher, cfg, data, w)
    r = _in_megatron(_train_student, cfg, data, w, False, 2.5)
    c = r["curves"]
    ce, kd, loss = (torch.tensor(c[k], dtype=torch.float64) for k in ("ce", "kd", "loss"))
    assert torch.allclose(loss, ce + 2.5 * kd, rtol=1e-5), (loss - ce - 2.5 * kd).abs().max()
    assert c["scale"] == [2.5] * 15
    dyn = ce / kd.abs()
    assert (dyn - 2.5).abs().min() > 0.1  # dynamic scaling would have used another weight


def _greedy_vs_naive(cfg, data):
    """The demo's batched, length-sorted, early-stopping greedy decode against one prompt at a time, four tokens each."""
    from dataclasses import replace as dc_replace

    from nemo_xtoken.demo.train import _build, _gather, _mask, greedy_answers

    side = data.sides["qwen3"]  # digits split: answers span several tokens
    model = _build(side.vocab_size, cfg.teacher_size, data.teacher_seq_length, 11).eval()
    texts, v = side.token_texts, side.vocab_size
    naive = []
    with torch.no_grad():
        for ids in side.prompts.ids:
            x = torch.as_tensor(ids)[None]
            out = ""
            for _ in range(4):
                m = x.shape[1]
                t = int(_gather(model(x, torch.arange(m)[None], _mask(m)), v)[0, -1].argmax())
                out += texts[t]
                x = torch.cat([x, torch.tensor([[t]])], 1)
            naive.append(out)
    # answers that make `exact` non-trivial: prefixes of the naive output (right, or right but followed by a digit) and wrong ones
    answers = []
    for i, o in enumerate(naive):
        k = 1 + i % max(1, len(o))
        answers.append(o[:k] if i % 3 else "7" + o[:k])
    prompts = dc_replace(side.prompts, answers=answers)
    want = [o.startswith(a) and not o[len(a) : len(a) + 1].isdigit() for o, a in zip(naive, answers)]
    with torch.no_grad():
        got = greedy_answers(model, prompts, texts, v, batch=7, full=3)
    return {"naive": naive, "want": want, "got": got}


def test_greedy_decode_equals_one_prompt_at_a_time(fast_data):
    cfg, data = fast_data
    r = _in_megatron(_greedy_vs_naive, cfg, data)
    naive, want, got = r["naive"], r["want"], r["got"]
    assert 0 < sum(want) < len(want), want  # the answers test both outcomes
    assert got["exact"] == sum(want) / len(want)
    outs = got["outputs"]
    assert outs[:3] == naive[:3]  # the sample rows decode all four tokens
    assert all(n.startswith(o) and o for o, n in zip(outs, naive))  # the others stop early, on the same tokens
    assert sum(len(o) < len(n) for o, n in zip(outs, naive)) > 0  # and some did stop early
