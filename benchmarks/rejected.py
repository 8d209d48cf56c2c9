"""What rejected documents cost in `xtoken preprocess`: a batch with 10 % rejected documents vs a clean one.

Usage: ``XTOKEN_CACHE=... python benchmarks/rejected.py [--docs 1000] [--every 10] [--repeat 5]``

Real text: sentences of the State of the Union addresses longer than 200 characters, one per
document (``--docs``).  The batch under test is the same list with every ``--every``-th document
made unalignable for the teacher (a decomposed ``é``, which Qwen3's NFC normalizer changes: the
document is rejected with the span named).  Both go through ``align_batch(..., on_error="skip")``
(what a preprocess shard runs) with Llama-3 (student) and Qwen3 (teacher); CPU seconds of one
process, best of ``--repeat``, the two alternated (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_xtoken.align import align_batch  # noqa: E402
from nemo_xtoken.assets import text_corpus, tokenizer_path  # noqa: E402
from nemo_xtoken.vocab import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    s, t = load_tokenizer(tokenizer_path("llama3")), load_tokenizer(tokenizer_path("qwen3"))
    docs: list[str] = []
    with open(text_corpus("sotu")) as f:
        for line in f:
            docs += [x for x in json.loads(line)["text"].split(". ") if len(x) > 200]
            if len(docs) >= args.docs:
                break
    docs = docs[: args.docs]
    bad = [d + " cafe\u0301" if i % args.every == 0 else d for i, d in enumerate(docs)]
    best = {"clean": float("inf"), "rejected": float("inf")}
    n_rej = 0
    for _ in range(args.repeat):
        for name, texts in (("clean", docs), ("rejected", bad)):
            t0 = time.process_time()
            b = align_batch(texts, s, t, on_error="skip")
            best[name] = min(best[name], time.process_time() - t0)
            if name == "rejected":
                n_rej = len(b.rejected)
    print("| batch | documents | rejected | CPU s (best of %d) | vs clean |" % args.repeat)
    print("|---|---|---|---|---|")
    print(f"| clean | {len(docs)} | 0 | {best['clean']:.3f} | 1.00x |")
    print(f"| every {args.every}th rejected | {len(bad)} | {n_rej} | {best['rejected']:.3f} | {best['rejected'] / best['clean']:.2f}x |")
    per_ok = best["clean"] / len(docs)
    per_rej = (best["rejected"] - (len(bad) - n_rej) * per_ok) / max(n_rej, 1)
    print(f"\nper document: accepted {per_ok * 1e3:.2f} ms, rejected {per_rej * 1e3:.2f} ms ({per_rej / per_ok:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
