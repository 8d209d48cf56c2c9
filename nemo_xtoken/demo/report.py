"""The demo's outputs: the results table (text + Markdown), the learning-curve plot, ``results.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["format_table", "write_outputs", "plot", "check_results"]


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in results["methods"]:
        r = results["students"][m["label"]]
        kd = r.get("eval_kd")
        rows.append({
            "method": m["label"],
            "teacher": m["teacher"] if m["loss"] else "—",
            "exact": r["exact"],
            "numeral_mass": r["numeral_mass"],
            "multi_digit_mass": r.get("multi_digit_mass"),
            "kd": kd["kd"] if kd else None,
            "ce": r["eval_ce"],
            "train_kd": _tail_mean(r["curves"]["kd"]) if m["loss"] else None,
            "train_ce": _tail_mean(r["curves"]["ce"]),
        })
    return rows


def _tail_mean(xs: list[float], frac: float = 0.1) -> float:
    k = max(1, int(len(xs) * frac))
    return sum(xs[-k:]) / k


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """Teachers' accuracy, then one row per student method (held-out problems, greedy decoding)."""
    def f(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "—"
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}"

    n = results["data"]["eval_problems"]
    head = ["method", "exact answer", "numeral mass", "2–3-digit mass", "KD (held-out)", "CE (held-out)", "KD (train, last 10%)", "CE (train, last 10%)"]
    body = [[r["method"], f(r["exact"], True), f(r["numeral_mass"]), f(r["multi_digit_mass"]), f(r["kd"]), f(r["ce"]), f(r["train_kd"]), f(r["train_ce"])] for r in _rows(results)]
    tlines = []
    for name, t in results["teachers"].items():
        tlines.append(f"teacher {name}: exact answer {100 * t['exact']:.1f}%, numeral mass {t['numeral_mass']:.3f}, CE {t['eval_ce']:.3f}"
                      + (" (cached)" if t.get("cached") else ""))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(out + [""] + [f"- {t}" for t in tlines])
    w = [max(len(head[i]), *(len(row[i]) for row in body)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    out = [f"students (Llama-3 tokenizer), {n} held-out problems, greedy decoding:", line(head), "  ".join("-" * x for x in w)]
    out += [line(row) for row in body]
    return "\n".join(tlines + [""] + out)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: training CE, held-out exact answer, held-out numeral mass, training KD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    styles = {"CE only": ("black", "-"), "ULD ← Qwen3": ("tab:orange", "-"), "GOLD ← Qwen3": ("tab:red", "-"),
              "P-KL ← Qwen3": ("tab:green", "-"), "GOLD ← o200k": ("tab:red", "--"), "H-KL ← o200k": ("tab:blue", "--")}
    for m in results["methods"]:
        r = results["students"][m["label"]]
        c, ls = styles.get(m["label"], (None, "-"))
        cur = r["curves"]
        k = max(1, len(cur["step"]) // 30)
        ax[0, 0].plot(cur["step"], _smooth(cur["ce"], k), color=c, ls=ls, label=m["label"])
        ax[0, 1].plot(cur["eval_step"], [100 * x for x in cur["eval_exact"]], color=c, ls=ls, marker=".", label=m["label"])
        ax[1, 0].plot(cur["eval_step"], cur["eval_numeral_mass"], color=c, ls=ls, marker=".", label=m["label"])
        if "eval_multi_digit_mass" in cur:
            ax[1, 0].plot(cur["eval_step"], cur["eval_multi_digit_mass"], color=c, ls=ls, marker="x", alpha=0.5, lw=0.8)
        if m["loss"]:
            ax[1, 1].plot(cur["step"], _smooth(cur["kd"], k), color=c, ls=ls, label=m["label"])
    ax[0, 0].set(title="student CE on answer tokens (training, smoothed)", xlabel="step", yscale="log")
    ax[0, 1].set(title="held-out exact answer (teacher-forced = greedy), %", xlabel="step", ylim=(-2, 102))
    ax[1, 0].set(title="student mass on numeral tokens at the answer (·: all, x: 2–3-digit)", xlabel="step", ylim=(-0.02, 1.02))
    ax[1, 1].set(title="KD loss of each method (training, smoothed)", xlabel="step", yscale="log")
    for a in ax.flat:
        a.grid(alpha=0.3)
    ax[0, 1].legend(fontsize=8, loc="lower right")
    t = results["teachers"]
    fig.suptitle("X-Token demo: Llama-3 students from a Qwen3 teacher (digits split) and an o200k teacher (numerals whole); "
                 + ", ".join(f"{n} teacher {100 * v['exact']:.0f}% exact" for n, v in t.items()), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
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
    """Raise if a figure is missing or not finite (what the test and ``--check`` rely on)."""
    _finite(results, "results")
    for m in results["methods"]:
        r = results["students"][m["label"]]
        for key in ("exact", "numeral_mass", "eval_ce"):
            assert key in r, (m["label"], key)
        if m["loss"]:
            assert "eval_kd" in r, m["label"]


def write_outputs(results: dict[str, Any], out: Path, audits: dict[str, Any] | None = None) -> dict[str, Path]:
    """``results.json`` (every figure), ``results.md`` (the table), ``curves.png``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "table": _rows(results)}
    if audits is not None:
        results["audits"] = audits
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "curves.png"}
    paths["json"].write_text(json.dumps(results, indent=1, ensure_ascii=False))
    paths["table"].write_text(format_table(results, markdown=True) + "\n")
    plot(results, paths["plot"])
    return paths
