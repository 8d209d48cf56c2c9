"""``xtoken rehearse``: a run config through Megatron-Bridge's own training loop on this CPU (:mod:`nemo_xtoken.cpu.rehearse`)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_rehearse(args: argparse.Namespace) -> int:
    from nemo_xtoken.cpu.rehearse import rehearse

    report = rehearse(args.config, args.overrides, nproc=args.nproc, steps=args.steps, workdir=args.workdir,
                      timeout=args.timeout, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    losses = ", ".join(f"{x:.4f}" for x in report["losses"])
    print(f"steps {report['steps']} on {report['nproc']} ranks (TP {report['tp']} x DP {report['dp']}): total loss {losses}")
    print(f"killed after {report['killed_after']}, resumed at step {report['resumed_step']}: "
          f"resume {'equal to' if report['resume_equal'] else 'DIFFERENT from'} the uninterrupted run")
    print(f"export-hf: max |HF - Megatron logit| {report['export_max_abs_logit_diff']:.3g} (tolerance "
          f"{report['export_tolerance']:.3g}), argmax agreement {report['export_argmax_agreement']:.3f}; {report['seconds']} s")
    if report["problems"]:
        print(f"xtoken rehearse: FAILED: {report['problems'][0]}", file=sys.stderr)
        for p in report["problems"][1:]:
            print(f"  also: {p}", file=sys.stderr)
        return 1
    print("rehearsal passed")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rehearse",
        help="run a config through Megatron-Bridge's training loop on this CPU (small random models, kill + resume, export)",
        description="Read the config and overrides as a run does, shrink the models (random, same architecture), lengths, "
        "batches and steps (every change printed), run --nproc gloo processes through Bridge's pretrain() with X-Token's "
        "forward step from a foreign working directory with the Hugging Face hub offline, kill every rank after the "
        "first checkpoint, resume, compare with an uninterrupted run, export with xtoken export-hf and compare logits. "
        "Exit 0 when everything matched, 1 on a mismatch, 2 on an error (the first failure named).",
    )
    p.add_argument("--config", "-c", required=True, help="YAML run config (conf/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, exactly as for xtoken distill")
    p.add_argument("--nproc", type=int, default=2, help="processes (gloo ranks); a multiple of the TP size (default 2)")
    p.add_argument("--steps", type=int, default=4, help="training steps, even (killed after half; default 4)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--workdir", default=None, help="folder for the rehearsal's models, data, checkpoints (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch before the ranks are killed (default 900)")
    p.set_defaults(func=cmd_rehearse)
