"""``xtoken build-projection``, ``xtoken audit``, ``xtoken inspect``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from nemo_xtoken.errors import XTokenError


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (argparse names the option in its error)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-tokenizer", "-s", required=True, help="tokenizer.json, HF folder or cached hub name")
    p.add_argument("--teacher-tokenizer", "-t", required=True, help="tokenizer.json, HF folder or cached hub name")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from a HF folder")


def _load_pair(args):
    from nemo_xtoken.vocab import load_tokenizer

    s = load_tokenizer(args.student_tokenizer, trust_remote_code=args.trust_remote_code)
    t = load_tokenizer(args.teacher_tokenizer, trust_remote_code=args.trust_remote_code)
    return s, t


def cmd_build_projection(args: argparse.Namespace) -> int:
    from nemo_xtoken.vocab import build_projection

    if args.beta is not None:
        raise XTokenError(
            "--beta was removed: β multiplies every weight of a row and cancels in the row normalization "
            "(W[s, τ_i] = β·γ^i / Σ_j β·γ^j = γ^i / Σ_j γ^j), so it never changed W; drop --beta and shape the "
            "weights with --gamma (the weight of each next teacher piece relative to the one before)"
        )
    from nemo_xtoken.vocab.projection import check_output_file

    check_output_file(args.output)  # before the tokenizers load and W is built
    t0 = time.perf_counter()
    student, teacher = _load_pair(args)
    proj = build_projection(
        student, teacher, gamma=args.gamma, max_len=args.max_len, top_k=args.top_k, progress=sys.stderr.isatty(),
    )
    proj.save(args.output)
    c = proj.counts()
    print(
        f"wrote {args.output}: W {proj.shape[0]}×{proj.shape[1]}, {proj.nnz} non-zeros; rows: "
        f"{c['exact']} exact, {c['multi_token']} multi-token, {c['empty']} empty (no teacher mapping), "
        f"{c['no_token']} ids without a token; {time.perf_counter() - t0:.2f} s"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from nemo_xtoken.vocab import audit, load_projection
    from nemo_xtoken.vocab.audit import CATEGORIES

    critical = [c.strip() for c in args.critical.split(",") if c.strip()]
    names = [n for n, _ in CATEGORIES]
    unknown = [c for c in critical if c not in names]
    if unknown:
        raise XTokenError(f"--critical names unknown categories {', '.join(unknown)}: choose from {', '.join(names)}")
    student, teacher = _load_pair(args)
    proj = load_projection(args.projection, student, teacher)
    report = audit(proj, student, teacher, critical=critical, min_exact_fraction=args.min_exact_fraction)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table(f"coverage audit: {student.source} (student) → {teacher.source} (teacher)"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from nemo_xtoken.vocab import canonical_vocab, load_projection

    student, teacher = _load_pair(args)
    proj = load_projection(args.projection, student, teacher)
    scv, tcv = canonical_vocab(student), canonical_vocab(teacher)
    if args.id is not None:
        if not 0 <= args.id < scv.size:
            raise XTokenError(f"student id {args.id} is outside {student.source} (0…{scv.size - 1})")
        ids = [args.id]
    else:
        ids = scv.lookup(args.token)
        if not ids:
            raise XTokenError(
                f"no token of {student.source} decodes to {args.token!r}: pass the text of one token "
                "(e.g. ' the' with its leading space), or --id"
            )
    out = []
    for s in ids:
        row = [{"teacher_id": t, "teacher_token": tcv.display(t), "weight": round(w, 6)} for t, w in proj.row(s)]
        row.sort(key=lambda r: -r["weight"])
        out.append({"student_id": s, "student_token": scv.display(s), "row": row})
    if args.json:
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
    else:
        for r in out:
            print(f"student {r['student_id']} {r['student_token']!r}:")
            if not r["row"]:
                print("  (empty row: no teacher mapping)")
            for e in r["row"]:
                print(f"  {e['weight']:.4f}  teacher {e['teacher_id']} {e['teacher_token']!r}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-projection", help="build the sparse vocabulary projection W for a tokenizer pair")
    _add_tokenizer_args(p)
    p.add_argument("--output", "-o", required=True, help="W file to write (safetensors)")
    p.add_argument("--gamma", type=positive_float, default=0.1,
                   help="multi-token rule: teacher piece i gets weight γ^i / Σ_j γ^j (default 0.1: 0.909, 0.091 for two pieces)")
    p.add_argument("--beta", type=float, default=None, help=argparse.SUPPRESS)  # removed: refused with the reason
    p.add_argument("--max-len", type=positive_int, default=4, help="longest teacher re-tokenization mapped (default 4)")
    p.add_argument("--top-k", type=positive_int, default=4, help="non-zeros kept per row (default 4)")
    p.set_defaults(func=cmd_build_projection)

    p = sub.add_parser("audit", help="coverage audit of W and the recommended loss (p_kl or h_kl)")
    p.add_argument("--projection", "-p", required=True, help="W file from build-projection")
    _add_tokenizer_args(p)
    p.add_argument("--critical", default="single_digits,two_digit_numerals,three_digit_numerals",
                   help="comma-separated critical categories (default: the numerals)")
    p.add_argument("--min-exact-fraction", type=fraction, default=1.0,
                   help="a critical category is inside C when this fraction maps exactly (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("inspect", help="show W's row for one student token")
    p.add_argument("--projection", "-p", required=True, help="W file from build-projection")
    _add_tokenizer_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token", help="the student token's text as the student tokenizer decodes it")
    g.add_argument("--id", type=int, help="the student token id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
