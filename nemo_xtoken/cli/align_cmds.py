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


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    from nemo_xtoken.align.chat import LOSS_ON

    p.add_argument("--loss-on", choices=LOSS_ON, default="assistant",
                   help="chat: which tokens carry the loss (assistant: assistant contents and end-of-turn tokens; all: every token)")
    p.add_argument("--student-chat-template", metavar="FILE",
                   help="chat: the student's chat template (a Jinja file or a tokenizer_config.json) instead of its tokenizer's own")
    p.add_argument("--teacher-chat-template", metavar="FILE",
                   help="chat: the teacher's chat template (a Jinja file or a tokenizer_config.json) instead of its tokenizer's own")
    p.add_argument("--enable-thinking", action="store_true",
                   help="chat: render with enable_thinking=True (templates that read it, e.g. Qwen3; default: non-thinking)")


def _check_bos(args: argparse.Namespace, student, teacher) -> None:
    """--student-bos / --teacher-bos need a BOS that tokenizer_config.json names (said in CLI terms)."""
    from nemo_xtoken.align.core import bos_token_id

    for flag, on, info in (("--student-bos", args.student_bos, student), ("--teacher-bos", args.teacher_bos, teacher)):
        if on and bos_token_id(info) is None:
            raise XTokenError(
                f"{flag}: tokenizer {info.source} declares no BOS token (its tokenizer_config.json names no bos_token "
                f"the tokenizer has); drop {flag}, or pass a tokenizer folder whose tokenizer_config.json names one"
            )


def _read_chat(path: str, row: int) -> tuple[str, dict]:
    """Row ``row`` of a .jsonl/.parquet file (or folder), or the one conversation of a .json file."""
    from pathlib import Path

    from nemo_xtoken.data.corpus import read_conversations

    p = Path(path)
    if p.suffix == ".json":
        try:
            return str(p), json.loads(p.read_text("utf-8"))
        except FileNotFoundError:
            raise XTokenError(f"--chat {p}: no such file") from None
        except ValueError as e:
            raise XTokenError(f"--chat {p}: not JSON ({e})") from None
    if not p.exists():
        raise XTokenError(f"--chat {p}: no such file")
    for i, (where, rec, reason) in enumerate(read_conversations(p)):
        if i == row:
            if rec is None:
                raise XTokenError(f"{where}: {reason}")
            return where, rec
    raise XTokenError(f"--chat {p}: has no row {row} (rows count from 0; blank lines are skipped)")


def cmd_align_chat(args: argparse.Namespace) -> int:
    from nemo_xtoken.align.chat import align_chat, masked_text
    from nemo_xtoken.vocab import load_tokenizer

    s, t = load_tokenizer(args.student_tokenizer), load_tokenizer(args.teacher_tokenizer)
    where, rec = _read_chat(args.chat, args.row)
    ca = align_chat(rec, s, t, loss_on=args.loss_on, student_template=args.student_chat_template,
                    teacher_template=args.teacher_chat_template, template_kwargs={"enable_thinking": args.enable_thinking}, where=where)
    for w in ca.warnings:
        print(f"warning: {w}", file=sys.stderr)
    rows = ca.rows(s, t)
    got, tot = ca.assistant_coverage()
    if args.json:
        print(json.dumps({"student_text": ca.student.text, "teacher_text": ca.teacher.text,
                          "student_tokens": len(ca.student.ids), "teacher_tokens": len(ca.teacher.ids),
                          "student_loss_mask": ca.student.loss.astype(int).tolist(), "teacher_loss_mask": ca.teacher.loss.astype(int).tolist(),
                          "assistant_tokens_in_kd_chunks": [got, tot], "chunks": rows, "warnings": ca.warnings},
                         ensure_ascii=False, indent=2))
        return 0
    a = ca.alignment
    print(f"{where}: {len(ca.roles)} messages; loss on {ca.loss_on}; student {len(ca.student.ids)} tokens "
          f"({int(ca.student.loss.sum())} loss-bearing), teacher {len(ca.teacher.ids)} tokens ({int(ca.teacher.loss.sum())} loss-bearing)")
    print(f"{a.n_chunks} chunks: {int(ca.kd_chunks.sum())} carry KD, {int(a.one_sided().sum())} one-sided, "
          f"{int(ca.fused_chunks().sum())} with a fused template/content token; assistant tokens in KD chunks {got}/{tot}")
    for name, side in (("student", ca.student), ("teacher", ca.teacher)):
        print(f"--- {name} rendering ({side.source}; loss-bearing tokens between ⟦ ⟧) ---")
        print(masked_text(side))
    print("--- chunks (role: whose text, '<role>:1' = content only one side renders; KD: the chunk carries KD; "
          "S/T[...]: per-token loss mask, 1 = loss-bearing) ---")
    for r in rows:
        st = " ".join(repr(x) for x in r["student_tokens"]) or "-"
        tt = " ".join(repr(x) for x in r["teacher_tokens"]) or "-"
        sl = "".join("1" if x else "0" for x in r["student_loss"]) or "-"
        tl = "".join("1" if x else "0" for x in r["teacher_loss"]) or "-"
        flag = "KD" if r["kd"] else ("one-sided" if r["one_sided"] else ("fused" if r["fused"] else "no KD"))
        txt = "'" + r["text"].replace("\n", "\\n").replace("\t", "\\t") + "'"
        print(f"{r['chunk']:4d} {r['role']:<9} {flag:<9} {txt:<14} S[{sl}] {st}  <->  T[{tl}] {tt}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from nemo_xtoken.align import align

    if (args.text is None) == (args.chat is None):
        raise XTokenError("give exactly one of --text TEXT or --chat FILE")
    if args.chat is not None:
        return cmd_align_chat(args)
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
    from nemo_xtoken.data.corpus import MAX_DOCUMENT_BYTES
    from nemo_xtoken.data.preprocess import PreprocessOptions, format_report, preprocess
    from nemo_xtoken.vocab import load_tokenizer

    _check_bos(args, load_tokenizer(args.student_tokenizer), load_tokenizer(args.teacher_tokenizer))
    special = not args.no_special_tokens
    opts = PreprocessOptions(
        student_tokenizer=args.student_tokenizer, teacher_tokenizer=args.teacher_tokenizer, field=args.field,
        shard_size=args.shard_size, student_special_tokens=special, teacher_special_tokens=special,
        student_add_bos=args.student_bos, teacher_add_bos=args.teacher_bos, max_document_bytes=args.max_document_bytes or MAX_DOCUMENT_BYTES,
        chat=args.chat, loss_on=args.loss_on, student_chat_template=args.student_chat_template,
        teacher_chat_template=args.teacher_chat_template, enable_thinking=args.enable_thinking,
    )
    if args.chat:  # a missing chat template is said before any work
        from nemo_xtoken.align.chat import chat_template

        chat_template(load_tokenizer(args.student_tokenizer), args.student_chat_template, side="student")
        chat_template(load_tokenizer(args.teacher_tokenizer), args.teacher_chat_template, side="teacher")
    report = preprocess(args.input, args.output, opts, workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
                        overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser("align", help="align one text (or one conversation) under two tokenizers and print the chunk pairs")
    _add_pair_args(p)
    p.add_argument("--text", help="the text to align")
    p.add_argument("--chat", metavar="FILE",
                   help="align a conversation instead: a .json file with {\"messages\": [...]}, or a .jsonl/.parquet file (see --row); "
                   "each side renders it with its own chat template")
    _add_chat_args(p)
    p.add_argument("--row", type=int, default=0, help="with --chat on a .jsonl/.parquet file: the row (from 0)")
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
    p.add_argument("--chat", action="store_true",
                   help="the input is conversations (rows with \"messages\"): each side renders them with its own chat template; "
                   "writes loss and KD masks too (docs/chat.md)")
    _add_chat_args(p)
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="documents per shard (the unit of resumption)")
    p.add_argument("--max-document-bytes", type=positive_int, default=None,
                   help="reject (and count) documents larger than this many bytes (default 4194304 = 4 MiB): memory "
                        "stays bounded by it, never by the file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_preprocess)
