"""``xtoken distill`` (one rank of a Megatron-Bridge run) and ``xtoken export-hf`` (student checkpoint → HF folder)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from nemo_xtoken.errors import XTokenError

_ITER = re.compile(r"^iter_(\d+)$")


def resolve_checkpoint(path: str | Path) -> Path:
    """The iteration folder of a Megatron distributed checkpoint (``DIR/iter_N``, or ``DIR``'s latest).

    Raises :class:`XTokenError` when the folder is missing or holds no ``torch_dist`` checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise XTokenError(f"--checkpoint {p} does not exist (give the run's checkpoint.save folder or one of its iter_N folders)")
    if not p.is_dir():
        raise XTokenError(f"--checkpoint {p} is a file; a Megatron distributed checkpoint is a folder (…/iter_0030000)")
    if not _ITER.match(p.name):
        iters = sorted((int(m.group(1)), c) for c in p.iterdir() if c.is_dir() and (m := _ITER.match(c.name)))
        if not iters:
            raise XTokenError(
                f"--checkpoint {p} has no iter_N folders and is not one: give the run's checkpoint.save folder or "
                f"…/iter_N (found {sorted(c.name for c in p.iterdir())[:8]})"
            )
        p = iters[-1][1]
    if not (p / "metadata.json").is_file():
        raise XTokenError(
            f"{p} is not a Megatron distributed (torch_dist) checkpoint: no metadata.json; was the save interrupted? "
            "Pick an earlier iter_N folder"
        )
    return p


def export_hf(checkpoint: str | Path, hf_model: str, output: str | Path, *, overwrite: bool = False, strict: bool = True,
              trust_remote_code: bool = False) -> Path:
    """Export the student of an X-Token checkpoint to a Hugging Face folder with Megatron-Bridge's ``AutoBridge``.

    ``hf_model`` is the student's original HF id or folder (architecture, config, tokenizer); the
    checkpoint holds the student only (teachers are never saved), so the conversion is the plain one.
    """
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise XTokenError(f"--output {out} exists and is not empty (use --overwrite)")
    from nemo_xtoken.integration.bridge import require_bridge

    require_bridge()
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(hf_model, trust_remote_code=trust_remote_code)
    bridge.export_ckpt(megatron_path=str(ckpt), hf_path=str(out), strict=strict)
    return out


def cmd_export_hf(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint(args.checkpoint)
    out = export_hf(ckpt, args.hf_model, args.output, overwrite=args.overwrite, strict=not args.no_strict,
                    trust_remote_code=args.trust_remote_code)
    print(f"wrote {out} from {ckpt} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from nemo_xtoken.integration.train import main as train_main

    argv = ["--config", args.config, *args.overrides]
    if args.check:
        argv.append("--check")
    if args.no_resources:
        argv.append("--no-resources")
    return train_main(argv)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="run one rank of an X-Token distillation (under torchrun; see examples/ for NeMo-Run launches)",
        description="Validate a run config (strict keys, tokenizers, W, coverage audit) and train with Megatron-Bridge. "
        "Start it under torchrun/srun, or with examples/launch_local.py / launch_slurm.py.",
    )
    p.add_argument("--config", "-c", required=True, help="YAML run config (conf/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.train_iters=100")
    p.add_argument("--check", action="store_true", help="validate (config, tokenizers, W, audit, data: reads, aligns and packs the first documents) and print the Bridge settings, do not train")
    p.add_argument("--no-resources", action="store_true", help="with --check: skip tokenizers, W files and data")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "export-hf",
        help="export a student checkpoint (Megatron torch_dist) to a Hugging Face folder via Megatron-Bridge",
        description="Convert DIR/iter_N (or DIR's latest iteration) to a transformers-loadable folder with "
        "AutoBridge.from_hf_pretrained(HF_MODEL).export_ckpt(...). Needs Megatron-Bridge (the NeMo container).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.save folder or one of its iter_N folders")
    p.add_argument("--hf-model", required=True, help="the student's Hugging Face id or folder (architecture and config)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--no-strict", action="store_true", help="do not require every weight to map (strict=False)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_export_hf)
