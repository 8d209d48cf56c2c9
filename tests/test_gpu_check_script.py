"""``scripts/gpu_check_distill.py`` on its CPU path (the GPU run itself needs a GPU; see docs/megatron-bridge.md).

It builds its own tokenizers, W files and tiny checkpoints, then runs the run's path (config →
providers → conversion → Bridge's provide_distributed_model → ModelOpt → forward_step/loss_func →
AdamW) for one teacher and one step, and must report finite losses and PASS.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("megatron.bridge")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_distill.py"


def test_gpu_check_script_cpu_path(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the spawned run imports the script's module by name
    mod = importlib.import_module(SCRIPT.stem)
    out = tmp_path / "result.json"
    assert mod.main(["--device", "cpu", "--steps", "1", "--teachers", "phi3", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    text = capsys.readouterr().out
    assert "== teacher phi3 (DistillGPTModel" in text and text.strip().splitlines()[-1].startswith("PASS in ")
    result = json.loads(out.read_text())
    assert result["passed"] and list(result["runs"]) == ["phi3"]
    run = result["runs"]["phi3"]["cpu"]
    assert run["model_class"] == "DistillGPTModel" and run["param_device"] == "cpu" and len(run["steps"]) == 1
    step = run["steps"][0]
    assert all(math.isfinite(v) for v in step.values()) and step["kd/phi3"] > 0 and step["total loss"] > step["lm loss"]
