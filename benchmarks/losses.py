"""Loss benchmarks: bytes crossing tensor-parallel ranks for P-KL, and time/peak memory per loss.

    XTOKEN_CACHE=... python benchmarks/losses.py [--tokens 128] [--repeats 3] [--skip-time]

Part 1 counts, on CPU from the exchange plans, the values each rank sends per token in the
forward (the backward sends the same amounts in reverse) for the real Llama-3 → Qwen3 and
Llama-3 → o200k (Phi-4-mini) W at tp = 2, 4, 8, vocabularies padded as Megatron does (a multiple
of 128·tp of the checkpoint's size):

* all-gather of the student logits: every rank sends its shard to tp − 1 ranks (ring);
* public reference: partial projection onto 8,192 teacher columns, then an all-reduce (ring:
  2·(tp − 1)/tp of the buffer);
* our plan (:class:`PKLPlan`), and our plan after the teacher permutation.

Our rows add the per-token scalars (softmax max and sum-exp of both sides, the partial loss: 5
scalar all-reduces).  Part 2 times forward+backward of each loss (tp = 1, CPU, fp32, the real
vocabularies and W, ``--tokens`` positions) against same-tokenizer KL at equal tokens, and
measures peak memory (RSS sampled every 0.2 ms, above the live inputs) in a fresh process per loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nemo_xtoken.parallel.plan import PKLPlan, teacher_permutation  # noqa: E402
from nemo_xtoken.testing.bench import last_json, print_table_head, run_fresh  # noqa: E402

BYTES = 4  # fp32 values on the wire
PUBLIC_TOPK = 8192
CHECKPOINT_VOCAB = {"qwen3": 151936, "o200k": 200064}  # Qwen3-4B, Phi-4-mini checkpoints (padded beyond the tokenizer)
STUDENT_CHECKPOINT_VOCAB = 128256  # Llama-3.2-1B


def pad(v: int, tp: int) -> int:
    """Megatron's padded vocabulary: a multiple of 128·tp."""
    m = 128 * tp
    return (v + m - 1) // m * m


_W_CACHE: dict[str, object] = {}


def projection(teacher: str):
    """W (Llama-3 student → ``teacher``), built once from the real tokenizers and cached on disk."""
    if teacher in _W_CACHE:
        return _W_CACHE[teacher]
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.vocab import build_projection, load_projection

    path = cache_dir() / "bench" / f"W_llama3_{teacher}.safetensors"
    if path.is_file():
        w = load_projection(path)
    else:
        w = build_projection(tokenizer_path("llama3"), tokenizer_path(teacher))
        w.save(path)
    _W_CACHE[teacher] = w
    return w


def ring_all_reduce(values: float, tp: int) -> float:
    return 2 * (tp - 1) / tp * values


def bytes_table() -> list[dict]:
    rows = []
    for teacher in ("qwen3", "o200k"):
        W = projection(teacher)
        for tp in (2, 4, 8):
            vs = pad(max(W.shape[0], STUDENT_CHECKPOINT_VOCAB), tp)
            vt = pad(max(W.shape[1], CHECKPOINT_VOCAB[teacher]), tp)
            scalars = ring_all_reduce(5, tp)
            allgather = (tp - 1) * vs / tp
            public = ring_all_reduce(PUBLIC_TOPK, tp)
            plan = PKLPlan.build(W, tp, vs, vt).values_sent_per_token()
            perm = teacher_permutation(W, tp, vs, vt)
            pplan = PKLPlan.build(W, tp, vs, vt, teacher_perm=perm).values_sent_per_token()
            rows.append(dict(
                pair=f"llama3->{teacher}", tp=tp, V_S=vs, V_T=vt,
                allgather=allgather * BYTES, public=public * BYTES,
                plan_mean=(plan.mean() + scalars) * BYTES, plan_max=(plan.max() + scalars) * BYTES,
                perm_mean=(pplan.mean() + scalars) * BYTES, perm_max=(pplan.max() + scalars) * BYTES,
            ))
    return rows


def print_bytes(rows: list[dict]) -> None:
    print("\nP-KL: bytes sent per token per rank, forward (fp32; the backward sends the same in reverse)")
    hdr = f"{'pair':<16}{'tp':>3}{'V_S′':>8}{'V_T′':>8}{'all-gather':>12}{'public 8k AR':>14}{'plan mean/max':>18}{'permuted mean/max':>20}{'perm/AG':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['pair']:<16}{r['tp']:>3}{r['V_S']:>8}{r['V_T']:>8}{r['allgather']:>12,.0f}{r['public']:>14,.0f}"
            f"{r['plan_mean']:>10,.0f}/{r['plan_max']:<7,.0f}{r['perm_mean']:>12,.0f}/{r['perm_max']:<7,.0f}"
            f"{100 * r['perm_mean'] / r['allgather']:>8.2f}%"
        )


def hybrid_bytes_table(teachers=("qwen3", "o200k"), tps=(8,)) -> list[dict]:
    """GOLD / H-KL / ULD: the exact path's all-gather of both sides vs the low-traffic HybridPlan (permuted teacher)."""
    from nemo_xtoken.parallel.summary import DEFAULT_BINS, HybridPlan, summary_values_per_token

    rows = []
    for teacher in teachers:
        W = projection(teacher)
        for tp in tps:
            vs = pad(max(W.shape[0], STUDENT_CHECKPOINT_VOCAB), tp)
            vt = pad(max(W.shape[1], CHECKPOINT_VOCAB[teacher]), tp)
            scalars = ring_all_reduce(5, tp)
            allgather = (tp - 1) * (vs + vt) / tp  # the exact path: both sides' item rows
            perm = teacher_permutation(W, tp, vs, vt)  # the P-KL permutation (one per teacher model)
            uld = ring_all_reduce(summary_values_per_token(DEFAULT_BINS), tp) + scalars
            row = dict(pair=f"llama3->{teacher}", tp=tp, V_S=vs, V_T=vt, allgather=allgather * BYTES, uld=uld * BYTES)
            for name, relaxed in (("gold", False), ("h_kl", True)):
                sent = HybridPlan.build(W, tp, vs, vt, relaxed=relaxed, teacher_perm=perm).values_sent_per_token()
                row[f"{name}_mean"], row[f"{name}_max"] = (sent.mean() + scalars) * BYTES, (sent.max() + scalars) * BYTES
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_hybrid_bytes(rows: list[dict]) -> None:
    print("\nGOLD / H-KL / ULD: bytes sent per token per rank, forward (fp32), exact all-gather vs low traffic (HybridPlan, permuted teacher)")
    hdr = f"{'pair':<16}{'tp':>3}{'all-gather':>12}{'GOLD mean/max':>20}{'H-KL mean/max':>20}{'ULD':>9}{'GOLD/AG':>9}{'H-KL/AG':>9}{'ULD/AG':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['pair']:<16}{r['tp']:>3}{r['allgather']:>12,.0f}{r['gold_mean']:>12,.0f}/{r['gold_max']:<7,.0f}"
            f"{r['h_kl_mean']:>12,.0f}/{r['h_kl_max']:<7,.0f}{r['uld']:>9,.0f}"
            f"{100 * r['gold_mean'] / r['allgather']:>8.2f}%{100 * r['h_kl_mean'] / r['allgather']:>8.2f}%{100 * r['uld'] / r['allgather']:>7.2f}%"
        )


def summary_error_table(widths=(128256, 200019), scales=(1.0, 3.0, 6.0), items: int = 8) -> None:
    """The low-traffic sorted L1 (shard summaries) against the exact one at the real widths (random softmaxes)."""
    import torch

    from nemo_xtoken.parallel.losses import _sorted_l1
    from nemo_xtoken.parallel.summary import DEFAULT_BINS, summary_sorted_l1

    print(f"\nsorted-L1 summary ({DEFAULT_BINS} bins) vs exact, {items} items, widths {widths}, softmax of N(0, scale²) logits")
    print(f"{'scale':>6}{'exact mean':>12}{'max rel err':>13}{'max bound/exact':>17}")
    g = torch.Generator().manual_seed(0)
    for scale in scales:
        ps = torch.softmax(torch.randn(items, widths[0], generator=g) * scale, 1)
        pt = torch.softmax(torch.randn(items, widths[1], generator=g) * scale, 1)
        ex = _sorted_l1(ps, pt)
        v, b = summary_sorted_l1(ps, pt)
        print(f"{scale:>6}{float(ex.mean()):>12.4f}{float(((ex - v) / ex).abs().max()):>13.2e}{float((b / ex).max()):>17.2e}")


# ---- time and memory -------------------------------------------------------------------------------
LOSS_NAMES = ("kl", "p_kl", "uld", "gold", "h_kl")


def _inputs(tokens: int, teacher: str, seed: int = 0):
    import torch

    W = projection(teacher)
    vs, vt = W.shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(tokens, vs, generator=g) * 3
    t_same = torch.randn(tokens, vs, generator=g) * 3
    t = torch.randn(tokens, vt, generator=g) * 3
    return W, s, t_same, t


def _run_once(name: str, W, plan, s, t_same, t):
    import nemo_xtoken.parallel as P

    x = s.clone().requires_grad_(True)
    if name == "kl":
        loss = P.vocab_parallel_kl(x, t_same)
    elif name == "p_kl":
        loss = P.vocab_parallel_p_kl(x, t, plan)
    elif name == "uld":
        loss = P.vocab_parallel_uld(x, t)
    else:
        loss = P.PARALLEL_LOSSES[name](x, t, W)
    loss.backward()
    return float(loss.detach())


def time_losses(tokens: int, repeats: int, teacher: str) -> dict[str, float]:
    W, s, t_same, t = _inputs(tokens, teacher)
    plan = PKLPlan.build(W, 1)
    out = {}
    for name in LOSS_NAMES:
        _run_once(name, W, plan, s, t_same, t)  # warm-up
        ts = []
        for _ in range(repeats):
            a = time.perf_counter()
            _run_once(name, W, plan, s, t_same, t)
            ts.append(time.perf_counter() - a)
        out[name] = float(np.median(ts))
    return out


def _peak_child(name: str, tokens: int, teacher: str) -> None:
    """In a fresh process: peak RSS of one forward+backward above the live inputs (sampled every 0.2 ms)."""
    from nemo_xtoken.testing.bench import peak_rss

    W, s, t_same, t = _inputs(tokens, teacher)
    plan = PKLPlan.build(W, 1)
    r = peak_rss(lambda: _run_once(name, W, plan, s, t_same, t))
    print(json.dumps({"name": name, "extra": r.extra, "base": r.base}))


def peak_memory(tokens: int, teacher: str) -> dict[str, int]:
    out = {}
    for name in LOSS_NAMES:
        r = run_fresh(__file__, ["--peak-child", name, "--tokens", str(tokens), "--teacher", teacher], ROOT, check=True)
        out[name] = last_json(r)["extra"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher", default="qwen3", choices=("qwen3", "o200k"))
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--hybrid-bytes", action="store_true", help="only the GOLD/H-KL/ULD low-traffic error and traffic tables (tp 2, 4, 8)")
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_child:
        _peak_child(a.peak_child, a.tokens, a.teacher)
        return
    if a.hybrid_bytes:
        summary_error_table()
        print_hybrid_bytes(hybrid_bytes_table(tps=(2, 4, 8)))
        return
    print_bytes(bytes_table())
    if a.skip_time:
        return
    import torch

    W = projection(a.teacher)
    times = time_losses(a.tokens, a.repeats, a.teacher)
    mem = peak_memory(a.tokens, a.teacher)
    print_table_head(
        f"forward+backward, tp = 1, CPU ({torch.get_num_threads()} threads), fp32, {a.tokens} tokens, "
        f"V_S = {W.shape[0]}, V_T = {W.shape[1]} (llama3 -> {a.teacher}); KL: same-tokenizer teacher [N, V_S]",
        f"{'loss':<6}{'time (s)':>10}{'x KL':>7}{'peak extra (MiB)':>18}{'x KL':>7}",
    )
    for name in LOSS_NAMES:
        print(f"{name:<6}{times[name]:>10.3f}{times[name] / times['kl']:>7.2f}{mem[name] / 2**20:>18.1f}{mem[name] / max(mem['kl'], 1):>7.2f}")


if __name__ == "__main__":
    main()
