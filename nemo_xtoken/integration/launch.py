"""NeMo-Run launch of X-Token runs: one node under ``torchrun`` or a Slurm job (16 × 8 H100 by default).

The task is ``run.Script`` running ``python -m nemo_xtoken.integration.train --config FILE k=v…``
(Bridge's NeMo-Run plugins take ``run.Script``, not ``run.Partial``), under
``run.LocalExecutor(ntasks_per_node=8, launcher="torchrun")`` or ``run.SlurmExecutor`` with the
torchrun launcher (one ``torchrun --nproc-per-node 8`` per node, started by ``srun``).  On Slurm
the code comes from the container image, so nothing is packaged (NeMo-Run's base ``Packager`` copies
no code): the image must be the one ``docker/Dockerfile`` builds (NeMo Framework + the plugin),
pushed to a registry the cluster pulls from.  Every rank runs with the Hugging Face hub offline
(``HF_HUB_OFFLINE=1``; ``hf_home`` is mounted as ``HF_HOME``: :mod:`nemo_xtoken.integration.hub`),
and a Slurm run is a chain of jobs (:func:`launch` with ``chain``), each ending at
``train.exit_duration_in_mins`` (:func:`exit_duration_override`).  There is no default image; NVIDIA's stock NeMo image
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
from typing import Any, Callable, Sequence

from nemo_xtoken.errors import XTokenError

__all__ = [
    "launch_main",
    "ENTRY_MODULE",
    "DEFAULT_ENV",
    "DEFAULT_SLURM_TIME",
    "DEFAULT_CHAIN",
    "EXIT_MARGIN_MIN",
    "slurm_time_minutes",
    "exit_duration_override",
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
#: Environment of every rank: Megatron's TP comm overlap wants one CUDA connection; the Hugging Face hub
#: offline (compute nodes rarely reach it: models and tokenizers come from the mounted cache, ``--hf-home``;
#: :func:`nemo_xtoken.integration.hub.launch_env`).
DEFAULT_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
}
#: Slurm time limit of one job (a common partition maximum); a run longer than that is a chain of jobs.
DEFAULT_SLURM_TIME = "04:00:00"
#: Jobs in a Slurm resubmission chain by default (8 × 4 h); jobs that start after the last step exit at once.
DEFAULT_CHAIN = 8
#: Minutes kept free at the end of each job: start-up before Bridge's clock starts and the final checkpoint save.
EXIT_MARGIN_MIN = 15


def slurm_time_minutes(time: str) -> int | None:
    """Whole minutes of a Slurm time limit (validated by :func:`check_slurm_time`); None for ``UNLIMITED``."""
    t = check_slurm_time(time)
    if t.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = t.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m = (parts + [0])[:2]
        return int(days) * 1440 + h * 60 + m  # seconds dropped: the exit is planned in whole minutes
    if len(parts) == 3:  # HH:MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0]  # MM or MM:SS


def exit_duration_override(time: str, overrides: Sequence[str], margin_min: int = EXIT_MARGIN_MIN) -> list[str]:
    """``overrides`` plus ``train.exit_duration_in_mins=<time limit − margin>`` unless the user set it.

    Bridge then saves a checkpoint and exits cleanly ``margin_min`` minutes before Slurm's limit, so
    the next job of the chain resumes from it instead of losing up to ``checkpoint.save_interval`` steps.
    """
    if any(o.split("=", 1)[0].strip() == "train.exit_duration_in_mins" for o in overrides):
        return list(overrides)
    minutes = slurm_time_minutes(time)
    if minutes is None:  # no time limit: nothing to exit before
        return list(overrides)
    if minutes - margin_min < 15:
        raise XTokenError(
            f"--time {time} leaves {minutes - margin_min} minutes of training after the {margin_min}-minute margin for "
            "start-up and the final checkpoint: give at least 00:30:00"
        )
    return [*overrides, f"train.exit_duration_in_mins={minutes - margin_min}"]


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


def local_executor(gpus: int = 8, *, env: dict[str, str] | None = None, hf_home: str | None = None):
    """One node, ``torchrun --nproc-per-node gpus``; the Hugging Face hub offline, ``HF_HOME`` from ``hf_home``."""
    from nemo_xtoken.integration.hub import launch_env

    run = require_nemo_run()
    if gpus < 1:
        raise XTokenError(f"--gpus must be ≥ 1, got {gpus}")
    hub_env, _ = launch_env(hf_home, slurm=False, env=env)
    return run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun", env_vars={**DEFAULT_ENV, **hub_env})


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
    time: str = DEFAULT_SLURM_TIME,
    container_mounts: Sequence[str] = (),
    hf_home: str | None = None,
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
    script and logs on the cluster.  ``hf_home`` (the Hugging Face cache on the shared file system)
    is mounted and set as ``HF_HOME``; every rank runs with ``HF_HUB_OFFLINE=1``
    (:func:`nemo_xtoken.integration.hub.launch_env`).  ``dependency_type`` is ``afterany``: in a
    resubmission chain (:func:`launch` with ``chain``) the next job starts whether this one exited
    at ``train.exit_duration_in_mins`` or was killed at the time limit.
    """
    from nemo_xtoken.integration.hub import launch_env

    run = require_nemo_run()
    if nodes < 1 or gpus_per_node < 1:
        raise XTokenError(f"nodes and gpus_per_node must be ≥ 1, got {nodes}, {gpus_per_node}")
    if not account:
        raise XTokenError("--account is required for Slurm")
    check_container_image(container_image, env)
    check_slurm_time(time)
    hub_env, hub_mounts = launch_env(hf_home, slurm=True, env=env)
    if host and not job_dir:
        raise XTokenError(
            "--job-dir is required with --host: NeMo-Run writes the sbatch script and logs there and mounts it at "
            "/nemo_run in the container; give a folder on the cluster's shared file system (the default, "
            f"{os.path.join(os.getcwd(), 'nemo_experiments')}, is this machine's path)"
        )
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
        container_mounts=[*container_mounts, *(m for m in hub_mounts if m not in container_mounts)],
        exclusive=exclusive,
        mem="0",
        tunnel=tunnel,
        packager=run.Packager(),  # the container has the plugin; nothing to copy
        launcher="torchrun",
        env_vars={**DEFAULT_ENV, **hub_env},
        dependency_type="afterany",
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


#: What the dry-run shows in place of the previous job's Slurm id (known only once it is submitted).
PREVIOUS_JOB = "<job id of the previous part>"


def _part_name(name: str, k: int, chain: int) -> str:
    return name if chain == 1 else f"{name}-part{k}"


def _redact(env: dict[str, str]) -> dict[str, str]:
    """A printable copy of a launch environment: a token's value never reaches the dry-run text."""
    return {k: ("<set>" if k == "HF_TOKEN" and v and not v.startswith("$") else v) for k, v in env.items()}


def dry_run(script: Any, executor: Any, name: str = "xtoken-distill", *, chain: int = 1) -> DryRun:
    """Render the job without running it (no cluster, no SSH: an SSH tunnel is swapped for a local one).

    Slurm with ``chain`` > 1 (a resubmission chain, :func:`launch`): the first part's sbatch script,
    then the ``#SBATCH --dependency`` line NeMo-Run renders for every later part.
    """
    import copy

    run = require_nemo_run()
    if chain < 1:
        raise XTokenError(f"--chain must be ≥ 1, got {chain}")
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
                ex2 = copy.deepcopy(ex)
                ex.tunnel = run.LocalTunnel(job_dir=scratch)
                info = _dryrun_info(script, ex, _part_name(name, 1, chain), os.path.join(tmp, "exp"))
                text = info.request.materialize().replace(scratch, real.rstrip("/"))
                if chain > 1:
                    # a later part as NeMo-Run renders it once the previous part has a Slurm id (torchx handle)
                    ex2.tunnel = run.LocalTunnel(job_dir=os.path.join(tmp, "jobs2"))
                    ex2.dependencies = [f"slurm_tunnel://nemo_run/{PREVIOUS_JOB}/master/0"]
                    info2 = _dryrun_info(script, ex2, _part_name(name, 2, chain), os.path.join(tmp, "exp2"))
                    (dep,) = [ln for ln in info2.request.materialize().splitlines() if ln.startswith("#SBATCH --dependency")]
                    head = (
                        f"# resubmission chain: {chain} jobs of {ex.time} ({name}-part1 … {name}-part{chain}); each trains "
                        "until train.exit_duration_in_mins, saves a checkpoint and exits, and the next resumes from "
                        "checkpoint.save; parts that start after the last step exit at once\n"
                    )
                    text = head + text + (
                        f"\n# parts 2 … {chain}: the script above, each submitted at once with\n{dep}\n"
                    )
                return DryRun("slurm", text, env=_redact(dict(ex.env_vars)))
            info = _dryrun_info(script, ex, name, tmp)
        finally:
            sys.stdin = stdin
        (param,) = [p for params in info.request.role_params.values() for p in params]
        env = _redact({k: v for k, v in param.env.items() if k in ex.env_vars or k in script.env})
        cmd = list(param.args)
        text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + (" " if env else "") + shlex.join(cmd)
        return DryRun("local", text, command=cmd, env=env)


def launch(script: Any, executor: Any, name: str = "xtoken-distill", *, detach: bool = True, tail_logs: bool = False,
           chain: int = 1) -> str:
    """Submit the run in a ``run.Experiment``; returns the experiment id.

    ``chain`` > 1 (Slurm): that many jobs submitted at once, part k+1 depending on part k
    (``afterany``: it starts when part k ends, whether it exited at ``train.exit_duration_in_mins`` or
    was killed); each resumes from ``checkpoint.save``, and a part that finds the last step done exits.
    """
    run = require_nemo_run()
    if chain < 1:
        raise XTokenError(f"--chain must be ≥ 1, got {chain}")
    if chain > 1 and not isinstance(executor, run.SlurmExecutor):
        raise XTokenError("--chain needs Slurm (job dependencies); a local run resumes when started again")
    with run.Experiment(name, executor=executor) as exp:
        prev = None
        for k in range(1, chain + 1):
            prev = exp.add(script, tail_logs=tail_logs, name=_part_name(name, k, chain), dependencies=[prev] if prev else None)
        exp.run(detach=detach and isinstance(executor, run.SlurmExecutor), tail_logs=tail_logs)
        return exp._id


def launch_main(prog: str, args: Any, build: Callable[[dict[str, str]], tuple[Any, Any]], *, detach: bool, chain: int = 1,
                tail_logs: bool = False) -> int:
    """The body of ``examples/launch_local.py`` / ``launch_slurm.py``: ``build(env)`` gives the script and executor.

    ``args`` carries ``env`` (``--env K=V`` pairs), ``name`` and ``dry_run``: prints the dry run, or launches
    (a detached submission prints its experiment id).  A bad input is one line ``PROG: error: …`` and exit code 2.
    """
    try:
        script, executor = build(parse_env(args.env))
        if args.dry_run:
            print(dry_run(script, executor, args.name, chain=chain).text)
            return 0
        exp_id = launch(script, executor, args.name, detach=detach, tail_logs=tail_logs, chain=chain)
        if detach:
            print(f"submitted {exp_id}")
        return 0
    except (XTokenError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
