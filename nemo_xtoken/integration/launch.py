"""NeMo-Run launch of X-Token runs: one node under ``torchrun`` or a Slurm job (16 × 8 H100 by default).

The task is ``run.Script`` running ``python -m nemo_xtoken.integration.train --config FILE k=v…``
(Bridge's NeMo-Run plugins take ``run.Script``, not ``run.Partial``), under
``run.LocalExecutor(ntasks_per_node=8, launcher="torchrun")`` or ``run.SlurmExecutor`` with the
torchrun launcher (one ``torchrun --nproc-per-node 8`` per node, started by ``srun``).  On Slurm
the code comes from the container image, so nothing is packaged (NeMo-Run's base ``Packager`` copies
no code): the image must be the one ``docker/Dockerfile`` builds (NeMo Framework + the plugin),
pushed to a registry the cluster pulls from.  There is no default image; NVIDIA's stock NeMo image
is refused (every rank would fail with ``No module named nemo_xtoken``) unless ``env`` sets
``PYTHONPATH`` to a mounted copy of the plugin.  The config, W files, data and checkpoints must sit
on a file system the nodes mount; relative paths in the config resolve against its folder.

:func:`dry_run` renders exactly what would run — the sbatch script, or the torchrun command and its
environment — through NeMo-Run's own schedulers, without a cluster and without SSH.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nemo_xtoken.errors import XTokenError

__all__ = [
    "ENTRY_MODULE",
    "DEFAULT_ENV",
    "BASE_IMAGE",
    "PLUGIN_IMAGE_TAG",
    "check_container_image",
    "parse_env",
    "check_slurm_time",
    "require_nemo_run",
    "distill_script",
    "local_executor",
    "slurm_executor",
    "DryRun",
    "dry_run",
    "launch",
]

ENTRY_MODULE = "nemo_xtoken.integration.train"
#: The NeMo Framework image ``docker/Dockerfile`` builds on (Megatron-Bridge 0.6.x); it lacks the plugin.
BASE_IMAGE = "nvcr.io/nvidia/nemo:26.08.01"
#: The tag ``docker/Dockerfile`` is built with in the docs; push it to your registry and pass that name.
PLUGIN_IMAGE_TAG = "nemo-xtoken:26.08.01"
_STOCK_IMAGE_PREFIXES = ("nvcr.io/nvidia/nemo:", "nvcr.io#nvidia/nemo:")
#: Environment of every rank: Megatron's TP comm overlap wants one CUDA connection.
DEFAULT_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONUNBUFFERED": "1",
}


def require_nemo_run() -> Any:
    """``import nemo_run`` or a clear error naming the extra to install."""
    try:
        import nemo_run as run
    except Exception as e:
        raise XTokenError(
            f"NeMo-Run is not importable ({type(e).__name__}: {e}); install it with "
            "`pip install 'nemo-xtoken[distill]'` (pins nemo-run 0.11.1 and leptonai 0.27.3)"
        ) from e
    return run


def distill_script(config: str | Path, overrides: Sequence[str] = (), *, env: dict[str, str] | None = None, local: bool = True):
    """The ``run.Script`` of one run: the entry module with ``--config`` and the overrides.

    ``local=True``: the config must exist here and is passed as an absolute path.  ``local=False``
    (submitting to a remote cluster): ``config`` is the path *on the cluster*, taken as given but
    required to be absolute (the ranks start in the container's work dir).
    """
    run = require_nemo_run()
    cfg = Path(config)
    if local:
        if not cfg.is_file():
            raise XTokenError(f"config file {cfg} does not exist (see conf/)")
        cfg = cfg.resolve()
    elif not cfg.is_absolute():
        raise XTokenError(f"--config {cfg}: on a remote cluster give the absolute path of the config on its shared file system")
    for ov in overrides:
        if "=" not in ov:
            raise XTokenError(f"override {ov!r} is not key.sub=value")
    return run.Script(
        path=ENTRY_MODULE, m=True, entrypoint="python",
        args=["--config", str(cfg), *overrides], env=dict(env or {}),
    )


def local_executor(gpus: int = 8, *, env: dict[str, str] | None = None):
    """One node, ``torchrun --nproc-per-node gpus``."""
    run = require_nemo_run()
    if gpus < 1:
        raise XTokenError(f"--gpus must be ≥ 1, got {gpus}")
    return run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun", env_vars={**DEFAULT_ENV, **(env or {})})


def check_container_image(image: str | None, env: dict[str, str] | None = None) -> str:
    """The Slurm image, refused when missing or NVIDIA's stock NeMo image (no plugin inside) without a mounted PYTHONPATH."""
    how = (
        f"build the plugin's image (docker build -f docker/Dockerfile -t {PLUGIN_IMAGE_TAG} .), push it to a registry "
        f"the cluster pulls from (or enroot-import it to a .sqsh file) and pass --container-image <registry>/{PLUGIN_IMAGE_TAG}"
    )
    if not image:
        raise XTokenError(f"--container-image is required for Slurm: {how}")
    if image.startswith(_STOCK_IMAGE_PREFIXES) and not (env or {}).get("PYTHONPATH"):
        raise XTokenError(
            f"--container-image {image} is NVIDIA's NeMo image, which has no nemo_xtoken: every rank would fail with "
            f"'No module named nemo_xtoken'. {how[0].upper() + how[1:]} (or mount the plugin and pass --env PYTHONPATH=<its folder>)"
        )
    return image


def parse_env(pairs: Sequence[str], option: str = "--env") -> dict[str, str]:
    """``K=V`` strings (the launchers' repeatable ``--env``) as a dict; anything else is refused, naming it."""
    env: dict[str, str] = {}
    for kv in pairs:
        key, eq, value = kv.partition("=")
        name_ok = bool(key) and key.replace("_", "a").isascii() and key.replace("_", "a").isalnum() and not key[0].isdigit()
        if not eq or not name_ok:
            raise XTokenError(
                f"{option} {kv!r} is not NAME=VALUE (a variable name of letters, digits and _, then =): "
                f"write e.g. {option} {key if name_ok else 'NAME'}=VALUE"
            )
        env[key] = value
    return env


_SLURM_TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def check_slurm_time(time: str) -> str:
    """Refuse a time limit sbatch would refuse (its formats: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes, days-hours:minutes:seconds; or UNLIMITED/INFINITE); returns it."""
    import re

    t = str(time).strip()
    ok = t.upper() in ("UNLIMITED", "INFINITE")
    if not ok:
        m = re.fullmatch(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)", t)
        if m:
            days, dh, dm, ds, first, second, third = m.groups()
            if days is not None:  # D-HH[:MM[:SS]]
                ok = int(dh) < 24 and all(x is None or int(x) < 60 for x in (dm, ds))
            elif third is not None:  # HH:MM:SS
                ok = int(second) < 60 and int(third) < 60
            else:  # MM or MM:SS
                ok = second is None or int(second) < 60
    if not ok:
        raise XTokenError(f"--time {time!r} is not a Slurm time limit: use {_SLURM_TIME_FORMATS} (e.g. 04:00:00 or 1-00:00:00)")
    return t


def slurm_executor(
    *,
    account: str,
    container_image: str,
    partition: str | None = None,
    nodes: int = 16,
    gpus_per_node: int = 8,
    time: str = "04:00:00",
    container_mounts: Sequence[str] = (),
    job_dir: str = "",
    host: str | None = None,
    user: str | None = None,
    env: dict[str, str] | None = None,
    exclusive: bool = True,
):
    """A Slurm job of ``nodes`` × ``gpus_per_node`` GPUs, one torchrun per node, inside ``container_image``.

    ``container_image`` is the plugin's image (:func:`check_container_image`).  ``host``/``user``
    submit over SSH (``run.SSHTunnel``); without them, sbatch runs on this machine
    (``run.LocalTunnel``, e.g. from a login node).  ``job_dir`` is where NeMo-Run writes the sbatch
    script and logs on the cluster.
    """
    run = require_nemo_run()
    if nodes < 1 or gpus_per_node < 1:
        raise XTokenError(f"nodes and gpus_per_node must be ≥ 1, got {nodes}, {gpus_per_node}")
    if not account:
        raise XTokenError("--account is required for Slurm")
    check_container_image(container_image, env)
    check_slurm_time(time)
    job_dir = job_dir or os.path.join(os.getcwd(), "nemo_experiments")
    tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=job_dir) if host else run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,  # NeMo-Run turns this into torchrun --nproc-per-node with the torchrun launcher
        gpus_per_node=gpus_per_node,
        time=time,
        container_image=container_image,
        container_mounts=list(container_mounts),
        exclusive=exclusive,
        mem="0",
        tunnel=tunnel,
        packager=run.Packager(),  # the container has the plugin; nothing to copy
        launcher="torchrun",
        env_vars={**DEFAULT_ENV, **(env or {})},
    )


@dataclass
class DryRun:
    """What a launch would execute: ``text`` is the sbatch script (Slurm) or the shell command (local)."""

    kind: str  # "slurm" | "local"
    text: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _dryrun_info(script: Any, executor: Any, name: str, base_dir: str):
    run = require_nemo_run()
    with run.Experiment(name, executor=executor, log_level="ERROR", base_dir=base_dir) as exp:
        exp.add(script, tail_logs=False, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        return exp.jobs[0]._dryrun_info


def dry_run(script: Any, executor: Any, name: str = "xtoken-distill") -> DryRun:
    """Render the job without running it (no cluster, no SSH: an SSH tunnel is swapped for a local one)."""
    import copy

    run = require_nemo_run()
    tunnel = getattr(executor, "tunnel", None)
    if isinstance(executor, run.SlurmExecutor) and not isinstance(tunnel, run.LocalTunnel):
        executor.tunnel = run.LocalTunnel(job_dir=tunnel.job_dir)  # an SSH tunnel holds a lock: no deepcopy
    try:
        ex = copy.deepcopy(executor)  # NeMo-Run's dry-run mutates the executor (torchrun: ntasks_per_node → 1)
    finally:
        if tunnel is not None:
            executor.tunnel = tunnel
    with tempfile.TemporaryDirectory(prefix="xtoken-dryrun-") as tmp, open(os.devnull) as devnull:
        stdin, sys.stdin = sys.stdin, devnull  # NeMo-Run's packaging shells out through invoke, which reads stdin
        try:
            if isinstance(ex, run.SlurmExecutor):
                # NeMo-Run creates the job folder while rendering: render into a scratch folder, then
                # put the cluster's job_dir back into the text (nothing is created at job_dir here).
                real = ex.tunnel.job_dir
                scratch = os.path.join(tmp, "jobs")
                ex.tunnel = run.LocalTunnel(job_dir=scratch)
                info = _dryrun_info(script, ex, name, os.path.join(tmp, "exp"))
                text = info.request.materialize().replace(scratch, real.rstrip("/"))
                return DryRun("slurm", text, env=dict(ex.env_vars))
            info = _dryrun_info(script, ex, name, tmp)
        finally:
            sys.stdin = stdin
        (param,) = [p for params in info.request.role_params.values() for p in params]
        env = {k: v for k, v in param.env.items() if k in ex.env_vars or k in script.env}
        cmd = list(param.args)
        text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + (" " if env else "") + shlex.join(cmd)
        return DryRun("local", text, command=cmd, env=env)


def launch(script: Any, executor: Any, name: str = "xtoken-distill", *, detach: bool = True, tail_logs: bool = False) -> str:
    """Submit the run in a ``run.Experiment``; returns the experiment id."""
    run = require_nemo_run()
    with run.Experiment(name, executor=executor) as exp:
        exp.add(script, tail_logs=tail_logs, name=name)
        exp.run(detach=detach and isinstance(executor, run.SlurmExecutor), tail_logs=tail_logs)
        return exp._id
