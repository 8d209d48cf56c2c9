"""The demo's regime: students see each story at most once, and no KD student trains under a teacher weaker than CE only."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nemo_xtoken.demo.run import FAST, FULL, TeacherGateError, sampler_usage, teacher_gate
from nemo_xtoken.demo.train import run_job as _REAL_RUN_JOB


@pytest.fixture(scope="module")
def small_data(llama3, qwen3):
    from nemo_xtoken.demo.corpus import story_splits
    from nemo_xtoken.demo.data import build_demo_data

    t, s, e = story_splits(20, 48, 10, seed=0)
    return build_demo_data(llama3, {"llama3": (llama3, None)}, t, s, e, seq_length=FAST.seq_length, teacher_seq_length=FAST.teacher_seq_length)


def test_full_demo_corpus_covers_the_step_budget():
    for cfg in (FULL, FAST, replace(FULL, student_steps=2000), replace(FULL, batch=32)):
        assert cfg.student_stories() >= cfg.student_steps * cfg.batch
    assert replace(FULL, student_steps=100).student_stories() == FULL.student_stories()  # fewer steps: same corpus, same cached teachers


def test_sampler_never_repeats_a_story_within_the_budget(small_data):
    train = small_data.sides["llama3"].student_train
    steps, batch = 6, 8  # 48 samples: exactly one pass over the 48 stories
    for seed in (1, 2, 3):
        u = sampler_usage(train, seed, steps * batch)
        assert u == {"stories": 48, "drawn": 48, "distinct": 48, "epochs": 1.0, "max_draws": 1}
        # what a student really trains on: the batches of the stream, every row a story not seen before
        rows = [tuple(r.tolist()) for k in range(steps) for r in train.batch(k * batch, batch, seed)["tokens"]]
        assert len(set(rows)) == len(rows) == 48
    assert sampler_usage(train, 1, 24)["epochs"] == 0.5
    over = sampler_usage(train, 1, 60)  # past the corpus: the record says so
    assert over["epochs"] == 1.25 and over["max_draws"] == 2


def _recording_run_job(job):
    """The real job, its name appended to ``$XTOKEN_TEST_STARTED`` first (runs in the forked worker)."""
    import os

    with open(os.environ["XTOKEN_TEST_STARTED"], "a") as f:
        f.write(job.name + "\n")
    return _REAL_RUN_JOB(job)


def _t(copy, add, mul):
    return {"exact_copy": copy, "exact_add": add, "exact_mul": mul}


def test_teacher_gate_names_teacher_category_and_both_figures():
    ce = {"1": _t(0.5, 0.194, 0.3), "2": _t(0.4, 0.15, 0.35)}
    assert teacher_gate({"o200k": _t(0.9, 0.8, 0.9)}, ce) == []
    bad = teacher_gate({"qwen3": _t(0.9, 0.174, 0.9), "o200k": _t(0.9, 0.8, 0.35)}, ce)
    assert len(bad) == 2
    assert "teacher qwen3" in bad[0] and "add" in bad[0] and "17.4%" in bad[0] and "19.4%" in bad[0] and "seed 1" in bad[0]
    assert "teacher o200k" in bad[1] and "mul" in bad[1] and "35.0%" in bad[1] and "seed 2" in bad[1]  # a tie is not stronger


def test_demo_stops_before_any_kd_student_when_a_teacher_is_weaker(tmp_path, monkeypatch, llama3, qwen3):
    """A one-step teacher answers nothing: the run stops after the teacher and CE only, naming both figures."""
    pytest.importorskip("megatron.core")
    from nemo_xtoken.demo import train
    from nemo_xtoken.demo.run import run_demo

    from nemo_xtoken.assets import cache_dir

    cache = tmp_path / "cache"  # a fresh teacher (trained here), the real tokenizers and W
    cache.mkdir()
    (cache / "tokenizers").symlink_to(cache_dir() / "tokenizers")
    if (cache_dir() / "projections").is_dir():
        (cache / "projections").symlink_to(cache_dir() / "projections")
    monkeypatch.setenv("XTOKEN_CACHE", str(cache))
    started = tmp_path / "started.txt"
    monkeypatch.setenv("XTOKEN_TEST_STARTED", str(started))
    monkeypatch.setattr(train, "run_job", _recording_run_job)
    cfg = replace(FAST, teacher_steps=1, n_teacher_stories=40, n_eval_stories=20, methods=("ce", "pkl_qwen3"), teacher_gate=True)
    partial = []
    with pytest.raises(TeacherGateError, match=r"teacher qwen3 answers .*% of the held-out (copy|add|mul) answers exactly, the CE-only student \(seed 1\) "):
        run_demo(cfg, progress=False, log=lambda *a: None, on_partial=partial.append)
    assert sorted(started.read_text().split("\n")[:-1]) == ["CE only", "teacher qwen3"]
    # what finished before the stop is handed out: CE only, for its seed
    assert [[m["label"] for m in p["methods"]] for p in partial] == [["CE only"]]
    assert list(partial[0]["students"]["1"]) == ["CE only"] and partial[0]["data"]["student_max_draws"] == 1
