"""``xtoken align`` (chunk pairs of one text) and ``xtoken preprocess`` (a corpus, on disk)."""

from __future__ import annotations

import argparse
import json
import sys

from nemo_xtoken.cli.vocab_cmds import positive_int
from nemo_xtoken.errors import XTokenError


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-tokenizer", "-s", required=True, help="tokenizer.json, HF folder or cached hub name")
    p.add_argument("--teacher-tokenizer", "-t", required=True, help="tokenizer.json, HF folder or cached hub name")
    p.add_argument("--student-bos", action="store_true", help="prepend the student's BOS (tokenizer_config.json bos_token)")
    p.add_argument("--teacher-bos", action="store_true", help="prepend the teacher's BOS (tokenizer_config.json bos_token)")
    p.add_argument("--no-special-tokens", action="store_true", help="do not apply the tokenizers' BOS/EOS templates")


def _check_bos(args: argparse.Namespace, student, teacher) -> None:
    """--student-bos / --teacher-bos need a BOS that tokenizer_config.json names (said in CLI terms)."""
    from nemo_xtoken.align.core import bos_token_id

    for flag, on, info in (("--student-bos", args.student_bos, student), ("--teacher-bos", args.teacher_bos, teacher)):
        if on and bos_token_id(info) is None:
            raise XTokenError(
                f"{flag}: tokenizer {info.source} declares no BOS token (its tokenizer_config.json names no bos_token "
                f"the tokenizer has); drop {flag}, or pass a tokenizer folder whose tokenizer_config.json names one"
            )


def cmd_align(args: argparse.Namespace) -> int:
    from nemo_xtoken.align import align
    from nemo_xtoken.align.core import alignment_to_json
    from nemo_xtoken.vocab import load_tokenizer

    s, t = load_tokenizer(args.student_tokenizer), load_tokenizer(args.teacher_tokenizer)
    _check_bos(args, s, t)
    special = not args.no_special_tokens
    a, si, ti = align(
        args.text, s, t, student_special_tokens=special, teacher_special_tokens=special,
        student_add_bos=args.student_bos, teacher_add_bos=args.teacher_bos, return_ids=True,
    )
    rows = alignment_to_json(a, args.text, si, ti, s, t)
    if args.json:
        print(json.dumps({"student_tokens": len(si), "teacher_tokens": len(ti), "chunks": rows}, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(si)} student tokens, {len(ti)} teacher tokens, {a.n_chunks} chunks ({int(a.one_sided().sum())} one-sided)")
    for r in rows:
        st = " ".join(repr(x) for x in r["student_tokens"]) or "-"
        tt = " ".join(repr(x) for x in r["teacher_tokens"]) or "-"
        mark = f"  (one-sided: {r['why']})" if r["one_sided"] else ""
        txt = "'" + r["text"].replace("\n", "\\n").replace("\t", "\\t") + "'"
        print(f"{r['chunk']:4d}  {txt:<16} student[{r['student'][0]}:{r['student'][1]}] {st}  <->  teacher[{r['teacher'][0]}:{r['teacher'][1]}] {tt}{mark}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from nemo_xtoken.align.preprocess import MAX_DOCUMENT_BYTES, PreprocessOptions, format_report, preprocess
    from nemo_xtoken.vocab import load_tokenizer

    _check_bos(args, load_tokenizer(args.student_tokenizer), load_tokenizer(args.teacher_tokenizer))
    special = not args.no_special_tokens
    opts = PreprocessOptions(
        student_tokenizer=args.student_tokenizer, teacher_tokenizer=args.teacher_tokenizer, field=args.field,
        shard_size=args.shard_size, student_special_tokens=special, teacher_special_tokens=special,
        student_add_bos=args.student_bos, teacher_add_bos=args.teacher_bos, max_document_bytes=args.max_document_bytes or MAX_DOCUMENT_BYTES,
    )
    report = preprocess(args.input, args.output, opts, workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
                        overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser("align", help="align one text under two tokenizers and print the chunk pairs")
    _add_pair_args(p)
    p.add_argument("--text", required=True, help="the text to align")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("preprocess", help="tokenize and align a corpus (jsonl or parquet) into memory-mappable arrays")
    _add_pair_args(p)
    p.add_argument("--input", required=True,
                   help="a .jsonl file (one JSON object per line; blank lines skipped), a .parquet file (needs pyarrow), "
                   "or a folder of them (read in name order)")
    p.add_argument("--output", required=True, help="output folder (rerun on it with the same input and settings to resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the shards of an earlier run in --output (needed when the input or settings changed)")
    p.add_argument("--field", default="text", help="the text field / column (default: text)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="documents per shard (the unit of resumption)")
    p.add_argument("--max-document-bytes", type=positive_int, default=None,
                   help="reject (and count) documents larger than this many bytes (default 4194304 = 4 MiB): memory "
                        "stays bounded by it, never by the file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_preprocess)
