"""Packing: loss-bearing fraction and samples/s of packed batches vs today's unpacked path, on real text.

Usage: ``XTOKEN_CACHE=... python benchmarks/packing.py [--corpus sotu moby-dick] [--seq-length 4096]
[--teacher-seq-length 4096 4352] [--samples 256] [--repeat 3]``

Real English text from ``nemo_xtoken.assets.text_corpus`` (``sotu``: 233 State of the Union
addresses, mean ~9k Llama-3 tokens; ``moby-dick``: 139 chapters, mean ~2k), real tokenizers
(Llama-3 student; Qwen3, o200k teachers).  Each corpus is preprocessed once per teacher with
``xtoken preprocess`` (cached under ``$XTOKEN_CACHE/bench-packing``; that time is not part of the
figures).  For every setting the baseline is the unpacked dataset (one document piece per sample,
padded: ``packing=False``, ``on_too_long="split"``) in the same run:

- loss-bearing fraction: student positions with ``loss_mask`` 1 over all student positions of an
  epoch (from the plan; equal to the built samples', see tests/test_packing.py); teacher fill: the
  teacher positions holding a token;
- samples/s: building ``--samples`` stream samples and collating them into batches of 8, single
  process, CPU time (the machine is shared; CPU seconds are steadier than wall seconds), best of
  ``--repeat``; "loss tokens/s" = samples/s × seq_length × loss-bearing fraction (what the GPUs learn from);
- plan: the seconds to plan epoch 0 (packing) or all pieces (unpacked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from nemo_xtoken.assets import cache_dir, text_corpus, tokenizer_path  # noqa: E402
from nemo_xtoken.data.batch import collate  # noqa: E402
from nemo_xtoken.data.documents import MultiTeacherDocuments, PreprocessedDocuments  # noqa: E402
from nemo_xtoken.data.packing import DualTokenizedDataset  # noqa: E402


def _preprocessed(corpus: str, teacher: str) -> PreprocessedDocuments:
    out = cache_dir() / "bench-packing" / f"{corpus}-llama3-{teacher}"
    opts = PreprocessOptions(str(tokenizer_path("llama3")), str(tokenizer_path(teacher)), shard_size=64)
    if not (out / "manifest.json").is_file():
        print(f"[preprocess {corpus} with llama3 / {teacher} into {out}]", file=sys.stderr, flush=True)
    preprocess(text_corpus(corpus), out, opts, workers=1, progress=False)  # resumes: nothing to do when done
    return PreprocessedDocuments(out)


def _time_once(ds: DualTokenizedDataset, start: int, n: int) -> float:
    """CPU seconds to build and collate stream samples ``start … start+n-1`` (batches of 8)."""
    t0 = time.process_time()
    for b in range(start, start + n, 8):
        collate([ds[i] for i in range(b, min(b + 8, start + n))])
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=["sotu", "moby-dick"])
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--teacher-seq-length", type=int, nargs="+", default=[4096, 4352],
                    help="teacher budgets to try (every teacher gets the same)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    S = args.seq_length
    rows = []
    for corpus in args.corpus:
        q, o = _preprocessed(corpus, "qwen3"), _preprocessed(corpus, "o200k")
        s_len, _ = q.lengths()
        print(f"{corpus}: {len(q)} documents, {int(s_len.sum()):,} Llama-3 tokens (mean {s_len.mean():.0f}, max {s_len.max()})",
              file=sys.stderr, flush=True)
        setups = [("qwen3", q, 1), ("o200k", o, 1), ("qwen3+o200k", MultiTeacherDocuments([q, o]), 2)]
        for T in args.teacher_seq_length:
            for name, docs, m in setups:
                built = []
                for packing in (False, True):
                    t0 = time.process_time()
                    ds = DualTokenizedDataset(docs, seq_length=S, teacher_seq_length=[T] * m, packing=packing, on_too_long="split", seed=0)
                    built.append((ds, time.process_time() - t0, ds.packing_stats()))
                # baseline and packed timed alternately (the machine is shared), other samples each repeat
                best = [float("inf"), float("inf")]
                for r in range(args.repeat):
                    for k, (ds, _, st) in enumerate(built):
                        best[k] = min(best[k], _time_once(ds, r * args.samples, args.samples))
                base = None
                for (ds, plan_s, st), sec in zip(built, best):
                    sps = args.samples / sec
                    row = {
                        "corpus": corpus, "teachers": name, "T": T, "mode": "packed" if ds.packing else "unpacked (baseline)",
                        "samples": st.samples, "loss": st.loss_fraction, "fill": "/".join(f"{f:.3f}" for f in st.teacher_fill),
                        "split": st.split_documents, "plan_s": plan_s, "sps": sps, "lps": sps * S * st.loss_fraction,
                    }
                    base = base or row
                    row["ratio_sps"] = sps / base["sps"]
                    row["ratio_lps"] = row["lps"] / base["lps"]
                    rows.append(row)
                    print(f"  {name} T={T} {row['mode']}: {st.samples} samples, loss-bearing {st.loss_fraction:.4f}, "
                          f"{sps:.0f} samples/s", file=sys.stderr, flush=True)
    head = ("| corpus | teachers | teacher seq_length | mode | samples/epoch | loss-bearing fraction | teacher fill | "
            "docs split | plan s | samples/s | vs baseline | loss tokens/s | vs baseline |")
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        print(f"| {r['corpus']} | {r['teachers']} | {r['T']} | {r['mode']} | {r['samples']} | {r['loss']:.4f} | {r['fill']} | "
              f"{r['split']} | {r['plan_s']:.2f} | {r['sps']:.0f} | {r['ratio_sps']:.2f}x | {r['lps'] / 1e6:.2f} M | {r['ratio_lps']:.2f}x |")
    print(f"\nseq_length {S}; samples/s: {args.samples} samples in batches of 8, CPU time of one process, best of {args.repeat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
