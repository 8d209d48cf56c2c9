"""The demo's outputs: the table (mean ± spread over seeds), the paper's direction beside it, curves, ``results.json``."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS", "CLAIMS", "claim_name", "aggregate", "direction", "mechanisms", "format_table", "format_direction", "format_mechanisms",
    "write_outputs", "plot", "check_results", "merge_results",
]

#: (key in a student's result, column header, percent?)
METRICS: list[tuple[str, str, bool]] = [
    ("exact", "exact answer", True),
    ("exact_copy", "copy", True),
    ("exact_add", "add", True),
    ("exact_mul", "mul", True),
    ("eval_acc_numeral", "next-token acc, numerals", True),
    ("eval_acc_word", "next-token acc, words", True),
    ("eval_ce", "CE (held-out)", False),
    ("kd", "KD (held-out)", False),
]

#: Every claim of the paper (arXiv 2605.21699, Llama-3.2-1B students, 30k steps of continued
#: pre-training; average over downstream tasks, GSM8k in brackets) that the demo can test, as
#: (better method keys, worse method keys, the paper's figures).  Several worse keys: the best of
#: them (by the mean over seeds), e.g. the best fixed KD weight.  None is left out because it fails.
CLAIMS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("pkl_qwen3",), ("ce",), "P-KL ← Qwen3-4B 38.85 vs no teacher 36.63 (GSM8k 15.54 vs 10.25)"),
    (("ce",), ("gold_qwen3",), "no teacher 36.63 vs GOLD ← Qwen3-4B 35.03 (GSM8k 10.25 vs 2.56)"),
    (("pkl_qwen3",), ("gold_qwen3",), "P-KL 38.85 vs GOLD 35.03 with Qwen3-4B"),
    (("uld_qwen3",), ("gold_qwen3",), "ULD 36.77 vs GOLD 35.03 with Qwen3-4B"),
    (("pkl_qwen3",), ("uld_qwen3",), "P-KL 38.85 vs ULD 36.77 with Qwen3-4B"),
    (("pkl_qwen3",), ("kd_llama3",), "P-KL ← Qwen3-4B 38.85 vs same-tokenizer KD 38.40"),
    (("kd_llama3",), ("ce",), "same-tokenizer KD 38.40 vs no teacher 36.63"),
    (("pkl_learned_w_qwen3",), ("pkl_qwen3",), "the paper's best P-KL run (38.85) trains W jointly"),
    (("hkl_o200k",), ("gold_o200k",), "H-KL ← Phi-4-mini 39.18 vs GOLD ← Phi-4-mini 38.66"),
    (("hkl_o200k",), ("kd_llama3",), "H-KL ← Phi-4-mini 39.18 vs same-tokenizer KD 38.40"),
    (("hkl_o200k",), ("ce",), "H-KL ← Phi-4-mini 39.18 vs no teacher 36.63"),
    (("two_teachers",), ("hkl_o200k",), "Phi-4-mini 0.8 + Llama-3.2-3B 0.2 40.48 vs H-KL ← Phi-4-mini alone 39.18"),
    (("pkl_qwen3",), ("pkl_qwen3_w0.5", "pkl_qwen3_w1", "pkl_qwen3_w2"), "Table 4: dynamic scaling beats fixed KD weights"),
]


def _method_labels() -> dict[str, str]:
    from nemo_xtoken.demo.run import EXTRA_METHODS, METHODS

    return {m.key: m.label for m in METHODS + EXTRA_METHODS}


def claim_name(better: tuple[str, ...], worse: tuple[str, ...], labels: dict[str, str] | None = None) -> str:
    """``"P-KL ← Qwen3 > CE only"``; several worse methods: ``"… > best of {…}"``."""
    labels = labels or _method_labels()
    b = " / ".join(labels.get(k, k) for k in better)
    if len(worse) == 1:
        return f"{b} > {labels.get(worse[0], worse[0])}"
    return f"{b} (dynamic scaling) > the best of " + ", ".join(labels.get(k, k) for k in worse)


def _value(r: dict[str, Any], key: str) -> float | None:
    if key == "kd":
        kd = r.get("eval_kd")
        return kd["kd"] if kd else None
    v = r.get(key)
    return None if v is None else float(v)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "values": xs,
    }


def aggregate(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method and metric: mean, sample standard deviation, min, max and the per-seed values."""
    out: dict[str, dict[str, Any]] = {}
    seeds = list(results["students"])
    for m in results["methods"]:
        row: dict[str, Any] = {}
        for key, _, _ in METRICS:
            xs = [_value(results["students"][s][m["label"]], key) for s in seeds]
            if all(x is not None for x in xs):
                row[key] = _stats([float(x) for x in xs])
        out[m["label"]] = row
    return out


def direction(results: dict[str, Any], metric: str = "exact") -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS` against this run: paired per-seed differences ``better - worse`` of ``metric``.

    Verdict: ``holds`` (every seed's difference > 0), ``fails`` (every seed's < 0), ``within seed
    spread`` (the seeds disagree, or a difference is 0), ``not run`` (a method is missing: ``command``
    names the ``--methods`` that would run it).  With several worse methods the one with the best
    mean over seeds is the comparison (``compared_with``).
    """
    labels = {**_method_labels(), **{m["key"]: m["label"] for m in results["methods"]}}
    ran = {m["key"] for m in results["methods"]}
    seeds = list(results["students"])
    out = []

    def val(key: str, s: str) -> float:
        return float(_value(results["students"][s][labels[key]], metric))

    for better, worse, paper in CLAIMS:
        row: dict[str, Any] = {"claim": claim_name(better, worse, labels), "paper": paper, "metric": metric,
                               "better": list(better), "worse": list(worse)}
        missing = [k for k in better + worse if k not in ran]
        if missing:
            need = list(dict.fromkeys(["ce", *better, *worse]))
            row.update(difference=None, verdict="not run", seeds_agreeing=None, missing=missing,
                       command=f"xtoken demo --methods {','.join(need)}")
            out.append(row)
            continue
        w = max(worse, key=lambda k: statistics.fmean(val(k, s) for s in seeds))
        d = [statistics.fmean(val(k, s) for k in better) - val(w, s) for s in seeds]
        if all(x > 0 for x in d):
            verdict = "holds"
        elif all(x < 0 for x in d):
            verdict = "fails"
        else:
            verdict = "within seed spread"
        row.update(difference=_stats(d), verdict=verdict, seeds_agreeing=sum(x > 0 for x in d), compared_with=labels[w])
        out.append(row)
    return out


def _fmt(st: dict[str, Any] | None, pct: bool) -> str:
    if st is None:
        return "—"
    k = 100.0 if pct else 1.0
    if st["n"] == 1:
        return f"{k * st['mean']:.1f}%" if pct else f"{st['mean']:.3f}"
    return f"{k * st['mean']:.1f} ± {k * st['sd']:.1f}%" if pct else f"{st['mean']:.3f} ± {st['sd']:.3f}"


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """Teachers' figures, then one row per student method (held-out stories; mean ± sd over seeds)."""
    agg = aggregate(results)
    n_seeds = len(results["students"])
    head = ["method"] + [h for _, h, _ in METRICS]
    body = [[label] + [_fmt(row.get(key), pct) for key, _, pct in METRICS] for label, row in agg.items()]
    tlines = []
    for name, t in results["teachers"].items():
        tlines.append(
            f"teacher {name}: exact answer {100 * t['exact']:.1f}% (copy {100 * t.get('exact_copy', 0):.1f}%, add {100 * t.get('exact_add', 0):.1f}%, "
            f"mul {100 * t.get('exact_mul', 0):.1f}%), next-token acc numerals {100 * t['eval_acc_numeral']:.1f}%, words {100 * t['eval_acc_word']:.1f}%, "
            f"CE {t['eval_ce']:.3f}" + (" (cached)" if t.get("cached") else "")
        )
    d = results["data"]
    epochs = (f"; each student drew {results['config']['student_steps'] * results['config']['batch']} of {d['student_stories']} stories "
              f"({d['student_epochs']:.2f} passes, no story more than {d['student_max_draws']} time(s))" if "student_epochs" in d else "")
    caption = (f"students (Llama-3 tokenizer), {d['eval_answers']} held-out answers in {d['eval_stories']} held-out stories, greedy decoding{epochs}; "
               + (f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "one seed")
               + (f"; KD at a fixed weight {results['config']['kd_weight']:g} (CE + w·KD), not dynamic scaling"
                  if results.get("config", {}).get("kd_weight") is not None else ""))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join([caption, ""] + out + [""] + [f"- {t}" for t in tlines])
    w = [max(len(head[i]), *(len(row[i]) for row in body)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    out = [caption + ":", line(head), "  ".join("-" * x for x in w)]
    out += [line(row) for row in body]
    return "\n".join(tlines + [""] + out)


def format_direction(results: dict[str, Any], markdown: bool = False) -> str:
    """Every claim of the paper beside this run's paired differences in exact answers, seeds agreeing and a verdict."""
    rows = direction(results)
    n = len(results["students"])
    head = ["paper's claim", "paper's figures", "measured difference (exact answer)", f"seeds agreeing (of {n})", "verdict"]
    body = []
    for r in rows:
        st = r["difference"]
        if st is None:
            body.append([r["claim"], r["paper"], "—", "—", f"not run ({r['command']})"])
            continue
        diff = f"{100 * st['mean']:+.1f} pts" + (f" ± {100 * st['sd']:.1f}" if st["n"] > 1 else "")
        if len(r["worse"]) > 1:
            diff += f" (vs {r['compared_with']})"
        body.append([r["claim"], r["paper"], diff, str(r["seeds_agreeing"]), r["verdict"]])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(out + ["| " + " | ".join(b) + " |" for b in body])
    w0 = max(len(b[0]) for b in body)
    return "\n".join(f"{b[0]:<{w0}}  {b[2]:>18}  {b[3] + '/' + str(n) if b[3] != '—' else '—':>5}  {b[4]}" + f"   [paper: {b[1]}]" for b in body)


def mechanisms(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method (mean over seeds): what the curves measured — learning speed, convergence, and how KD steers the student.

    ``exact@f``: held-out exact answers at the evaluation nearest to fraction ``f`` of the budget;
    ``exact_last_quarter_change``: final minus the value a quarter of the budget earlier (≈ 0: converged);
    ``cos_early``/``cos_late`` and ``ratio_early``/``ratio_late``: the gradient probe (cosine of
    ``∇CE`` and ``scale·∇KD``, and their norm ratio) averaged over the first and second half of the
    evaluations after step 0; ``scale_late``: median dynamic scale over the last quarter of training.
    """
    out: dict[str, dict[str, float]] = {}
    seeds = list(results["students"])
    for m in results["methods"]:
        label = m["label"]
        rows: list[dict[str, float]] = []
        for s in seeds:
            c = results["students"][s][label]["curves"]
            es, ex = c["eval_step"], c["eval_exact"]
            last = es[-1]
            at = lambda f: ex[min(range(len(es)), key=lambda i: abs(es[i] - f * last))]  # noqa: E731
            r = {"exact@0.25": at(0.25), "exact@0.5": at(0.5), "exact@1": ex[-1], "exact_last_quarter_change": ex[-1] - at(0.75)}
            if "probe_cos" in c and len(c["probe_cos"]) > 2:
                cos, ratio = c["probe_cos"][1:], c["probe_ratio"][1:]
                h = len(cos) // 2
                r.update(cos_early=statistics.fmean(cos[:h]), cos_late=statistics.fmean(cos[h:]),
                         ratio_early=statistics.fmean(ratio[:h]), ratio_late=statistics.fmean(ratio[h:]))
            if m["teachers"] and c.get("scale"):
                r["scale_late"] = statistics.median(c["scale"][-max(1, len(c["scale"]) // 4):])
            rows.append(r)
        out[label] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    return out


def format_mechanisms(results: dict[str, Any], markdown: bool = False) -> str:
    """:func:`mechanisms` as a table (exact answers in %)."""
    mech = results.get("mechanisms") or mechanisms(results)
    cols = [("exact@0.25", "exact @¼", True), ("exact@0.5", "exact @½", True), ("exact@1", "exact @end", True),
            ("exact_last_quarter_change", "Δ last ¼", True), ("cos_early", "cos early", False), ("cos_late", "cos late", False),
            ("ratio_early", "ratio early", False), ("ratio_late", "ratio late", False), ("scale_late", "scale late", False)]
    head = ["method"] + [h for _, h, _ in cols]
    body = []
    for label, r in mech.items():
        row = [label]
        for key, _, pct in cols:
            v = r.get(key)
            row.append("—" if v is None else (f"{100 * v:+.1f}" if key == "exact_last_quarter_change" else f"{100 * v:.1f}%") if pct else f"{v:.2f}")
        body.append(row)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(out + ["| " + " | ".join(b) + " |" for b in body])
    w = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * x for x in w)] + [line(b) for b in body])


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _mean_curve(results: dict[str, Any], label: str, key: str) -> list[float] | None:
    cs = [results["students"][s][label]["curves"].get(key) for s in results["students"]]
    if any(c is None for c in cs) or not cs:
        return None
    n = min(len(c) for c in cs)
    return [statistics.fmean(c[i] for c in cs) for i in range(n)]


_STYLES = {
    "CE only": ("black", "-"),
    "KD ← Llama-3 (same tokenizer)": ("tab:gray", ":"),
    "ULD ← Qwen3": ("tab:orange", "-"),
    "GOLD ← Qwen3": ("tab:red", "-"),
    "P-KL ← Qwen3": ("tab:green", "-"),
    "P-KL ← Qwen3, learnable W": ("tab:olive", "-"),
    "GOLD ← o200k": ("tab:red", "--"),
    "H-KL ← o200k": ("tab:blue", "--"),
    "H-KL ← o200k 0.8 + KL ← Llama-3 0.2": ("tab:purple", "--"),
}


def plot(results: dict[str, Any], path: Path) -> None:
    """Eight panels (mean over seeds): training CE, held-out exact answers, numeral and word next-token accuracy;
    KD, dynamic scale, and the gradient probe (cosine and norm ratio of ``scale·∇KD`` against ``∇CE``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 4, figsize=(22, 9))
    any_seed = next(iter(results["students"].values()))
    for m in results["methods"]:
        label = m["label"]
        c, ls = _STYLES.get(label, (None, "-"))
        cur = any_seed[label]["curves"]
        step, es = cur["step"], cur["eval_step"]
        k = max(1, len(step) // 40)
        panels = [
            (ax[0, 0], step, _mean_curve(results, label, "ce"), k, 1),
            (ax[0, 1], es, _mean_curve(results, label, "eval_exact"), 1, 100),
            (ax[0, 2], es, _mean_curve(results, label, "eval_acc_numeral"), 1, 100),
            (ax[0, 3], es, _mean_curve(results, label, "eval_acc_word"), 1, 100),
        ]
        if m["teachers"]:
            panels += [
                (ax[1, 0], step, _mean_curve(results, label, "kd"), k, 1),
                (ax[1, 1], step, _mean_curve(results, label, "scale"), k, 1),
                (ax[1, 2], es, _mean_curve(results, label, "probe_cos"), 1, 1),
                (ax[1, 3], es, _mean_curve(results, label, "probe_ratio"), 1, 1),
            ]
        for a, x, y, kk, mult in panels:
            if y is None:
                continue
            y = _smooth(y, kk) if kk > 1 else y
            a.plot(x[: len(y)], [mult * v for v in y], color=c, ls=ls, label=label, marker="." if kk == 1 else None)
    n = len(results["students"])
    ax[0, 0].set(title="student CE, every token (training, smoothed)", xlabel="step", yscale="log")
    ax[0, 1].set(title="held-out exact answers (greedy), %", xlabel="step")
    ax[0, 2].set(title="held-out next-token accuracy on numerals, %", xlabel="step")
    ax[0, 3].set(title="held-out next-token accuracy on words, %", xlabel="step")
    ax[1, 0].set(title="KD loss of each method (training, smoothed)", xlabel="step", yscale="symlog")
    ax[1, 1].set(title="dynamic scale CE/|KD| (training, smoothed)", xlabel="step", yscale="log")
    ax[1, 2].set(title="cosine(∇CE, ∇KD), held-out batch", xlabel="step", ylim=(-1.02, 1.02))
    ax[1, 3].set(title="|scale·∇KD| / |∇CE|, held-out batch", xlabel="step", yscale="log")
    for a in ax.flat:
        a.grid(alpha=0.3)
    ax[0, 1].legend(fontsize=7, loc="lower right")
    t = results["teachers"]
    fig.suptitle("X-Token demo (continued pre-training on every token): Llama-3 students; teachers "
                 + ", ".join(f"{k} {100 * v['exact']:.0f}% exact" for k, v in t.items())
                 + (f"; mean over {n} seeds" if n > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _finite(obj: Any, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value at {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def check_results(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` if a figure is missing or not finite (what the test and the CLI rely on)."""
    _finite(results, "results")
    for seed, d in results["students"].items():
        for m in results["methods"]:
            r = d.get(m["label"])
            if r is None:
                raise ValueError(f"seed {seed}: no result for {m['label']}")
            for key in ("exact", "eval_acc_numeral", "eval_acc_word", "eval_ce"):
                if key not in r:
                    raise ValueError(f"seed {seed}, {m['label']}: {key} missing")
            if m["teachers"] and "eval_kd" not in r:
                raise ValueError(f"seed {seed}, {m['label']}: eval_kd missing")


def write_outputs(results: dict[str, Any], out: Path, audits: dict[str, Any] | None = None) -> dict[str, Path]:
    """``results.json`` (every figure), ``results.md`` (table + the paper's direction), ``curves.png``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "table": aggregate(results), "direction": direction(results), "mechanisms": mechanisms(results)}
    if audits is not None:
        results["audits"] = audits
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "curves.png"}
    paths["json"].write_text(json.dumps(results, indent=1, ensure_ascii=False))
    paths["table"].write_text(format_table(results, markdown=True) + "\n\n" + format_direction(results, markdown=True) + "\n\n"
                              + "Learning speed and the gradient probe (mean over seeds):\n\n" + format_mechanisms(results, markdown=True) + "\n")
    plot(results, paths["plot"])
    return paths


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same demo on disjoint seeds (e.g. ``--seeds 1`` then ``--seeds 2,3``).

    Refuses runs whose configuration (anything but the seeds and the worker count), methods or
    teachers differ, or whose seeds overlap: their students would not be comparable.
    """
    from nemo_xtoken.errors import XTokenError

    base = runs[0]
    same = lambda r: {k: v for k, v in r["config"].items() if k not in ("seeds", "workers")}  # noqa: E731
    students: dict[str, Any] = {}
    for i, r in enumerate(runs):
        if same(r) != same(base):
            diff = sorted(k for k in same(base) if same(r).get(k) != same(base)[k])
            raise XTokenError(f"run {i + 1} has another configuration than run 1 ({', '.join(diff)}): its students are not comparable")
        if r["methods"] != base["methods"]:
            raise XTokenError(f"run {i + 1} trained other methods than run 1")
        for name, t in r["teachers"].items():
            if t.get("exact") != base["teachers"].get(name, {}).get("exact"):
                raise XTokenError(f"run {i + 1}'s teacher {name} is not run 1's (held-out figures differ)")
        for seed, v in r["students"].items():
            if seed in students:
                raise XTokenError(f"seed {seed} is in two runs: merge runs of disjoint seeds")
            students[seed] = v
    order = sorted(students, key=int)
    out = {k: v for k, v in base.items() if k not in ("table", "direction", "mechanisms", "audits")}
    out["students"] = {s: students[s] for s in order}
    out["config"] = {**base["config"], "seeds": [int(s) for s in order]}
    out["seconds"] = {"runs": [r.get("seconds", {}) for r in runs]}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m nemo_xtoken.demo.report RESULTS.json``: the table, the paper's direction and the mechanisms of a finished run."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path, nargs="+", help="a demo run's results.json (several: with --merge)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--merge", type=Path, default=None, metavar="DIR",
                   help="merge runs of disjoint seeds into DIR (results.json, results.md, curves.png)")
    a = p.parse_args(argv)
    runs = [json.loads(x.read_text()) for x in a.results]
    if a.merge is None and len(runs) > 1:
        p.error("several results files need --merge DIR")
    r = runs[0]
    if a.merge is not None:
        r = merge_results(runs)
        check_results(r)
        write_outputs(r, a.merge, runs[0].get("audits"))
    print(format_table(r, markdown=a.markdown), format_direction(r, markdown=a.markdown), format_mechanisms(r, markdown=a.markdown), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
