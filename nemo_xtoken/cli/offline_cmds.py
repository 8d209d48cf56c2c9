"""``xtoken cache-teacher``: a Hugging Face teacher's top-k distributions over a corpus, cached once."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from nemo_xtoken.offline.cache import CacheOptions, build_cache, format_report

    opts = CacheOptions(
        top_k=args.top_k, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        store_dtype=args.store_dtype, max_length=args.max_length, keep_next_token=not args.no_next_token,
        shard_size=args.shard_size,
    )
    report = build_cache(
        args.input, args.output, opts, hf_model=args.hf_model, gguf_file=args.gguf, student_tokenizer=args.student_tokenizer,
        workers=args.workers, trust_remote_code=args.trust_remote_code, progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run a Hugging Face teacher (GGUF included) over a corpus once and cache its top-k distributions",
        description="Cache a teacher's top-k next-token distributions (and the exact log-mass of the rest) over the teacher "
        "side of a dual-tokenized corpus, for distillation without the teacher in memory. Resumable: rerun on the same --output.",
    )
    p.add_argument("--hf-model", required=True, help="Hugging Face model folder or cached hub name (any causal LM transformers loads)")
    p.add_argument("--gguf", default=None, help="a GGUF file inside --hf-model (or a path to it): loaded through the gguf package")
    p.add_argument("--input", required=True, help="an `xtoken preprocess` folder made with the teacher's tokenizer, or a .jsonl/.parquet file")
    p.add_argument("--student-tokenizer", "-s", default=None, help="the student's tokenizer (needed for raw text; checked against a preprocessed corpus)")
    p.add_argument("--top-k", type=int, required=True, help="tokens kept per position (the actual next token is added when outside them)")
    p.add_argument("--output", required=True, help="cache folder (rerun on it to resume)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the teacher's forward dtype (default fp32)")
    p.add_argument("--store-dtype", default="fp32", choices=("fp32", "fp16"), help="log-probabilities on disk (default fp32)")
    p.add_argument("--max-length", type=int, default=None, help="teacher window in tokens (default: the model's maximum positions, ≤ 4096)")
    p.add_argument("--no-next-token", action="store_true", help="store the top-k only (not the actual next token)")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per shard when raw text is preprocessed on the way")
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own teacher (one GPU each with --device cuda)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (transformers trust_remote_code)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_cache_teacher)
