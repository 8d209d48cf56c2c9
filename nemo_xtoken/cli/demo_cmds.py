"""``xtoken demo``: the main job on the embedded default (real Llama-3, Qwen3 and o200k tokenizers).

1. builds W for Llama-3 → Qwen3 and Llama-3 → o200k (Phi-4-mini's base vocabulary), prints both
   coverage audits with their recommendation and the paper's two W examples (``audits.json``);
2. distils in the paper's regime at CPU size (continued pre-training on every token of a generated
   corpus of worked arithmetic, each story drawn at most once): three tiny Megatron teachers (Qwen3,
   o200k and Llama-3 ids; cached), which must beat the CE-only student in every answer category
   before any KD student trains (the teacher gate), and one tiny Llama-3 student per method and seed
   (default: CE only; KD ← Llama-3; GOLD, P-KL ← Qwen3; GOLD, H-KL ← o200k; H-KL ← o200k 0.8 + KL ←
   Llama-3 0.2; with ``--methods`` also ULD ← Qwen3, P-KL with a learnable W, P-KL at fixed KD
   weights, partition-KL), the same initialization and data order for every method of a seed;
   writes the table (mean ± sd over seeds), every claim of the paper with a verdict, the curves and
   every figure (``results.{md,json}``, ``curves.png``).  See docs/demo.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def _audits(out: Path) -> dict:
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.vocab import audit, cached_projection, canonical_vocab, load_tokenizer

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
    return summary


def _audit_child(out: Path, conn) -> None:
    """Run :func:`_audits` in a forked process; send its printed text (or the failure's traceback) back."""
    import contextlib
    import io
    import traceback

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            _audits(out)
        conn.send(("ok", buf.getvalue()))
    except BaseException:
        conn.send(("error", buf.getvalue() + traceback.format_exc()))
    finally:
        conn.close()


def _audits_beside_imports(out: Path) -> dict:
    """The audits in a forked process while this one imports Megatron-core and ModelOpt (one core each).

    Both are start-up work that the training cannot begin without (the audits build and cache W;
    the training's workers are forked from this process with the imports in place), ~15 s each on
    a fresh machine, so running them side by side saves about as much wall time.  The audits'
    output is printed once they end, in the order a serial run prints it.
    """
    import multiprocessing as mp

    from nemo_xtoken.demo.run import _preimport
    from nemo_xtoken.errors import XTokenError

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    sys.stdout.flush()
    proc = ctx.Process(target=_audit_child, args=(out, send))
    proc.start()
    send.close()
    try:
        _preimport()
        status, text = recv.recv() if recv.poll(None) else ("error", "the audit process sent nothing")
    except EOFError:
        status, text = "error", "the audit process ended without a result"
    finally:
        proc.join()
    print(text, end="")
    if status != "ok" or proc.exitcode != 0:
        raise XTokenError(f"the W audits failed (exit code {proc.exitcode}):\n{text[-2000:]}")
    return json.loads((out / "audits.json").read_text())


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: ``N`` means seeds 1…N; ``a,b,…`` those seeds (``2,3`` adds seeds to a one-seed run; ``3,`` is seed 3 alone)."""
    from nemo_xtoken.errors import XTokenError

    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return tuple(range(1, n + 1))
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise XTokenError(f"--seeds takes N ≥ 1 (seeds 1…N) or a comma-separated list of seeds ≥ 1, got {text!r}") from None
    if not seeds or min(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise XTokenError(f"--seeds: a list of distinct seeds ≥ 1, got {text!r}")
    return seeds


def cmd_demo(args: argparse.Namespace) -> int:
    from nemo_xtoken.demo.report import check_results, format_direction, format_table, write_outputs
    from nemo_xtoken.demo.run import FAST, FULL, run_demo
    from nemo_xtoken.errors import XTokenError

    t0 = time.perf_counter()
    cfg = FAST if args.fast else FULL
    over: dict = {k: v for k, v in (("student_steps", args.steps), ("teacher_steps", args.teacher_steps), ("workers", args.workers), ("tp", args.tp),
                                           ("eval_every", args.eval_every), ("kd_weight", args.kd_weight)) if v is not None}
    if args.eval_every is not None and args.eval_every < 1:
        raise XTokenError(f"--eval-every takes N ≥ 1 steps, got {args.eval_every}")
    if args.kd_weight is not None and not args.kd_weight > 0:
        raise XTokenError(f"--kd-weight takes a weight > 0 (fixed CE + w·KD), got {args.kd_weight}")
    if args.live_teachers:
        over["live_teachers"] = True
    if args.seeds is not None:
        over["seeds"] = parse_seeds(args.seeds)
    if args.methods:
        over["methods"] = tuple(x.strip() for x in args.methods.split(",") if x.strip())
    if args.teacher_steps is not None:
        over["teacher_steps_by"] = ()  # --teacher-steps N: every teacher N steps
    cfg = replace(cfg, **over)
    try:
        cfg.selected()
    except ValueError as e:
        raise XTokenError(f"--methods: {e}") from None
    if args.study is not None:
        return _study(args, cfg)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.audit_only:
        _audits(out)
        return 0
    audits = _audits_beside_imports(out)
    # Megatron-core, ModelOpt (and sympy under them) leave millions of long-lived objects: freezing them
    # keeps every later collection (the data build, the forked workers) from walking them again.
    gc.freeze()
    print(f"\n== distillation ({'fast' if args.fast else 'full'}): {cfg.teacher_steps} teacher steps"
          + "".join(f" ({n} {k})" for n, k in cfg.teacher_steps_by) + f", {cfg.student_steps} student steps, "
          f"batch {cfg.batch}, seeds {list(cfg.seeds)}")
    partial = out / "results.partial.json"

    def on_partial(r: dict) -> None:  # what has finished so far, rewritten after every student (removed at the end)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({**r, "audits": audits}, indent=1, ensure_ascii=False))
        tmp.replace(partial)

    results = run_demo(cfg, progress=not args.no_progress, on_partial=on_partial)
    partial.unlink(missing_ok=True)
    results["seconds"]["audits_and_startup"] = time.perf_counter() - t0 - results["seconds"]["total"]
    results["seconds"]["wall"] = time.perf_counter() - t0
    check_results(results)
    paths = write_outputs(results, out, audits)
    print()
    print(format_table(results))
    print("\nevery claim of the paper the demo can test (paired differences in exact answers, per seed; "
          "holds / fails only where every seed agrees):")
    print(format_direction(results))
    print(f"\nwrote {paths['table']}, {paths['plot']}, {paths['json']}  ({results['seconds']['wall']:.0f} s in all)")
    gc.freeze()  # the interpreter's final collection would walk the whole heap again: 4–5 s measured, for nothing
    return 0


def _study(args: argparse.Namespace, cfg) -> int:
    """``xtoken demo --study pkl``: the P-KL study (nemo_xtoken.demo.study) into ``<output>/study``."""
    from nemo_xtoken.demo.run import _preimport
    from nemo_xtoken.demo.study import format_study, run_study
    from nemo_xtoken.errors import XTokenError

    if args.study != "pkl":
        raise XTokenError(f"--study: the one study is 'pkl' (P-KL ← Qwen3 vs CE only), got {args.study!r}")
    bad = [o for o, v in (("--methods", args.methods), ("--kd-weight", args.kd_weight), ("--audit-only", args.audit_only or None)) if v is not None]
    if bad:
        raise XTokenError(f"--study pkl sets its own cells: drop {', '.join(bad)}")
    if args.seeds is None:
        cfg = replace(cfg, seeds=(1, 2, 3))
    out = Path(args.output) / "study"
    _preimport()
    gc.freeze()
    res = run_study(cfg, out, command="xtoken demo " + " ".join(sys.argv[sys.argv.index("demo") + 1 :] if "demo" in sys.argv else []),
                    progress=not args.no_progress)
    print()
    print(format_study(res))
    print(f"\nwrote {out / 'results_study.json'}, {out / 'study.md'}, {out / 'study.png'}")
    gc.freeze()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default (real tokenizers, no model hub)")
    p.add_argument("--output", "--out", "-o", default="outputs/demo", help="where to write the demo's results")
    p.add_argument("--fast", action="store_true", help="a tiny version (seconds of training; what the test runs)")
    p.add_argument("--seeds", default=None, help="students per method with seeds 1…N (initialization and data order), or a list such as 2,3 (3, = seed 3 alone); "
                   "teachers are shared (default 1); runs of other seeds merge with python -m nemo_xtoken.demo.report --merge")
    p.add_argument("--methods", default=None, help="comma-separated method keys, trained in this order (default: ce, kd_llama3, gold_qwen3, pkl_qwen3, "
                   "gold_o200k, hkl_o200k, two_teachers); selectable only here: uld_qwen3, pkl_learned_w_qwen3, partkl_qwen3, partkl_o200k (partition-KL), "
                   "pkl_qwen3_w0.5, pkl_qwen3_w1, pkl_qwen3_w2 (P-KL ← Qwen3 at fixed KD weights: the paper's Table 4)")
    p.add_argument("--steps", type=int, default=None, help="student training steps (default: the full or fast setting)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps, every teacher (default: the full setting, 800; Qwen3 2400)")
    p.add_argument("--workers", type=int, default=None, help="training processes at a time (default 2)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per model on gloo (default 1; 2 runs jobs one by one)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation (curves, gradient probe) every N steps (default: the full or fast setting)")
    p.add_argument("--kd-weight", type=float, default=None, help="fixed KD weight w (loss CE + w·KD) instead of dynamic scaling CE + sg(CE/|KD|)·KD")
    p.add_argument("--live-teachers", action="store_true", help="run the frozen teachers at every student step instead of once per story "
                   "(same figures up to float rounding, slower; see docs/demo.md)")
    p.add_argument("--study", default=None, metavar="pkl", help="the P-KL study instead of the demo: P-KL ← Qwen3 (KD weighting x W x merge) and CE only, "
                   "seeds 1,2,3 unless --seeds; writes <output>/study/{results_study.json,study.md,study.png}; not part of make demo (docs/demo.md)")
    p.add_argument("--audit-only", action="store_true", help="only the coverage audits")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
