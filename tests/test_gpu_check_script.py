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
    # the path a GPU run meets: packed samples, one per micro-batch (TE's THD attention; a CUDA run with TE takes it),
    # the CPU reference on the local spec with its mask attention
    assert (run["micro_batch_size"], run["packing"], run["layer_spec"], run["attention"]) == (1, True, "local", "mask")
    from nemo_xtoken.integration.config import load_config
    from nemo_xtoken.integration.train import check_packed_micro_batch

    check_packed_micro_batch(load_config(tmp_path / "w" / "run_phi3.yaml"))  # `xtoken distill --check` would accept it


def test_gpu_check_takes_the_te_spec_on_cuda_only(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    mod = importlib.import_module(SCRIPT.stem)
    assert mod.layer_spec("cuda", te=True) == "te"  # Bridge's TE spec where a GPU run would use it
    assert mod.layer_spec("cuda", te=False) == "local"
    assert mod.layer_spec("cpu", te=True) == "local"  # never TE layers on the CPU side
