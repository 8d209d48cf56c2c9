#!/usr/bin/env python
"""Launch an X-Token distillation run on Slurm with NeMo-Run: 16 nodes × 8 GPUs (128 H100) by default.

    python examples/launch_slurm.py --config /lustre/me/xtoken/conf/llama32_1b__qwen3_4b_pkl.yaml \\
        --container-image registry.example.com/me/nemo-xtoken:26.08.01 \\
        --account ACCOUNT --partition batch --host login.cluster --user me --job-dir /lustre/me/nemo_runs \\
        --mount /lustre:/lustre --hf-home /lustre/me/hf train.train_iters=30000
    ... --dry-run   # print the sbatch script NeMo-Run would submit; needs no cluster and no SSH

One ``srun`` task per node starts ``torchrun --nnodes N --nproc-per-node 8 -m
nemo_xtoken.integration.train --config CONFIG [overrides]`` inside the container image, which must be
the one docker/Dockerfile builds (NeMo Framework + the plugin), pushed to a registry the cluster pulls
from: ``docker build -f docker/Dockerfile -t nemo-xtoken:26.08.01 .`` then ``docker tag``/``docker push``
(see docker/README.md).  The config, its W files, the data and the
checkpoint folder must be on a file system mounted into the container (``--mount``).  Without
``--host`` sbatch runs on this machine (a login node), and ``--config`` may be relative.

Every rank runs with ``HF_HUB_OFFLINE=1``: models and tokenizers given as hub ids come from the
Hugging Face cache ``--hf-home`` (mounted, set as ``HF_HOME``; fill it first with
``hf download``).  A run longer than ``--time`` is a chain of ``--chain`` jobs: each
trains until ``train.exit_duration_in_mins`` (``--time`` minus ``--exit-margin`` minutes), saves a
checkpoint and exits; the next (``--dependency=afterany``) resumes from it.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, help="YAML run config; with --host its absolute path on the cluster")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.train_iters=100")
    p.add_argument("--account", required=True)
    p.add_argument("--partition", default=None)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--time", default="04:00:00", help="Slurm time limit of one job of the chain (default 04:00:00)")
    p.add_argument("--chain", type=int, default=8,
                   help="jobs in the resubmission chain, each resuming from the last checkpoint (default 8: 8 × --time)")
    p.add_argument("--exit-margin", type=int, default=15, metavar="MIN",
                   help="minutes kept free at the end of each job for start-up and the final checkpoint (default 15)")
    p.add_argument("--hf-home", default=None, metavar="DIR",
                   help="Hugging Face cache on the shared file system: mounted, HF_HOME for every rank (hub offline)")
    p.add_argument("--container-image", required=True,
                   help="the image docker/Dockerfile builds (NeMo Framework + nemo_xtoken), as the cluster pulls it")
    p.add_argument("--mount", action="append", default=[], metavar="SRC:DST", help="container mount (repeatable)")
    p.add_argument("--job-dir", default="", help="where NeMo-Run keeps sbatch scripts and logs on the cluster")
    p.add_argument("--host", default=None, help="submit over SSH to this login node (default: sbatch here)")
    p.add_argument("--user", default=None, help="SSH user")
    p.add_argument("--name", default="xtoken-distill", help="NeMo-Run experiment / Slurm job name")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment variable (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    args = p.parse_args(argv)

    from nemo_xtoken.integration import launch as L

    def build(env: dict[str, str]):
        overrides = L.exit_duration_override(args.time, args.overrides, args.exit_margin)
        return L.distill_script(args.config, overrides, local=args.host is None), L.slurm_executor(
            account=args.account, partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            time=args.time, container_image=args.container_image, container_mounts=args.mount, job_dir=args.job_dir,
            host=args.host, user=args.user, env=env, hf_home=args.hf_home,
        )

    return L.launch_main("launch_slurm", args, build, detach=True, chain=args.chain)


if __name__ == "__main__":
    sys.exit(main())
