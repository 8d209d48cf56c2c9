"""``xtoken distill`` (one rank of a Megatron-Bridge run), ``xtoken export-hf`` (student checkpoint → HF folder)
and ``xtoken check-model`` (does a Hugging Face model convert to Megatron? logits compared on the CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_xtoken.errors import XTokenError


def resolve_checkpoint(path: str | Path) -> Path:
    """The iteration folder of a Megatron distributed checkpoint (``DIR/iter_N``, or ``DIR``'s latest)."""
    from nemo_xtoken.integration.bridge import resolve_checkpoint as _resolve

    return _resolve(path, key="--checkpoint")


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
    from nemo_xtoken.cpu import bridge_te_shim

    bridge_te_shim.install()  # a CPU machine exports too (no-op where transformer_engine is installed)
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


def cmd_check_model(args: argparse.Namespace) -> int:
    from nemo_xtoken.integration.check_model import check_model, tolerance

    r = check_model(args.hf_model, tp=args.tp, sequences=args.sequences, seq_length=args.seq_length,
                    trust_remote_code=args.trust_remote_code)
    tol = tolerance(r, args.atol, args.rtol)
    ok = r.max_abs_logit_diff <= tol and r.argmax_agreement >= args.min_argmax
    if args.json:
        print(json.dumps({**r.to_dict(), "tolerance": tol, "parity": ok}, indent=2))
    else:
        print(f"{r.model}: {r.architecture} via {r.bridge}, tp {r.tp}; vocabulary {r.vocab_size} padded to {r.padded_vocab_size}")
        print(f"logits vs Hugging Face on {r.sequences}x{r.seq_length} random tokens: max |diff| {r.max_abs_logit_diff:.3g}, "
              f"argmax agreement {r.argmax_agreement:.4f} -> {'parity' if ok else 'MISMATCH'} "
              f"(tolerance {tol:.3g} = atol {args.atol:g} + rtol {args.rtol:g} x max |HF logit| {r.max_abs_reference_logit:.3g})")
    return 0 if ok else 1


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
    p.add_argument("--check", action="store_true",
                   help="validate (keys, values, tokenizers, W, audit, data: reads, aligns and packs the first documents, "
                   "Megatron-Bridge support of every model) and print the Bridge settings; no training, no GPU")
    p.add_argument("--no-resources", action="store_true", help="with --check: skip tokenizers, W files, data and model configs")
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

    p = sub.add_parser(
        "check-model",
        help="convert a Hugging Face model as a run would (Megatron-Bridge) and compare its logits with HF's, on the CPU",
        description="Build the model through the run's Megatron-Bridge path on --tp gloo processes (CPU; without "
        "transformer_engine Bridge is imported through a scoped import hook and uses its local layer spec) and compare "
        "its logits with transformers' on random tokens. Exit 0 on parity, 1 on a mismatch, 2 if the architecture "
        "cannot be converted.",
    )
    p.add_argument("--hf-model", required=True, help="Hugging Face id (cached) or folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (gloo processes), default 1")
    p.add_argument("--sequences", type=int, default=3, help="random sequences (default 3)")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sequence (default 32; also the rotary length)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="accepted |logit difference|: atol + rtol x the largest |HF logit| (default atol 1e-4, fp32)")
    p.add_argument("--rtol", type=float, default=1e-4, help="see --atol (default 1e-4)")
    p.add_argument("--min-argmax", type=float, default=0.999, help="smallest accepted argmax agreement (default 0.999)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_check_model)
