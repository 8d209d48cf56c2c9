"""benchmarks/gpu_losses.py runs in its CPU smoke mode: every row timed, finite, the parity check passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_loss_benchmark_runs_on_cpu_small(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_losses.py"), "--device", "cpu", "--small", "--tokens", "16",
         "--block-size", "8", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    names = {(row["loss"], row["teacher"]) for row in res["rows"]}
    assert {("kl_plain", "same"), ("kl", "same"), ("p_kl", "qwen3"), ("h_kl", "o200k"), ("gold", "o200k")} <= names
    assert all(row["time"] > 0 and row["peak"] is None for row in res["rows"])  # no CUDA memory counter on the CPU
    assert [p["loss"] for p in res["parity"]] == ["p_kl", "h_kl", "gold"]
    for p in res["parity"]:
        # the device gradient is bf16 (the inputs' dtype): half an ulp is 2e-3 relative
        assert p["value_rel_err"] < 1e-3 and p["grad_max_abs_err"] < 1e-2 * max(p["grad_scale"], 1e-6)
    assert "fwd+bwd" in r.stdout and "parity" in r.stdout


def test_gpu_loss_benchmark_refuses_missing_cuda():
    import torch

    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_losses.py"), "--small"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "--device cpu --small" in r.stderr
