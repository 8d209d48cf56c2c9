"""Build W for Llama-3 → Qwen3 and Llama-3 → o200k; print time (cold, tokenizers loaded from disk),
non-zeros, empty rows, and load time of the built file, against a plain exact-match +
re-tokenization baseline (the 40-line approach) in the same run.

    python benchmarks/projection.py [--repeats 3]

Each cold build runs in a fresh process, so tokenizer loading and parsing are included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nemo_xtoken.assets import tokenizer_path

PAIRS = [("llama3", "qwen3"), ("llama3", "o200k")]

_OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from nemo_xtoken.vocab import build_projection, load_projection
w = build_projection(sys.argv[1], sys.argv[2])
t1 = time.perf_counter()
w.save(sys.argv[3])
t2 = time.perf_counter()
load_projection(sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"build": t1 - t0, "save": t2 - t1, "load": t3 - t2, "nnz": w.nnz, "empty": w.counts()["empty"]}))
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
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'pair':16s} {'ours build s':>12s} {'baseline s':>10s} {'ratio':>6s} {'load s':>7s} {'nnz':>8s} {'empty rows':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for s_name, t_name in PAIRS:
            s, t = str(tokenizer_path(s_name)), str(tokenizer_path(t_name))
            w = str(Path(tmp) / f"{s_name}_{t_name}.safetensors")
            ours = [_run(_OURS, s, t, w) for _ in range(args.repeats)]
            base = [_run(_BASELINE, s, t) for _ in range(args.repeats)]
            ob = statistics.median(r["build"] for r in ours)
            bb = statistics.median(r["build"] for r in base)
            ld = statistics.median(r["load"] for r in ours)
            print(f"{s_name + '→' + t_name:16s} {ob:12.2f} {bb:10.2f} {ob / bb:6.2f} {ld:7.3f} {ours[0]['nnz']:8d} {ours[0]['empty']:10d}")
    print(f"(median of {args.repeats} cold runs each, one process per run; baseline = plain exact match + teacher re-tokenization)")


if __name__ == "__main__":
    main()
