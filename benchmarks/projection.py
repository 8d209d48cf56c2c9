"""Cold W builds for tokenizer pairs of every family, against a plain baseline in the same run.

For each pair: our build time (wall clock and CPU seconds of the process, tokenizers loaded and
parsed from disk in a fresh process, imports included), the load time of the built file, non-zeros
and empty rows; and the same pair built by a plain exact-match + re-tokenization baseline (the
40-line approach: the tokenizer's own decoder, no byte handling, no fingerprints) in the same run.

    python benchmarks/projection.py [--repeats 3] [--pairs llama3:qwen3,gemma3:llama3] [--all] [--no-baseline]

Default pairs: the two of the paper (Llama-3 → Qwen3, → o200k) and the SentencePiece families in
both directions (Gemma-3, Mistral/Llama-2, Gemini with Llama-3).  ``--all``: every ordered pair of
the ten families (one run each unless ``--repeats``).  The goal (every build ≤ 5 s cold) is
printed per pair; it is a measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_xtoken.assets import tokenizer_path  # noqa: E402

FAMILIES = ["llama3", "llama3_1", "qwen3", "o200k", "cl100k", "deepseek_v3", "gptoss", "mistral", "gemma3", "gemini"]
DEFAULT_PAIRS = [
    ("llama3", "qwen3"), ("llama3", "o200k"),
    ("gemma3", "llama3"), ("llama3", "gemma3"),
    ("mistral", "llama3"), ("llama3", "mistral"),
    ("gemini", "llama3"), ("llama3", "gemini"),
    ("gemma3", "qwen3"), ("deepseek_v3", "gemma3"),
]
GOAL_S = 5.0

_OURS = r"""
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
from nemo_xtoken.vocab import build_projection, load_projection
w = build_projection(sys.argv[1], sys.argv[2])
t1 = time.perf_counter(); c1 = time.process_time()
w.save(sys.argv[3])
t2 = time.perf_counter()
load_projection(sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"build": t1 - t0, "cpu": c1 - c0, "save": t2 - t1, "load": t3 - t2, "nnz": w.nnz, "empty": w.counts()["empty"]}))
"""

# The plain approach: decode every token with the tokenizer's own decoder, exact match, then
# re-tokenize the rest with the teacher's full pipeline (no fingerprints, no byte handling).
_BASELINE = r"""
import json, sys, time
t0 = time.perf_counter()
from tokenizers import Tokenizer
s = Tokenizer.from_file(sys.argv[1]); t = Tokenizer.from_file(sys.argv[2])
sv = s.get_vocab(); tv = t.get_vocab()
s_text = {i: s.decode([i]) for i in sv.values()}
t_index = {}
for i in sorted(tv.values()):
    t_index.setdefault(t.decode([i]), i)
rows, pending = {}, []
for i, txt in s_text.items():
    if txt in t_index:
        rows[i] = [(t_index[txt], 1.0)]
    else:
        pending.append(i)
encs = t.encode_batch([s_text[i] for i in pending], add_special_tokens=False)
for i, e in zip(pending, encs):
    if 1 <= len(e.ids) <= 4:
        w = [0.9 * 0.1 ** k for k in range(len(e.ids))]
        z = sum(w)
        rows[i] = [(tid, x / z) for tid, x in zip(e.ids, w)]
print(json.dumps({"build": time.perf_counter() - t0, "nnz": sum(len(r) for r in rows.values()), "empty": len(s_text) - len(rows)}))
"""


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", help="comma-separated student:teacher fixture names (default: a representative set)")
    ap.add_argument("--all", action="store_true", help="every ordered pair of the ten families")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline builds")
    args = ap.parse_args()
    if args.all:
        pairs = [(s, t) for s in FAMILIES for t in FAMILIES if s != t]
    elif args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    else:
        pairs = DEFAULT_PAIRS
    print(f"{'pair':22s} {'ours s':>7s} {'ours cpu':>8s} {'baseline s':>10s} {'ratio':>6s} {'load s':>7s} "
          f"{'nnz':>8s} {'empty rows':>10s} {'base empty':>10s}  goal <= {GOAL_S:g} s")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for s_name, t_name in pairs:
            s, t = str(tokenizer_path(s_name)), str(tokenizer_path(t_name))
            w = str(Path(tmp) / f"{s_name}_{t_name}.safetensors")
            ours = [_run(_OURS, s, t, w) for _ in range(args.repeats)]
            ob = statistics.median(r["build"] for r in ours)
            oc = statistics.median(r["cpu"] for r in ours)
            ld = statistics.median(r["load"] for r in ours)
            worst = max(worst, ob)
            if args.no_baseline:
                bb_s, ratio, be = "-", "-", "-"
            else:
                base = [_run(_BASELINE, s, t) for _ in range(args.repeats)]
                bb = statistics.median(r["build"] for r in base)
                bb_s, ratio, be = f"{bb:.2f}", f"{ob / bb:.2f}", str(base[0]["empty"])
            print(f"{s_name + ' -> ' + t_name:22s} {ob:7.2f} {oc:8.2f} {bb_s:>10s} {ratio:>6s} {ld:7.3f} {ours[0]['nnz']:8d} "
                  f"{ours[0]['empty']:10d} {be:>10s}  {'met' if ob <= GOAL_S else 'NOT met'}", flush=True)
    print(f"(median of {args.repeats} cold runs each, one process per run, wall clock; 'ours cpu' = CPU seconds of the "
          f"process incl. the tokenizer's threads; baseline = plain exact match + teacher re-tokenization; slowest: {worst:.2f} s)")


if __name__ == "__main__":
    main()
