"""Peak memory and time of the losses, token-blocked, against same-tokenizer KL as ModelOpt computes it.

    XTOKEN_CACHE=... python benchmarks/loss_memory.py --tokens 1024 [--teacher qwen3|o200k]
        [--block-size 512] [--path parallel|reference] [--losses p_kl h_kl ...] [--unblocked]

Each row is one forward+backward in a fresh process (fp32, CPU, tp = 1, the real Llama-3 student
vocabulary and the real W to Qwen3 or o200k): the peak RSS above the live inputs (sampled every
0.2 ms; large blocks through mmap so that freed tensors leave the RSS at once), and the time.
The baseline, in the same run, is ``kl_modelopt``: same-tokenizer KD of ``[N, V_S]`` logits as
ModelOpt's ``LogitsKLLoss`` computes it (its own class when modelopt imports, else the same
operations: ``float()/T``, ``log_softmax`` of both sides, ``kl_div(..., log_target=True)``
summed over the vocabulary) — the cost a user pays today.  Every row includes the gradient of
the student logits (``[N, V_S]`` fp32), as the baseline's does.

Before a run the script checks the free memory (``/proc/meminfo``) against a conservative
estimate and refuses a row that would not fit, saying so (a shared machine: nothing is killed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nemo_xtoken.testing.bench import last_json, print_table_head, run_fresh  # noqa: E402

LOSSES = ("kl_modelopt", "kl", "p_kl", "h_kl", "gold", "uld", "partition_kl")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0))


def _modelopt_kl(s, t, temperature: float = 1.0):
    """ModelOpt's ``LogitsKLLoss`` at tp = 1 (the class itself when importable), summed over tokens."""
    try:
        from types import SimpleNamespace

        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        cfg = SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)
        loss_fn = LogitsKLLoss(cfg, temperature=temperature)
        out = loss_fn(s[:, None, :], t[:, None, :])  # [s, b, V] → per token [b, s]
        loss = out[0] if isinstance(out, tuple) else out
        return loss.sum(), "modelopt.LogitsKLLoss"
    except ImportError:
        import torch.nn.functional as F

        p = F.log_softmax(s.float() / temperature, dim=-1)
        q = F.log_softmax(t.float() / temperature, dim=-1)
        return F.kl_div(p, q, reduction="none", log_target=True).sum(-1).sum(), "transcription"


def _inputs(tokens: int, teacher: str, loss: str):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from losses import projection  # the cached real W (benchmarks/losses.py)

    W = projection(teacher)
    vs, vt = W.shape
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(tokens, vs, generator=g)).requires_grad_(True)
    t = 3 * torch.randn(tokens, vs if loss in ("kl", "kl_modelopt") else vt, generator=g)
    return W, s, t


def _run(loss: str, W, s, t, path: str, block_size: int | None):
    import nemo_xtoken.losses as R
    import nemo_xtoken.parallel as P

    vs, vt = W.shape
    if loss == "kl_modelopt":
        out, impl = _modelopt_kl(s, t)
        out.backward()
        return impl
    kw = dict(block_size=block_size, reduction="sum")
    if path == "parallel":
        if loss == "kl":
            out = P.vocab_parallel_kl(s, t, **kw)
        elif loss == "uld":
            out = P.vocab_parallel_uld(s, t, **kw)
        elif loss == "p_kl":
            out = P.vocab_parallel_p_kl(s, t, _run.plan, **kw)
        elif loss == "partition_kl":  # no alignment: every position a 1:1 chunk (level 1, the V-wide part)
            out = P.vocab_parallel_partition_kl(s, t, _run.plan, **kw)
        else:
            out = P.PARALLEL_LOSSES[loss](s, t, _run.w, **kw)
    else:
        if loss in ("kl", "uld"):
            out = R.LOSSES[loss](s, t, **kw)
        elif loss == "partition_kl":
            out = R.partition_kl(s, t, _run.plan, **kw)
        else:
            out = R.LOSSES[loss](s, t, _run.w, **kw)
    out.backward()
    return path


def _child(loss: str, tokens: int, teacher: str, path: str, block_size: int | None) -> None:
    import torch

    from nemo_xtoken.losses import resolve_projection
    from nemo_xtoken.parallel import PKLPlan

    W, s, t = _inputs(tokens, teacher, loss)
    _run.w = resolve_projection(W)
    _run.plan = PKLPlan.build(W, 1) if loss == "p_kl" and path == "parallel" else None
    if loss == "partition_kl":  # the spellings (cached by the tokenizers' fingerprints), a plan built once
        from nemo_xtoken.assets import tokenizer_path
        from nemo_xtoken.parallel import PartitionTPPlan
        from nemo_xtoken.vocab.spellings import cached_spellings

        sp = cached_spellings(tokenizer_path("llama3"), tokenizer_path(teacher))
        sp.level1()
        _run.plan = PartitionTPPlan.build(sp, 1) if path == "parallel" else sp
    if loss in ("gold", "h_kl"):  # the common sets are cached on the resolved W, as in training (built once)
        from nemo_xtoken.losses.reference import exact_common_set, top1_common_set

        (top1_common_set if loss == "h_kl" else exact_common_set)(_run.w)
    from nemo_xtoken.testing.bench import peak_rss

    r = peak_rss(lambda: _run(loss, W, s, t, path, block_size))
    print(json.dumps({"loss": loss, "extra": r.extra, "time": r.seconds, "impl": r.result, "threads": torch.get_num_threads()}))


def _estimate(loss: str, tokens: int, vs: int, vt: int, block_size: int | None) -> int:
    """A conservative bytes estimate (inputs + peak extra) to refuse a row that cannot fit."""
    n_vs, n_vt = tokens * vs * 4, tokens * vt * 4
    if loss == "kl_modelopt":
        return 2 * n_vs + 7 * n_vs
    inputs = n_vs + (n_vs if loss == "kl" else n_vt)
    rows = tokens if block_size is None else min(tokens, block_size)
    per_block = rows * (vs + vt) * 4 * 8
    return inputs + n_vs + per_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--teacher", default="qwen3", choices=("qwen3", "o200k"))
    ap.add_argument("--block-size", type=int, default=512, help="positions per block (0: unblocked)")
    ap.add_argument("--path", default="parallel", choices=("parallel", "reference"))
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--unblocked", action="store_true", help="also the unblocked rows (the state before issue 14)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        loss, tokens, teacher, path, bs = a.child
        _child(loss, int(tokens), teacher, path, None if bs == "0" else int(bs))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from losses import projection

    W = projection(a.teacher)
    vs, vt = W.shape
    bs = a.block_size or None
    cases = [(loss, bs) for loss in a.losses]
    if a.unblocked:
        cases += [(loss, None) for loss in a.losses if loss != "kl_modelopt" and bs is not None]
    rows = []
    for loss, block in cases:
        need, have = _estimate(loss, a.tokens, vs, vt, block), _available_bytes()
        label = f"{loss}" + ("" if loss == "kl_modelopt" else f" ({'blocked ' + str(block) if block else 'unblocked'})")
        if need > have:
            print(f"{label}: NOT RUN — needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available now", flush=True)
            rows.append({"label": label, "loss": loss, "block": block, "skipped": True, "need": need, "available": have})
            continue
        r = run_fresh(__file__, ["--child", loss, str(a.tokens), a.teacher, a.path, str(block or 0)], ROOT)
        if r.returncode != 0:
            print(f"{label}: FAILED (exit {r.returncode})\n{r.stderr[-2000:]}", flush=True)
            rows.append({"label": label, "loss": loss, "block": block, "failed": r.returncode})
            continue
        res = last_json(r)
        rows.append({"label": label, "loss": loss, "block": block, **res})
        print(f"{label}: {res['extra'] / 2**20:,.0f} MiB, {res['time']:.2f} s", flush=True)
    base = next((r for r in rows if r["loss"] == "kl_modelopt" and "extra" in r), None)
    print_table_head(
        f"peak extra memory and time, forward+backward, fp32, CPU, tp = 1 ({a.path} path), {a.tokens} tokens, "
        f"V_S = {vs:,}, V_T = {vt:,} (llama3 -> {a.teacher}); baseline: kl_modelopt ({base['impl'] if base else 'not run'}) on [N, V_S]",
        f"{'loss':<28}{'peak extra MiB':>16}{'x KL(ModelOpt)':>16}{'time s':>9}{'x KL':>7}",
    )
    for r in rows:
        if "extra" not in r:
            print(f"{r['label']:<28}{'not run' if r.get('skipped') else 'failed':>16}")
            continue
        xm = r["extra"] / base["extra"] if base else float("nan")
        xt = r["time"] / base["time"] if base else float("nan")
        print(f"{r['label']:<28}{r['extra'] / 2**20:>16,.0f}{xm:>16.2f}{r['time']:>9.2f}{xt:>7.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"tokens": a.tokens, "teacher": a.teacher, "path": a.path, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
