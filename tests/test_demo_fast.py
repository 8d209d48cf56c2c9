"""`xtoken demo --fast` end to end: audits, teachers, six students, table/plot/JSON well-formed and finite.

Asserts what a tiny run can promise — the outputs exist, every figure is finite, the teachers learned
something (held-out exact answers above chance) — not the paper's direction (the full demo reports that).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, llama3, qwen3):  # the fixtures make sure the real tokenizers are there
    import os

    out = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")  # teachers trained fresh (the demo caches them here)
    env = dict(os.environ)
    from nemo_xtoken.assets import cache_dir

    (cache / "tokenizers").symlink_to(cache_dir() / "tokenizers")
    if (cache_dir() / "projections").is_dir():
        (cache / "projections").symlink_to(cache_dir() / "projections")
    env["XTOKEN_CACHE"] = str(cache)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, whatever is installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "nemo_xtoken.cli.main", "demo", "--fast", "--no-progress", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, cache


def test_outputs_exist_and_are_well_formed(demo_out):
    out, stdout, _ = demo_out
    for name in ("audits.json", "results.json", "results.md", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audits = json.loads((out / "audits.json").read_text())
    assert set(audits) == {"qwen3", "o200k"}
    assert stdout.index("recommended loss: p_kl") < stdout.index("recommended loss: h_kl") < stdout.index("exact answer")
    r = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in r["methods"]]
    assert labels == ["CE only", "ULD ← Qwen3", "GOLD ← Qwen3", "P-KL ← Qwen3", "GOLD ← o200k", "H-KL ← o200k"]
    for row in r["table"]:
        assert 0.0 <= row["exact"] <= 1.0 and 0.0 <= row["numeral_mass"] <= 1.0 + 1e-6
        assert math.isfinite(row["ce"])
        assert (row["kd"] is None) == (row["method"] == "CE only")
        assert row["kd"] is None or math.isfinite(row["kd"])
    for label, s in r["students"].items():
        c = s["curves"]
        assert len(c["loss"]) == r["config"]["student_steps"] and all(math.isfinite(x) for x in c["loss"] + c["ce"] + c["kd"])
        assert len(c["eval_exact"]) == len(c["eval_step"]) >= 2
    for line in ("CE only", "P-KL ← Qwen3", "H-KL ← o200k"):
        assert line in (out / "results.md").read_text()


def test_teachers_learned_something_and_are_cached(demo_out):
    out, _, cache = demo_out
    r = json.loads((out / "results.json").read_text())
    for name, t in r["teachers"].items():
        # chance: guessing a 1–3-digit price ≈ 1/999; the teachers copy the price from the question
        assert t["exact"] > 0.05, (name, t["exact"])
        assert not t["cached"]
    assert len(list((cache / "demo").glob("teacher-*.safetensors"))) == 2
