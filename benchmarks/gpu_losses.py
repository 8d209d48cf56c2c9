"""GPU loss benchmark: fwd+bwd time and peak memory of same-tokenizer KL vs P-KL, H-KL, GOLD (bf16).

    python benchmarks/gpu_losses.py                       # CUDA, 4,096 tokens, V_S 128,256, V_T 151,936 / 200,064
    python benchmarks/gpu_losses.py --w-dir DIR           # real W files (W_llama3_<teacher>.safetensors, from benchmarks/losses.py)
    python benchmarks/gpu_losses.py --device cpu --small  # the CPU smoke mode the tests run

Needs torch, numpy, safetensors (only with --w-dir) and this repository on the path (nemo_xtoken
imports nothing else for the losses); no network.  Without ``--w-dir`` W is synthetic with the
real W's shape statistics (1–3 teacher tokens per student row, 4 % empty rows, a hub column),
seeded: timings depend on W's non-zeros, not on which tokens they link.

Rows, each after a warm-up, ``--repeats`` timed runs (median), inputs ``[N, V]`` in bf16:
* ``kl_plain``: log-softmax of both sides in fp32 and ``kl_div(log_target=True)`` summed over
  the vocabulary — ModelOpt's ``LogitsKLLoss`` operations, the cost a user pays today;
* ``kl_modelopt``: the class itself, when ``modelopt`` imports;
* ``p_kl``, ``h_kl``, ``gold`` (nemo_xtoken's references, token-blocked with ``--block-size``)
  and ``kl`` (nemo_xtoken's same-tokenizer KL, same blocking);
* ``run_kl``, ``run_p_kl``, ``run_h_kl``, ``run_gold``: **the criterion a run uses**
  (:class:`~nemo_xtoken.integration.distill.XTokenLogitsLoss` over :mod:`nemo_xtoken.parallel`, one
  TP rank, ``--block-size`` positions per block), built once before timing as the run builds it,
  so W's exchange plan / index sets live on the device after the first call (the warm-up) and are
  never rebuilt per call; one-token chunks (student position k ↔ teacher position k), the chain merge.
  The goal (P-KL ≤ 1.25x KL's time) is read on these rows: ``run_p_kl`` against ``run_kl``.
Peak memory is ``torch.cuda.max_memory_allocated`` above the live inputs (CUDA only).  The parity
check runs a small case on the device and on the CPU in fp64 (values and gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(tokens=4096, v_s=128256, v_t=(151936, 200064))
SMALL = dict(tokens=64, v_s=1000, v_t=(1200, 1500))


def synthetic_w(v_s: int, v_t: int, seed: int = 0):
    """A seeded sparse W ``[v_s, v_t]`` (torch CSR, rows summing to 1) with the real W's shape statistics."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n_links = rng.choice([0, 1, 1, 1, 1, 1, 1, 2, 3], size=v_s)  # mostly exact rows, some multi-token, a few empty
    n_links[rng.random(v_s) < 0.04] = 0
    rows = np.repeat(np.arange(v_s), n_links)
    cols = rng.integers(0, v_t, size=rows.size)
    multi = np.repeat(n_links > 1, n_links)
    cols[multi & (rng.random(rows.size) < 0.3)] = 17 % v_t  # a hub column (digits, spaces)
    vals = rng.random(rows.size) + 0.1
    sums = np.bincount(rows, weights=vals, minlength=v_s)
    vals = vals / sums[rows]
    w = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals).float(), (v_s, v_t))
    return w.coalesce().to_sparse_csr()


def load_w(w_dir: Path, teacher: str):
    """W from ``benchmarks/losses.py``'s cache (``W_llama3_<teacher>.safetensors``) as a nemo_xtoken Projection."""
    from nemo_xtoken.vocab import load_projection

    return load_projection(w_dir / f"W_llama3_{teacher}.safetensors")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kl_plain(s, t):
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), reduction="none", log_target=True).sum()


def _kl_modelopt():
    try:
        from types import SimpleNamespace

        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss
    except Exception:  # not installed: the row is skipped
        return None
    fn = LogitsKLLoss(SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False))

    def run(s, t):
        out = fn(s[:, None, :], t[:, None, :])
        return (out[0] if isinstance(out, tuple) else out).sum()

    return run


def loss_fns(w, block_size: int | None) -> dict:
    """name → ``fn(student, teacher)`` (teacher on the right vocabulary)."""
    import nemo_xtoken.losses as L
    from nemo_xtoken.losses import resolve_projection

    rw = resolve_projection(w)
    from nemo_xtoken.losses.reference import exact_common_set, top1_common_set

    top1_common_set(rw), exact_common_set(rw)  # built once, as in training
    kw = dict(reduction="sum", block_size=block_size)
    fns = {
        "kl_plain": (_kl_plain, "same"),
        "kl": (lambda s, t: L.kl(s, t, **kw), "same"),
        "p_kl": (lambda s, t: L.p_kl(s, t, rw, **kw), "teacher"),
        "h_kl": (lambda s, t: L.h_kl(s, t, rw, **kw), "teacher"),
        "gold": (lambda s, t: L.gold(s, t, rw, **kw), "teacher"),
    }
    mo = _kl_modelopt()
    if mo is not None:
        fns["kl_modelopt"] = (mo, "same")
    return fns


def run_criterion_fns(w, v_s: int, v_t: int, tokens: int, block_size: int | None, device) -> dict:
    """name → ``fn(student, teacher)``: the run's criterion (``XTokenLogitsLoss``, tp 1) per loss, built once here.

    Student logits ``[N, V_S]`` enter as Megatron's ``[S, B=1, V]`` output, the teacher's as ``[B=1, T, V]``;
    the alignment pairs position k with position k (one-token chunks) and lives on ``device``.
    """
    import torch

    from nemo_xtoken.align.merge import AlignedPositions
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss

    ids = torch.arange(tokens, device=device)
    g = torch.Generator().manual_seed(3)
    align = {
        side: AlignedPositions(ids, ids, torch.randint(0, v_s, (tokens,), generator=g).to(device),
                               torch.randint(0, v, (tokens,), generator=g).to(device), tokens)
        for side, v in (("same", v_s), ("teacher", v_t))
    }
    fns = {}
    for loss in ("kl", "p_kl", "h_kl", "gold"):
        side = "same" if loss == "kl" else "teacher"
        width = v_s if loss == "kl" else v_t
        crit = XTokenLogitsLoss(
            [TeacherSpec(name="t", loss=loss, projection=None if loss == "kl" else w, weight=1.0, teacher_vocab_size=width)],
            student_vocab_size=v_s, student_padded=v_s, teacher_padded=[width], tp=1, block_size=block_size,
            tp_exchange="exact",
        )

        def run(s, t, crit=crit, a=align[side]):
            return crit(s[:, None, :], [t[None]], alignments=[a])

        fns[f"run_{loss}"] = (run, side)
    return fns


def time_row(fn, s0, t, device, repeats: int) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of ``fn(s, t).backward()``."""
    import torch

    times, peak = [], None
    for k in range(repeats + 1):  # the first run warms up
        s = s0.detach().clone().requires_grad_(True)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        a = time.perf_counter()
        out = fn(s, t)
        out.backward()
        _sync(device)
        dt = time.perf_counter() - a
        if not torch.isfinite(out.detach()).all():
            raise RuntimeError(f"non-finite loss {float(out)}")
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        if k:
            times.append(dt)
        del s, out
    return {"time": statistics.median(times), "peak": peak}


def parity(device, block_size: int | None) -> list[dict]:
    """A small case on ``device`` (bf16 inputs) against the CPU in fp64: values and student gradients.

    The references (``p_kl`` …) and the run's criterion (``run_p_kl`` …) both against the fp64 reference.
    """
    import torch

    import nemo_xtoken.losses as L

    g = torch.Generator().manual_seed(1)
    w = synthetic_w(300, 400, seed=1)
    s64 = torch.randn(48, 300, generator=g, dtype=torch.float64) * 3
    t64 = torch.randn(48, 400, generator=g, dtype=torch.float64) * 3
    rows = []
    crit = run_criterion_fns(w, 300, 400, 48, block_size, device)
    for name in ("p_kl", "h_kl", "gold", "run_p_kl", "run_h_kl", "run_gold"):
        fn = L.LOSSES[name.removeprefix("run_")]
        sc = s64.clone().requires_grad_(True)
        ref = fn(sc, t64, w)
        (gref,) = torch.autograd.grad(ref, sc)
        sd = s64.to(device, torch.bfloat16).requires_grad_(True)
        if name.startswith("run_"):  # the run's criterion on the device against the reference
            got = crit[name][0](sd, t64.to(device, torch.bfloat16))
        else:
            got = fn(sd, t64.to(device, torch.bfloat16), w, block_size=block_size)
        (gd,) = torch.autograd.grad(got, sd)
        # the reference on the bf16-rounded inputs: what the device computes, in fp64
        sr = s64.to(torch.bfloat16).double().requires_grad_(True)
        ref_r = fn(sr, t64.to(torch.bfloat16).double(), w)
        (gref_r,) = torch.autograd.grad(ref_r, sr)
        rows.append({
            "loss": name, "device": float(got), "cpu_fp64": float(ref_r),
            "value_rel_err": abs(float(got) - float(ref_r)) / max(abs(float(ref_r)), 1e-12),
            "grad_max_abs_err": float((gd.double().cpu() - gref_r).abs().max()),
            "grad_scale": float(gref_r.abs().max()),
            "bf16_input_effect": abs(float(ref_r) - float(ref)) / max(abs(float(ref)), 1e-12),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU smoke test)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=1024, help="positions per block for the nemo_xtoken rows (0: unblocked)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--w-dir", type=Path, default=None, help="folder with W_llama3_qwen3/o200k.safetensors (real W)")
    ap.add_argument("--losses", nargs="+", default=None,
                    help="subset of kl_plain kl_modelopt kl p_kl h_kl gold run_kl run_p_kl run_h_kl run_gold")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --small for the smoke test", file=sys.stderr)
        return 2
    size = dict(SMALL if a.small else FULL)
    if a.tokens:
        size["tokens"] = a.tokens
    block = a.block_size or None
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, {size['tokens']} tokens, bf16 inputs, block {block}", flush=True)
    results = {"device": dev_name, "torch": torch.__version__, "tokens": size["tokens"], "block_size": block, "rows": [], "parity": []}
    for v_t, teacher in zip(size["v_t"], ("qwen3", "o200k")):
        w = load_w(a.w_dir, teacher) if a.w_dir else synthetic_w(size["v_s"], v_t)
        v_s, v_t = (w.shape if hasattr(w, "shape") else (size["v_s"], v_t))
        g = torch.Generator(device="cpu").manual_seed(0)
        s = (torch.randn(size["tokens"], v_s, generator=g) * 3).to(device, torch.bfloat16)
        t_same = (torch.randn(size["tokens"], v_s, generator=g) * 3).to(device, torch.bfloat16)
        t = (torch.randn(size["tokens"], v_t, generator=g) * 3).to(device, torch.bfloat16)
        fns = {**loss_fns(w, block), **run_criterion_fns(w, int(v_s), int(v_t), size["tokens"], block, device)}
        for name, (fn, side) in fns.items():
            if a.losses and name not in a.losses:
                continue
            if side == "same" and teacher != "qwen3":
                continue  # the baseline does not depend on the teacher
            r = time_row(fn, s, t_same if side == "same" else t, device, a.repeats)
            row = {"loss": name, "teacher": teacher if side == "teacher" else "same", "V_S": int(v_s), "V_T": int(v_t) if side == "teacher" else int(v_s), **r}
            results["rows"].append(row)
            mem = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:,.0f} MiB"
            print(f"  {name:<12} {row['teacher']:<6} {r['time'] * 1e3:9.1f} ms  {mem}", flush=True)
        del s, t, t_same
    base = next(r for r in results["rows"] if r["loss"] == "kl_plain")
    print(f"\nfwd+bwd, {size['tokens']} tokens, bf16, {dev_name}; ratios against kl_plain (ModelOpt's operations)")
    hdr = f"{'loss':<12}{'teacher':<8}{'V_T':>9}{'time ms':>10}{'x KL':>7}{'peak MiB':>11}{'x KL':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["rows"]:
        pk = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:,.0f}"
        pr = "n/a" if r["peak"] is None or not base["peak"] else f"{r['peak'] / base['peak']:.2f}"
        print(f"{r['loss']:<12}{r['teacher']:<8}{r['V_T']:>9,}{r['time'] * 1e3:>10.1f}{r['time'] / base['time']:>7.2f}{pk:>11}{pr:>7}")
    run_kl = next((r for r in results["rows"] if r["loss"] == "run_kl"), None)
    if run_kl is not None:
        print(f"\nthe run's criterion (XTokenLogitsLoss, tp 1, W's plan on the device): time against run_kl (goal: run_p_kl ≤ 1.25x)")
        for r in results["rows"]:
            if r["loss"].startswith("run_") and r["loss"] != "run_kl":
                r["x_run_kl"] = r["time"] / run_kl["time"]
                print(f"  {r['loss']:<10}{r['teacher']:<8}{r['x_run_kl']:>6.2f}x")
    results["parity"] = parity(device, block)
    print("\nparity: small case on the device (bf16) against the CPU in fp64 on the same bf16-rounded inputs")
    for p in results["parity"]:
        print(f"  {p['loss']:<6} value rel err {p['value_rel_err']:.2e}  grad max abs err {p['grad_max_abs_err']:.2e} (scale {p['grad_scale']:.2e})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    bad = [p for p in results["parity"] if p["value_rel_err"] > 2e-2 or p["grad_max_abs_err"] > 5e-2 * max(p["grad_scale"], 1e-6)]
    if bad:
        print(f"PARITY FAILED for {[p['loss'] for p in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
