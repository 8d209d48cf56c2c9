"""The run's criterion with ``distill.tp_exchange: summary`` against ``exact``: error, stated bound, traffic.

    XTOKEN_CACHE=.cache python benchmarks/tp_exchange.py [--items 32] [--bins 2048] [--no-smollm2] [--json FILE]

Part 1 (error).  ``XTokenLogitsLoss`` (what ``criterion_from_config`` builds for a run) computes
H-KL, GOLD and ULD in ``exact`` mode (the all-gather path: the sorted L1 exact) and in ``summary``
mode (a ``HybridPlan`` / ``summary_bins``: the sorted L1 from shard summaries), forward + backward,
fp32, on one process — the summary is additive over column shards, so its value and gradient are
the same at any tp (``tests/test_parallel_summary.py`` checks tp 1/2/4).  Real W (Llama-3 student →
Qwen3, → o200k / Phi-4-mini, → SmolLM2), vocabularies padded to the checkpoints' widths.  Per row:
the relative error of the KD value, its computed bound (logged by the run as ``kd_bound/<teacher>``;
``value ≤ exact ≤ value + bound`` is checked), and the relative L2 error of the gradient on the
student logits.  Baseline in the same run: the exact loss on the same logits rounded to bf16 (the
precision of a bf16 run's logits), its value and gradient error against fp32.

Distributions (``--items`` positions each):

* ``gauss``: independent softmaxes of N(0, 3²) logits (the error table of docs/tensor-parallel.md);
* ``lm``: the teacher's logits are real next-token logits of SmolLM2-135M-Instruct (GGUF) on State of
  the Union text, one row per position, placed at random teacher ids (the ids beyond SmolLM2's
  49,152 get values drawn from the row's lower half); the student follows the teacher through W
  (an exact-match row: the teacher's logit + N(0, 1); a multi-token row: 2 lower; an empty row: a
  lower-half value) — a student on its way to the teacher;
* ``lm-top32``: the same with the teacher cached as its top-32 (``SparseTeacher``; the rest mass spread
  uniformly, as ``xtoken cache-teacher`` runs do);
* pair ``smollm2``: SmolLM2 is the teacher on its own tokens (its real distributions, W Llama-3 →
  SmolLM2's tokenizer), the student as in ``lm``.

Part 2 (traffic).  The run's criterion at tp = 2, 4, 8 (no teacher permutation: the run does not
permute the teacher's output layer) reports the bytes each rank sends per token (``traffic()``, what
``xtoken distill --check`` prints): exact all-gather vs summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from losses import CHECKPOINT_VOCAB, STUDENT_CHECKPOINT_VOCAB, projection  # noqa: E402

LOSSES = ("h_kl", "gold", "uld")


def _criterion(loss: str, W, vs: int, vt: int, vt_padded: int, mode: str, bins: int, tp: int = 1):
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss

    spec = TeacherSpec("t", loss, W if loss != "uld" else None, 1.0, vt)
    return XTokenLogitsLoss([spec], student_vocab_size=vs, student_padded=STUDENT_CHECKPOINT_VOCAB, teacher_padded=[vt_padded],
                            tp=tp, student_layout="bsv", tp_exchange=mode, summary_bins=bins, block_size=None)


def _run(crit, s: torch.Tensor, t) -> tuple[float, torch.Tensor, float | None]:
    x = s.clone().requires_grad_(True)
    loss = crit(x.unsqueeze(0), [t.unsqueeze(0) if isinstance(t, torch.Tensor) else t], alignments=[None])
    loss.backward()
    b = crit.last_metrics.get("kd_bound/t")
    return float(loss), x.grad.detach(), (float(b) if b is not None else None)


def _lower_half(row: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    lo = row[row < row.median()]
    return lo[torch.randint(0, lo.numel(), (n,), generator=g)]


def teacher_from_rows(rows: torch.Tensor, vt: int, width: int, g: torch.Generator) -> torch.Tensor:
    """[N, width] teacher logits: each real LM row at random ids of ``vt``, the other ids from its lower half."""
    out = torch.full((rows.shape[0], width), -30.0)
    for i, row in enumerate(rows):
        ids = torch.randperm(vt, generator=g)
        m = min(row.numel(), vt)
        out[i, ids[:m]] = row[:m]
        if vt > m:
            out[i, ids[m:]] = _lower_half(row, vt - m, g)
    return out


def student_near(teacher: torch.Tensor, W, vt: int, g: torch.Generator) -> torch.Tensor:
    """[N, V_S'] student logits that follow the teacher through W's top-1 map (see the module doc)."""
    from nemo_xtoken.vocab.projection import ROW_EMPTY, ROW_EXACT

    vs = W.shape[0]
    top1 = np.full(vs, -1, dtype=np.int64)
    for s in range(vs):
        a, b = W.indptr[s], W.indptr[s + 1]
        if b > a:
            top1[s] = W.indices[a + int(np.argmax(W.data[a:b]))]
    kind = np.asarray(W.row_kind)
    t1 = torch.from_numpy(np.where(top1 >= 0, top1, 0))
    out = torch.full((teacher.shape[0], STUDENT_CHECKPOINT_VOCAB), -30.0)
    exact = torch.from_numpy(kind == ROW_EXACT)
    empty = torch.from_numpy((kind == ROW_EMPTY) | (top1 < 0))
    for i, row in enumerate(teacher):
        z = row[t1] + torch.randn(vs, generator=g)
        z = torch.where(exact, z, z - 2.0)
        z = torch.where(empty, _lower_half(row[:vt], vs, g), z)
        out[i, :vs] = z
    return out


def smollm2_rows(items: int) -> tuple[torch.Tensor, object]:
    """Real next-token logits of SmolLM2-135M-Instruct on State of the Union text ([items, 49152]) and the teacher."""
    from nemo_xtoken.assets import smollm2_gguf, text_corpus
    from nemo_xtoken.offline.hf import load_hf_teacher

    gguf = smollm2_gguf()
    t0 = time.perf_counter()
    teacher = load_hf_teacher(str(gguf.parent), gguf_file=gguf.name)
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    text = json.loads(open(text_corpus("sotu")).readline())["text"]
    ids = teacher.tokenizer(text, return_tensors="pt").input_ids[:, : items + 1]
    with torch.no_grad():
        logits = teacher.model(ids).logits[0, 1 : items + 1].float()  # skip the first position (no context)
    return logits[:, : teacher.vocab_size], teacher


def error_rows(items: int, bins: int, use_smollm2: bool) -> list[dict]:
    from nemo_xtoken.losses.sparse import SparseTeacher, sparse_from_logits

    g = torch.Generator().manual_seed(0)
    lm_rows, smol = smollm2_rows(items) if use_smollm2 else (None, None)
    pairs = ["qwen3", "o200k"] + (["smollm2"] if use_smollm2 else [])
    rows = []
    for pair in pairs:
        if pair == "smollm2":
            from nemo_xtoken.assets import tokenizer_path
            from nemo_xtoken.vocab import build_projection, load_tokenizer

            W = build_projection(load_tokenizer(str(tokenizer_path("llama3"))), smol.tokenizer_info)
            vt, vt_pad = smol.vocab_size, smol.logits_width
            families = {"lm (real teacher)": torch.nn.functional.pad(lm_rows, (0, vt_pad - lm_rows.shape[1]), value=-30.0)}
        else:
            W = projection(pair)
            vt, vt_pad = W.shape[1], CHECKPOINT_VOCAB[pair]
            families = {"gauss": None}
            if lm_rows is not None:
                families["lm"] = teacher_from_rows(lm_rows, vt, vt_pad, g)
        vs = W.shape[0]
        for fam, t_logits in list(families.items()):
            if t_logits is None:
                s = torch.randn(items, STUDENT_CHECKPOINT_VOCAB, generator=g) * 3.0
                t_logits = torch.randn(items, vt_pad, generator=g) * 3.0
                cases = [(fam, s, t_logits)]
            else:
                s = student_near(t_logits, W, vt, g)
                cases = [(fam, s, t_logits)]
                if not fam.startswith("lm (real"):
                    sp = sparse_from_logits(t_logits, 32, vocab_size=vt)  # the criterion takes [B, T, k] rows
                    cases.append(("lm-top32", s, SparseTeacher(sp.ids[None], sp.log_probs[None], sp.rest_log_mass[None], sp.vocab_size)))
            for name, s_, t_ in cases:
                for loss in LOSSES:
                    t0 = time.perf_counter()
                    ex = _criterion(loss, W, vs, vt, vt_pad, "exact", bins)
                    su = _criterion(loss, W, vs, vt, vt_pad, "summary", bins)
                    le, ge, _ = _run(ex, s_, t_)
                    ls, gs, bound = _run(su, s_, t_)
                    sparse = not isinstance(t_, torch.Tensor)
                    t16 = t_ if sparse else t_.bfloat16().float()
                    lb, gb, _ = _run(ex, s_.bfloat16().float(), t16)
                    nrm = float(ge.norm())
                    r = dict(
                        pair=f"llama3->{pair}", family=name, loss=loss, exact=le, summary=ls, bound=bound,
                        rel_err=(le - ls) / le, bound_rel=bound / le, within=ls - 1e-6 * abs(le) <= le <= ls + bound + 1e-6 * abs(le),
                        grad_rel_err=float((gs - ge).norm()) / nrm, bf16_rel_err=abs(lb - le) / le, bf16_grad_rel_err=float((gb - ge).norm()) / nrm,
                        seconds=time.perf_counter() - t0,
                    )
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    return rows


def print_errors(rows: list[dict], items: int, bins: int) -> None:
    print(f"\nthe run's criterion, summary ({bins} bins) vs exact: {items} positions, fp32, forward + backward; baseline: bf16 logits (exact)")
    print("| pair | distribution | loss | exact KD | rel. error | bound / exact | value ≤ exact ≤ value + bound | grad rel. error | bf16: rel. error | bf16: grad rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['family']} | {r['loss']} | {r['exact']:.4f} | {r['rel_err']:.1e} | {r['bound_rel']:.1e} | "
              f"{'yes' if r['within'] else 'NO'} | {r['grad_rel_err']:.1e} | {r['bf16_rel_err']:.1e} | {r['bf16_grad_rel_err']:.1e} |")


def traffic_rows(bins: int) -> list[dict]:
    rows = []
    for pair in ("qwen3", "o200k"):
        W = projection(pair)
        for tp in (2, 4, 8):
            for loss in LOSSES:
                for mode in ("exact", "summary"):
                    crit = _criterion(loss, W, W.shape[0], W.shape[1], CHECKPOINT_VOCAB[pair], mode, bins, tp=tp)
                    (t,) = crit.traffic()
                    rows.append(dict(pair=f"llama3->{pair}", tp=tp, loss=loss, mode=mode, **{k: t[k] for k in ("exchange", "bytes_per_token_per_rank", "all_gather_bytes")}))
    return rows


def print_traffic(rows: list[dict]) -> None:
    print("\nthe run's criterion: bytes sent per token per rank, forward (fp32, scalars included, no teacher permutation)")
    print("| pair | tp | loss | exact mode (all-gather + scalars) | summary mean / busiest rank | summary / exact |")
    print("|---|---|---|---|---|---|")
    key = {(r["pair"], r["tp"], r["loss"], r["mode"]): r for r in rows}
    for r in rows:
        if r["mode"] != "summary":
            continue
        ex = key[(r["pair"], r["tp"], r["loss"], "exact")]["bytes_per_token_per_rank"]["mean"]
        b = r["bytes_per_token_per_rank"]
        print(f"| {r['pair']} | {r['tp']} | {r['loss']} | {ex:,.0f} | {b['mean']:,.0f} / {b['max']:,.0f} | {100 * b['mean'] / ex:.2f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--bins", type=int, default=2048)
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-based distributions (gauss only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    err = error_rows(a.items, a.bins, not a.no_smollm2)
    traffic = traffic_rows(a.bins)
    print_errors(err, a.items, a.bins)
    print_traffic(traffic)
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(a), "errors": err, "traffic": traffic}, indent=2))
    if not all(r["within"] for r in err):
        print("\nvalue ≤ exact ≤ value + bound FAILED on some row", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
