"""``xtoken demo``: the main job on the embedded default (real Llama-3, Qwen3 and o200k tokenizers).

Today it builds W for Llama-3 → Qwen3 and Llama-3 → o200k (Phi-4-mini's base vocabulary), prints
both coverage audits with their recommendation, and shows the paper's two W examples.  The
distillation runs of the demo are issue 6 and are not part of it yet.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.vocab import audit, cached_projection, canonical_vocab, load_tokenizer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    student = load_tokenizer(tokenizer_path("llama3"))
    summary = {}
    for teacher_name, label in (("qwen3", "Qwen3 (digits split)"), ("o200k", "o200k / Phi-4-mini (numerals whole)")):
        teacher = load_tokenizer(tokenizer_path(teacher_name))
        t0 = time.perf_counter()
        proj = cached_projection(student, teacher)
        dt = time.perf_counter() - t0
        rep = audit(proj, student, teacher)
        print(f"\n== Llama-3 student ← {label} teacher: W ready in {dt:.2f} s (cached under {cache_dir() / 'projections'})")
        print(rep.format_table())
        scv, tcv = canonical_vocab(student), canonical_vocab(teacher)
        for text in ("201", "Hundreds"):
            (s,) = scv.lookup(text)
            row = ", ".join(f"{tcv.display(t)!r} {w:.4f}" for t, w in proj.row(s))
            print(f"  W[{text!r}] → {row}")
        summary[teacher_name] = rep.to_dict()
    (out / "audits.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'audits.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default (real tokenizers, no model hub)")
    p.add_argument("--output", "-o", default="outputs/demo", help="where to write the demo's results")
    p.set_defaults(func=cmd_demo)
