#!/usr/bin/env python
"""Launch an X-Token distillation run on this node with NeMo-Run (torchrun, one process per GPU).

    python examples/launch_local.py --config conf/llama32_1b__qwen3_4b_pkl.yaml train.train_iters=100
    python examples/launch_local.py --config conf/llama32_1b__qwen3_4b_pkl.yaml --dry-run   # print the command only

Every rank runs ``python -m nemo_xtoken.integration.train --config CONFIG [overrides]``, which
validates the config, tokenizers and W files (and runs the coverage audit) before Megatron-Bridge
builds anything.  Needs ``pip install 'nemo-xtoken[distill]'`` here; the run itself needs a GPU
machine with Megatron-Bridge (the NeMo container, docker/Dockerfile).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, help="YAML run config (conf/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.train_iters=100")
    p.add_argument("--gpus", type=int, default=8, help="processes (GPUs) on this node (default 8)")
    p.add_argument("--name", default="xtoken-distill", help="NeMo-Run experiment name")
    p.add_argument("--hf-home", default=None, metavar="DIR",
                   help="Hugging Face cache for every rank (HF_HOME); the hub is offline (HF_HUB_OFFLINE=1) unless --env HF_HUB_OFFLINE=0")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment variable (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command and environment, run nothing")
    args = p.parse_args(argv)

    from nemo_xtoken.integration import launch as L

    def build(env: dict[str, str]):
        return L.distill_script(args.config, args.overrides), L.local_executor(args.gpus, env=env, hf_home=args.hf_home)

    return L.launch_main("launch_local", args, build, detach=False, tail_logs=True)


if __name__ == "__main__":
    sys.exit(main())
