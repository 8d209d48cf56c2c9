"""NeMo-Run dry-runs (local torchrun, 16 × 8 Slurm), the entry point's --check, and `xtoken export-hf` errors.

The dry-runs go through NeMo-Run's real schedulers (no cluster, no SSH): what is asserted is the
text NeMo-Run would execute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")

from nemo_xtoken.integration import launch as L  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "llama32_1b__qwen3_4b_pkl.yaml"
IMAGE = "registry.example.com/me/nemo-xtoken:26.08.01"


@pytest.mark.parametrize("conf", sorted((ROOT / "conf").glob("*.yaml")), ids=lambda p: p.stem)
def test_local_dry_run_is_torchrun_on_one_node(conf):
    script = L.distill_script(conf, ["train.train_iters=100", "teachers.0.weight=0.8"])
    d = L.dry_run(script, L.local_executor(8))
    assert d.kind == "local"
    cmd = d.command
    assert cmd[0] == "torchrun"
    assert cmd[cmd.index("--nnodes") + 1] == "1" and cmd[cmd.index("--nproc-per-node") + 1] == "8"
    tail = cmd[cmd.index("-m") :]
    assert tail == ["-m", L.ENTRY_MODULE, "--config", str(conf.resolve()), "train.train_iters=100", "teachers.0.weight=0.8"]
    assert d.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in d.text and "torchrun" in d.text


def test_slurm_dry_run_is_16_nodes_of_8_gpus_over_ssh_without_a_cluster():
    script = L.distill_script("/lustre/me/conf/run.yaml", ["train.train_iters=30000"], local=False)
    ex = L.slurm_executor(
        account="acct", partition="batch", host="login.example.com", user="me", job_dir="/lustre/me/jobs",
        container_mounts=["/lustre:/lustre"], time="04:00:00", container_image=IMAGE,
    )
    d = L.dry_run(script, ex, name="xtoken-pkl")
    s = d.text
    assert d.kind == "slurm" and s.startswith("#!/bin/bash")
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct",
                 "#SBATCH --partition=batch", "#SBATCH --time=04:00:00", "#SBATCH --exclusive"):
        assert line in s, line
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in s
    srun = next(l for l in s.splitlines() if l.startswith("srun "))
    assert f"--container-image {IMAGE}" in srun
    assert "/lustre:/lustre" in srun
    assert re.search(r"torchrun .*--nnodes 16 --nproc-per-node 8 --node-rank \$SLURM_NODEID", srun)
    assert srun.endswith(f"-m {L.ENTRY_MODULE} --config /lustre/me/conf/run.yaml train.train_iters=30000")
    assert "/lustre/me/jobs/xtoken-pkl" in s  # logs under the cluster job dir
    assert type(ex.tunnel).__name__ == "SSHTunnel"  # the caller's executor is left as it was


def test_launch_errors_before_anything_runs(tmp_path):
    from nemo_xtoken.errors import XTokenError

    with pytest.raises(XTokenError, match="does not exist"):
        L.distill_script(tmp_path / "missing.yaml")
    with pytest.raises(XTokenError, match="absolute path"):
        L.distill_script("conf/x.yaml", local=False)
    with pytest.raises(XTokenError, match="key.sub=value"):
        L.distill_script(CONF, ["train.train_iters"])
    with pytest.raises(XTokenError, match="account"):
        L.slurm_executor(account="", container_image=IMAGE)


def test_slurm_needs_the_plugin_image():
    """No default image: the stock NeMo image has no nemo_xtoken (every rank would fail to import it)."""
    from nemo_xtoken.errors import XTokenError

    with pytest.raises(XTokenError, match=r"--container-image is required.*docker build -f docker/Dockerfile.*push"):
        L.slurm_executor(account="a", container_image="")
    with pytest.raises(XTokenError, match=r"NVIDIA's NeMo image, which has no nemo_xtoken.*No module named nemo_xtoken"):
        L.slurm_executor(account="a", container_image=L.BASE_IMAGE)
    # the stock image with the plugin mounted and on PYTHONPATH is the user's explicit choice
    ex = L.slurm_executor(account="a", container_image=L.BASE_IMAGE, env={"PYTHONPATH": "/lustre/me/nemo_xtoken"})
    assert ex.container_image == L.BASE_IMAGE and ex.env_vars["PYTHONPATH"] == "/lustre/me/nemo_xtoken"
    r = subprocess.run(
        [sys.executable, "examples/launch_slurm.py", "--config", str(CONF), "--account", "acct", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert r.returncode == 2 and "--container-image" in r.stderr


def test_example_script_prints_the_sbatch_script():
    r = subprocess.run(
        [sys.executable, "examples/launch_slurm.py", "--config", str(CONF), "--account", "acct", "--nodes", "16",
         "--job-dir", "/tmp/xtoken-jobs", "--container-image", IMAGE, "--dry-run", "train.train_iters=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=16" in r.stdout
    assert f"-m nemo_xtoken.integration.train --config {CONF} train.train_iters=10" in r.stdout


def test_entry_point_check_validates_strictly(capsys):
    from nemo_xtoken.integration.train import main

    assert main(["--config", str(CONF), "--check", "--no-resources", "train.train_iters=100"]) == 0
    out = capsys.readouterr().out
    assert '"train_iters": 100' in out and '"lr_warmup_iters": 5' in out
    assert main(["--config", str(CONF), "--check", "--no-resources", "train.no_such_key=1"]) == 2
    assert "unknown key 'train.no_such_key'" in capsys.readouterr().err
    # relative run folders are printed as the config folder's (what every rank, in any working directory, uses)
    assert main(["--config", str(CONF), "--check", "--no-resources"]) == 0
    assert f'"save": "{CONF.parent / "checkpoints/llama32_1b__qwen3_4b_pkl"}"' in capsys.readouterr().out


# ---- xtoken export-hf ----------------------------------------------------------------------------


def _xtoken(*args):
    from nemo_xtoken.cli.main import main

    return main(list(args))


def test_export_hf_rejects_wrong_checkpoint_dirs(tmp_path, capsys):
    assert _xtoken("export-hf", "--checkpoint", str(tmp_path / "nope"), "--hf-model", "m", "-o", str(tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tb").mkdir()
    assert _xtoken("export-hf", "--checkpoint", str(tmp_path / "run"), "--hf-model", "m", "-o", str(tmp_path / "o")) == 2
    assert "no iter_N folders" in capsys.readouterr().err
    (tmp_path / "run" / "iter_0000010").mkdir()
    assert _xtoken("export-hf", "--checkpoint", str(tmp_path / "run"), "--hf-model", "m", "-o", str(tmp_path / "o")) == 2
    assert "iter_0000010 is not a Megatron distributed (torch_dist) checkpoint" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert _xtoken("export-hf", "--checkpoint", str(tmp_path / "file"), "--hf-model", "m", "-o", str(tmp_path / "o")) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_export_hf_picks_the_latest_iteration_and_refuses_non_empty_output(tmp_path, capsys):
    from nemo_xtoken.cli.integration_cmds import resolve_checkpoint

    run = tmp_path / "run"
    for it in (10, 200, 30):
        (run / f"iter_{it:07d}").mkdir(parents=True)
        (run / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    assert resolve_checkpoint(run).name == "iter_0000200"
    assert resolve_checkpoint(run / "iter_0000030").name == "iter_0000030"
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert _xtoken("export-hf", "--checkpoint", str(run), "--hf-model", "m", "-o", str(out)) == 2
    assert "not empty" in capsys.readouterr().err


# ---- issue 24: the Hugging Face cache offline on every rank; a 30k-step run as a chain of Slurm jobs ----------------


def test_slurm_ranks_get_the_hf_cache_offline_and_a_resubmission_chain(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    overrides = L.exit_duration_override("04:00:00", ["train.train_iters=30000"])
    assert overrides == ["train.train_iters=30000", "train.exit_duration_in_mins=225"]
    script = L.distill_script("/lustre/me/conf/run.yaml", overrides, local=False)
    ex = L.slurm_executor(account="acct", job_dir="/lustre/me/jobs", container_image=IMAGE, hf_home="/lustre/me/hf",
                          container_mounts=["/lustre:/lustre"])
    d = L.dry_run(script, ex, name="xt", chain=8)
    s = d.text
    for line in ("export HF_HUB_OFFLINE=1", "export HF_HOME=/lustre/me/hf", "export HF_TOKEN=${HF_TOKEN:-}", "#SBATCH --time=04:00:00"):
        assert line in s, line
    assert "hf_secret_value" not in s  # the token is read where the job runs, never written into the script
    srun = next(l for l in s.splitlines() if l.startswith("srun "))
    assert "/lustre:/lustre,/lustre/me/hf:/lustre/me/hf" in srun
    assert srun.endswith("--config /lustre/me/conf/run.yaml train.train_iters=30000 train.exit_duration_in_mins=225")
    assert s.startswith("# resubmission chain: 8 jobs of 04:00:00 (xt-part1 … xt-part8)")
    assert f"#SBATCH --dependency='afterany:{L.PREVIOUS_JOB}'" in s  # as NeMo-Run renders a later part
    assert ex.dependency_type == "afterany"
    # a user's own exit time wins; a limit too short for the margin is refused
    assert L.exit_duration_override("1-00:00:00", ["train.exit_duration_in_mins=600"]) == ["train.exit_duration_in_mins=600"]
    from nemo_xtoken.errors import XTokenError

    with pytest.raises(XTokenError, match=r"--time 00:20:00 leaves 5 minutes of training"):
        L.exit_duration_override("00:20:00", [])
    with pytest.raises(XTokenError, match=r"--hf-home hf: give the absolute path"):
        L.slurm_executor(account="acct", container_image=IMAGE, hf_home="hf")
    # submitting over SSH without --job-dir would write the script, logs and /nemo_run mount under this machine's path
    with pytest.raises(XTokenError, match=r"--job-dir is required with --host"):
        L.slurm_executor(account="acct", container_image=IMAGE, host="login.example.com", user="me")


@pytest.mark.parametrize("time,minutes", [("04:00:00", 240), ("90", 90), ("30:00", 30), ("1-00", 1440), ("2-12:30", 3630),
                                          ("1-02:03:04", 1563)])
def test_slurm_time_limits_in_minutes(time, minutes):
    assert L.slurm_time_minutes(time) == minutes


def test_local_ranks_get_the_hf_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    d = L.dry_run(L.distill_script(CONF), L.local_executor(2, hf_home=str(tmp_path / "hf")))
    assert d.env["HF_HUB_OFFLINE"] == "1" and d.env["HF_HOME"] == str(tmp_path / "hf")
    assert d.env["HF_TOKEN"] == "<set>" and "hf_secret_value" not in d.text
    # --env wins: a node that reaches the hub
    d = L.dry_run(L.distill_script(CONF), L.local_executor(2, env={"HF_HUB_OFFLINE": "0"}))
    assert d.env["HF_HUB_OFFLINE"] == "0"
    with pytest.raises(Exception, match="--chain needs Slurm"):
        L.launch(L.distill_script(CONF), L.local_executor(2), chain=2)


def _launch_slurm_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``examples/launch_slurm.py``'s own ``main`` in this process (NeMo-Run is imported here already; a fresh
    interpreter only re-imported it): its exit code, stdout and stderr.  test_example_script_prints_the_sbatch_script
    runs the file as a user does."""
    import importlib.util

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("launch_slurm_example", ROOT / "examples" / "launch_slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    rc = mod.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_example_slurm_script_chains_by_default(monkeypatch, capsys):
    rc, out, err = _launch_slurm_main(monkeypatch, capsys, "--config", str(CONF), "--account", "acct", "--job-dir", "/tmp/xtoken-jobs",
                                      "--container-image", IMAGE, "--hf-home", "/lustre/hf", "--time", "06:00:00", "--dry-run")
    assert rc == 0, err
    assert "# resubmission chain: 8 jobs of 06:00:00" in out and "train.exit_duration_in_mins=345" in out
    assert "export HF_HOME=/lustre/hf" in out and "#SBATCH --dependency='afterany:" in out


def test_a_run_whose_checkpoint_reached_train_iters_exits_at_once(tmp_path, capsys, llama3_path, qwen3_path):
    """A later part of a resubmission chain that starts after the last step: exit 0 before building any model."""
    import yaml

    from nemo_xtoken.integration.train import main

    ck = tmp_path / "checkpoints" / "run"
    ck.mkdir(parents=True)
    cfg = {"student": {"tokenizer": llama3_path}, "teachers": [{"name": "t", "tokenizer": qwen3_path, "loss": "uld"}],
           "train": {"train_iters": 100, "global_batch_size": 1}, "checkpoint": {"save": "checkpoints/run"}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    (ck / "latest_checkpointed_iteration.txt").write_text("100")
    assert main(["--config", str(p)]) == 0
    assert "the checkpoint holds iteration 100 ≥ train.train_iters=100: nothing left to train" in capsys.readouterr().err
    from nemo_xtoken.integration.config import load_config
    from nemo_xtoken.integration.train import finished_iteration

    (ck / "latest_checkpointed_iteration.txt").write_text("60")  # not done: resumed by Bridge from iteration 60
    assert finished_iteration(load_config(p), tmp_path) == 60
    (ck / "latest_checkpointed_iteration.txt").unlink()
    assert finished_iteration(load_config(p), tmp_path) is None
