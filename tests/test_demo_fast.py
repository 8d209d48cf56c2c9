"""`xtoken demo --fast` end to end: audits, three teachers, nine students, table/claims/plot/JSON.

Asserts what a tiny run can promise — every output is there and finite, the regime is the paper's
(every token of the students' stories in the loss), the teachers learned (held-out CE far below a
uniform guess), teachers are cached and reused, and the same command gives the same figures (a second
run, in a fresh process) — not the paper's direction (the full demo measures that).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("matplotlib")

LABELS = [
    "CE only",
    "KD ← Llama-3 (same tokenizer)",
    "ULD ← Qwen3",
    "GOLD ← Qwen3",
    "P-KL ← Qwen3",
    "P-KL ← Qwen3, learnable W",
    "GOLD ← o200k",
    "H-KL ← o200k",
    "H-KL ← o200k 0.8 + KL ← Llama-3 0.2",
]


KEYS = ["ce", "kd_llama3", "uld_qwen3", "gold_qwen3", "pkl_qwen3", "pkl_learned_w_qwen3", "gold_o200k", "hkl_o200k", "two_teachers"]


def _demo(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XTOKEN_CACHE"] = str(cache)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, whatever is installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "nemo_xtoken.cli.main", "demo", "--fast", "--no-progress", "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, llama3, qwen3, o200k):  # the fixtures make sure the real tokenizers are there
    from nemo_xtoken.assets import cache_dir

    cache = tmp_path_factory.mktemp("cache")  # teachers trained fresh (the demo caches them here)
    (cache / "tokenizers").symlink_to(cache_dir() / "tokenizers")
    if (cache_dir() / "projections").is_dir():
        (cache / "projections").symlink_to(cache_dir() / "projections")
    out = tmp_path_factory.mktemp("demo")
    # the nine methods (the default run leaves out ULD and learnable W): the CLI's own main in this process, whose
    # imports (Megatron-core, ModelOpt) are in place; the training workers are forked from here as from `xtoken demo`
    from nemo_xtoken.cli.main import main

    buf = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
            mp.setenv("XTOKEN_CACHE", str(cache))
            rc = main(["demo", "--fast", "--no-progress", "-o", str(out), "--methods", ",".join(KEYS)])
    finally:
        gc.unfreeze()  # the command freezes its heap for its own process's sake; the suite's objects stay collectable
    assert rc == 0, buf.getvalue()[-3000:]
    again = tmp_path_factory.mktemp("demo_again")
    _demo(again, cache, "--methods", "ce,pkl_qwen3")  # a fresh process as a user runs it: teachers cached now; same seed
    return out, buf.getvalue(), cache, again


def test_outputs_exist_and_are_well_formed(demo_out):
    out, stdout, _, _ = demo_out
    for name in ("audits.json", "results.json", "results.md", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "audits.json").read_text())) == {"qwen3", "o200k"}
    assert stdout.index("recommended loss: p_kl") < stdout.index("recommended loss: h_kl") < stdout.index("exact answer")
    r = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in r["methods"]] == LABELS
    (seed,) = r["students"]
    steps = r["config"]["student_steps"]
    for label, s in r["students"][seed].items():
        for key in ("exact", "exact_copy", "exact_add", "exact_mul", "eval_acc_numeral", "eval_acc_word"):
            assert 0.0 <= s[key] <= 1.0, (label, key)
        assert math.isfinite(s["eval_ce"]) and ("eval_kd" in s) == (label != "CE only")
        c = s["curves"]
        assert len(c["loss"]) == steps and all(math.isfinite(x) for x in c["loss"] + c["ce"] + c["kd"])
        assert len(c["eval_exact"]) == len(c["eval_step"]) >= 2
        if label != "CE only":  # the gradient probe ran
            assert len(c["probe_cos"]) == len(c["eval_step"]) and all(-1.0 <= x <= 1.0 for x in c["probe_cos"])
    assert r["students"][seed]["P-KL ← Qwen3, learnable W"]["w_drift"]["mean_abs_change"] > 0  # W was trained
    md = (out / "results.md").read_text()
    for line in LABELS + ["P-KL ← Qwen3 > CE only", "H-KL ← o200k > GOLD ← o200k", "38.85"]:
        assert line in md, line


def test_every_token_is_trained_on(demo_out):
    out, _, _, _ = demo_out
    d = json.loads((out / "results.json").read_text())["data"]
    assert d["student_loss_tokens"] == d["student_tokens"] - d["student_stories"]  # all but each story's first token


def test_teachers_learned_are_cached_and_the_run_is_deterministic(demo_out):
    out, _, cache, again = demo_out
    r = json.loads((out / "results.json").read_text())
    for name, t in r["teachers"].items():
        vocab = r["data"][f"{name}_vocab"]
        assert t["eval_ce"] < 0.8 * math.log(vocab), (name, t["eval_ce"], math.log(vocab))  # far below a uniform guess
        assert not t["cached"]
    assert len(list((cache / "demo").glob("teacher-*.safetensors"))) == 3
    r2 = json.loads((again / "results.json").read_text())
    assert all(t["cached"] for t in r2["teachers"].values()) and set(r2["teachers"]) == {"qwen3"}
    for label in ("CE only", "P-KL ← Qwen3"):
        a, b = r["students"]["1"][label], r2["students"]["1"][label]
        assert a["curves"]["loss"] == b["curves"]["loss"] and a["exact"] == b["exact"] and a["eval_ce"] == b["eval_ce"], label
