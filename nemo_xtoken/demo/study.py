"""The P-KL study (``xtoken demo --study pkl``): P-KL ← Qwen3 against CE only, factorial over the loss's options.

Cells: CE only, and P-KL ← Qwen3 for every combination of

- KD weighting (:data:`WEIGHTINGS`): dynamic scaling ``CE + sg(CE/|KD|)·KD``, the same with the scale
  capped at 10 (``kd_scale_max``), fixed ``CE + 1·KD``, fixed ``CE + 10·KD``;
- W (:data:`W_VARIANTS`): the built W, or its top-1 version (each student row keeps only its
  largest entry, with weight 1: :func:`top1_projection`);
- merge (:data:`~nemo_xtoken.align.merge.MERGES`): chain, mean, reference,

for every seed (seed 1 over every cell first, then the next seed: a run cut short is a complete
factorial over fewer seeds).  Every cell is the demo's student job (same data, teachers,
initialization and data order per seed) with one more measurement, :func:`answer_probe`: for every
multi-digit held-out answer, teacher-forced at the answer's position(s), the student's log-probability
of the true answer token(s) and the mass it puts on *other* numerals sharing the first digit of the
true token (``1``, ``11``, ``111``, ``12``… when the answer is ``143``) — the mass P-KL's chain
target pushes towards (issue 25).  Finished cells are cached by content hash under
``$XTOKEN_CACHE/demo/study/`` (the demo itself caches teachers only), so a repeated or resumed run
trains only the cells it lacks; ``results_study.json`` / ``study.md`` / ``study.png`` are rewritten
after every finished cell.  ``python -m nemo_xtoken.demo.study DIR/results_study.json`` re-prints and
re-draws them.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_xtoken.align.merge import MERGES

__all__ = [
    "WEIGHTINGS", "W_VARIANTS", "study_cells", "top1_projection", "first_digits", "answer_measures", "answer_probe",
    "summarize", "format_study", "plot_study", "run_study",
]

#: KD weighting of a cell → its Job overrides
WEIGHTINGS: dict[str, dict[str, Any]] = {
    "dynamic": {"kd_weight": None},
    "dynamic, scale ≤ 10": {"kd_weight": None, "kd_scale_max": 10.0},
    "fixed 1": {"kd_weight": 1.0},
    "fixed 10": {"kd_weight": 10.0},
}
#: W of a cell → its Job overrides
W_VARIANTS: dict[str, dict[str, Any]] = {"built W": {"w_top1": False}, "top-1 W": {"w_top1": True}}
CE_KEY = "CE only"
STUDY_VERSION = 1  # bump when the study's measurements change what a cached cell holds


def cell_key(weighting: str, w: str, merge: str) -> str:
    return f"P-KL {weighting} · {w} · {merge}"


def study_cells(seeds: tuple[int, ...]) -> list[tuple[int, str, Any, dict[str, Any]]]:
    """``(seed, key, method, Job overrides)`` of every cell, seed by seed, CE only first, then merge by merge."""
    from nemo_xtoken.demo.run import METHODS

    by_key = {m.key: m for m in METHODS}
    out = []
    for seed in seeds:
        out.append((seed, CE_KEY, by_key["ce"], {"answer_probe": True}))
        for merge in MERGES:  # chain (the default) first: a run cut short has every weighting x W of the default merge
            for wname, wo in WEIGHTINGS.items():
                for vname, vo in W_VARIANTS.items():
                    out.append((seed, cell_key(wname, vname, merge), by_key["pkl_qwen3"], {**wo, **vo, "merge": merge, "answer_probe": True}))
    return out


# ---- W --------------------------------------------------------------------------------------------


def top1_projection(proj: Any) -> Any:
    """W with every non-empty student row reduced to its largest entry, weight 1 (rows are stored by decreasing weight)."""
    from nemo_xtoken.vocab.projection import Projection

    lengths = np.diff(proj.indptr)
    keep = proj.indptr[:-1][lengths > 0]
    indptr = np.zeros_like(proj.indptr)
    np.cumsum(lengths > 0, out=indptr[1:])
    return Projection(
        indptr=indptr, indices=proj.indices[keep].copy(), data=np.ones(len(keep), dtype=np.float32), row_kind=proj.row_kind.copy(),
        student_vocab_size=proj.student_vocab_size, teacher_vocab_size=proj.teacher_vocab_size,
        student_fingerprint=proj.student_fingerprint, teacher_fingerprint=proj.teacher_fingerprint,
        beta=proj.beta, gamma=proj.gamma, max_len=proj.max_len, top_k=1, meta={**proj.meta, "top1_only": True},
    )


# ---- measurements ---------------------------------------------------------------------------------


def first_digits(texts: list[str]) -> torch.Tensor:
    """Per token: the first digit of a numeral token (digits only, optionally after spaces), -1 for any other token."""
    out = []
    for t in texts:
        s = t.lstrip(" ")
        out.append(int(s[0]) if s and s.isdigit() and s.isascii() else -1)
    return torch.tensor(out, dtype=torch.long)


def answer_measures(log_probs: torch.Tensor, true_ids: torch.Tensor, digits: torch.Tensor) -> tuple[float, float]:
    """One answer, teacher-forced: ``log_probs[j]`` is the student's distribution where answer token ``j`` is predicted.

    Returns ``(log p(true), same-first-digit mass)``: the sum over the answer's tokens of their
    log-probabilities (the log-probability of the whole answer), and the mean over its positions of
    the probability on numeral tokens other than the true one whose first digit is the true token's
    (``digits``: :func:`first_digits` of the vocabulary).
    """
    if log_probs.dim() != 2 or log_probs.shape[0] != true_ids.shape[0] or log_probs.shape[1] != digits.shape[0]:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} must be [answer tokens = {true_ids.shape[0]}, vocabulary = {digits.shape[0]}]")
    lp = log_probs.double()
    logp = float(lp.gather(1, true_ids[:, None]).sum())
    d = digits[true_ids]
    if bool((d < 0).any()):
        raise ValueError(f"answer tokens {true_ids[d < 0].tolist()} are not numerals")
    same = digits[None, :] == d[:, None]
    same[torch.arange(len(true_ids)), true_ids] = False
    mass = float((lp.exp() * same).sum(1).mean())
    return logp, mass


@torch.no_grad()
def answer_probe(model: Any, data: Any, vocab: int, texts: list[str], batch: int = 100) -> dict[str, Any]:
    """:func:`answer_measures` of every multi-digit held-out answer (student ids), teacher-forced on its held-out story.

    The answer's tokens are the story's tokens after its prompt (the prompt's ids are checked to be
    the story's prefix) whose texts spell the answer.  Returns the means over answers, overall and
    per kind, with the counts.
    """
    from nemo_xtoken.demo.train import _gather, _mask
    from nemo_xtoken.errors import XTokenError

    ev = next(iter(data.sides.values())).eval  # the student fields are the same in every teacher's view
    prompts = data.student_prompts
    docs = [d for d, s in enumerate(data.eval_stories) for _ in s.answers]
    digits = first_digits(texts)
    tokens, lens = ev.fields["tokens"], ev.s_len
    per_doc: dict[int, list[tuple[int, int, torch.Tensor, str]]] = {}
    for i, (ids, ans, kind) in enumerate(zip(prompts.ids, prompts.answers, prompts.kinds)):
        if len(ans) < 2:
            continue
        d, n = docs[i], len(ids)
        row = tokens[d, : int(lens[d])]
        if n < 1 or not torch.equal(row[:n], torch.as_tensor(np.asarray(ids), dtype=row.dtype)):
            raise XTokenError(f"held-out answer {ans!r} of story {d}: its prompt is not the start of the story's student tokens")
        spelled, k = "", 0
        while len(spelled) < len(ans) and n + k < len(row):
            spelled += texts[int(row[n + k])]
            k += 1
        if spelled != ans:
            raise XTokenError(f"held-out answer {ans!r} of story {d}: the student tokens after its prompt spell {spelled!r}, not the answer")
        per_doc.setdefault(d, []).append((n, k, row[n : n + k].clone(), kind))
    order = sorted(per_doc)
    vals: list[tuple[str, float, float]] = []
    for c in range(0, len(order), batch):
        ds = order[c : c + batch]
        b = ev.rows(ds)
        x = b["tokens"]
        lp = torch.log_softmax(_gather(model(x, torch.arange(x.shape[1])[None].expand_as(x), _mask(x.shape[1])), vocab).float(), -1)
        for j, d in enumerate(ds):
            for n, k, true, kind in per_doc[d]:
                logp, mass = answer_measures(lp[j, n - 1 : n - 1 + k], true, digits)
                vals.append((kind, logp, mass))
    out: dict[str, Any] = {"n": len(vals)}
    for kind in [None] + sorted({v[0] for v in vals}):
        sel = [v for v in vals if kind is None or v[0] == kind]
        sfx = "" if kind is None else f"_{kind}"
        out[f"logp_true{sfx}"] = statistics.fmean(v[1] for v in sel) if sel else float("nan")
        out[f"same_first_digit_mass{sfx}"] = statistics.fmean(v[2] for v in sel) if sel else float("nan")
        if kind is not None:
            out[f"n{sfx}"] = len(sel)
    return out


# ---- one cell's figures, the table, the plot --------------------------------------------------------

_METRICS = (("exact", "exact answer", "pct"), ("exact_copy", "copy", "pct"), ("exact_add", "add", "pct"), ("exact_mul", "mul", "pct"),
            ("logp_true", "log p(true), multi-digit", "f2"), ("same_first_digit_mass", "same-first-digit mass", "f3"),
            ("d_exact_vs_ce", "Δ exact vs CE only (paired)", "pts"), ("scale_late", "scale late", "f1"), ("ratio_late", "ratio late", "f2"))


def compact(r: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of a student job's result (the full one, with its training curves, stays in the cache)."""
    c = r["curves"]
    out = {k: r[k] for k in ("exact", "exact_copy", "exact_add", "exact_mul", "eval_ce", "train_seconds") if k in r}
    out["answer_probe"] = r["answer_probe"]
    out["eval_kd"] = r.get("eval_kd")
    out["job"] = {k: r["job"].get(k) for k in ("seed", "steps", "batch", "kd_weight", "kd_scale_max", "merge", "w_top1")}
    out["eval_curve"] = {k: c[k] for k in ("eval_step", "eval_exact", "probe_ratio", "probe_cos") if k in c}
    if r["job"].get("teachers"):
        q = max(1, len(c["scale"]) // 4)
        out["scale_late"] = statistics.median(c["scale"][-q:])  # median CE/|KD| (or the fixed weight) over the last quarter
        out["kd_train_late"] = statistics.fmean(c["kd"][-q:])
        out["ce_train_late"] = statistics.fmean(c["ce"][-q:])
        ratio = c.get("probe_ratio", [])[1:]
        if len(ratio) >= 2:
            out["ratio_late"] = statistics.fmean(ratio[len(ratio) // 2 :])  # ‖scale·∇KD‖/‖∇CE‖, second half of the evaluations
    return out


def _value(res: dict[str, Any], key: str, seed: str, cell: str) -> float | None:
    r = res["cells"].get(cell, {}).get(seed)
    if r is None:
        return None
    if key in ("logp_true", "same_first_digit_mass"):
        return r["answer_probe"][key]
    if key == "d_exact_vs_ce":
        ce = res["cells"].get(CE_KEY, {}).get(seed)
        return None if ce is None or cell == CE_KEY else r["exact"] - ce["exact"]
    v = r.get(key)
    return None if v is None else float(v)


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per cell and metric: mean, sample sd (0 for one seed), the per-seed values, and for Δ vs CE the seeds with Δ > 0."""
    out: dict[str, dict[str, Any]] = {}
    for cell in res["order"]:
        row: dict[str, Any] = {}
        for key, _, _ in _METRICS:
            xs = {s: _value(res, key, s, cell) for s in res["cells"].get(cell, {})}
            xs = {s: v for s, v in xs.items() if v is not None and math.isfinite(v)}
            if xs:
                v = list(xs.values())
                row[key] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v), "values": xs}
                if key == "d_exact_vs_ce":
                    row[key]["seeds_above"] = sum(x > 0 for x in v)
        out[cell] = row
    return out


def _fmt(st: dict[str, Any] | None, kind: str) -> str:
    if st is None:
        return "—"
    m, sd = st["mean"], st["sd"]
    if kind == "pct":
        return f"{100 * m:.1f} ± {100 * sd:.1f}%"
    if kind == "pts":
        return f"{100 * m:+.1f} ± {100 * sd:.1f} ({st['seeds_above']}/{st['n']})"
    digits = {"f1": 1, "f2": 2, "f3": 3}[kind]
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def format_study(res: dict[str, Any], markdown: bool = False) -> str:
    """The study's table: one row per cell (mean ± sd over the seeds it finished)."""
    summ = summarize(res)
    head = ["cell (P-KL ← Qwen3: weighting · W · merge)", "seeds"] + [h for _, h, _ in _METRICS]
    rows = []
    for cell in res["order"]:
        st = summ[cell]
        n = len(res["cells"].get(cell, {}))
        rows.append([cell, str(n)] + [_fmt(st.get(k), kind) for k, _, kind in _METRICS])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in [head] + rows)


def plot_study(res: dict[str, Any], path: Path) -> None:
    """Three panels (exact answer, log p(true), same-first-digit mass): P-KL cells grouped by weighting and W, one point per merge; CE only as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(res)
    groups = [(w, v) for w in WEIGHTINGS for v in W_VARIANTS]
    panels = (("exact", "exact answer (%)", 100.0), ("logp_true", "log p(true answer), multi-digit", 1.0),
              ("same_first_digit_mass", "mass on other same-first-digit numerals", 1.0))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 9.5), sharex=True)
    width = 0.8 / len(MERGES)
    for ax, (key, title, f) in zip(axes, panels):
        for k, merge in enumerate(MERGES):
            xs, ys, es = [], [], []
            for g, (w, v) in enumerate(groups):
                st = summ.get(cell_key(w, v, merge), {}).get(key)
                if st is not None:
                    xs.append(g + (k - (len(MERGES) - 1) / 2) * width)
                    ys.append(f * st["mean"])
                    es.append(f * st["sd"])
            ax.errorbar(xs, ys, yerr=es, fmt="o", ms=5, capsize=3, label=f"P-KL ← Qwen3, merge {merge}")
        ce = summ.get(CE_KEY, {}).get(key)
        if ce is not None:
            ax.axhline(f * ce["mean"], color="k", ls="--", lw=1, label="CE only")
        ax.set_ylabel(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=4)
    axes[-1].set_xticks(range(len(groups)))
    axes[-1].set_xticklabels([f"{w}\n{v}" for w, v in groups], fontsize=7)
    pkl = sorted({s for k, c in res["cells"].items() if k != CE_KEY for s in c}, key=int)
    ce_seeds = sorted(res["cells"].get(CE_KEY, {}), key=int)
    fig.suptitle(f"P-KL ← Qwen3 vs CE only: the study (mean ± sd; P-KL cells: seeds {', '.join(pkl) or '—'}, "
                 f"not every cell every seed, see study.md; CE only: seeds {', '.join(ce_seeds) or '—'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """``results_study.json``, ``study.md`` and ``study.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results_study.json", "table": out / "study.md", "plot": out / "study.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(paths["json"])
    seeds = sorted({s for c in res["cells"].values() for s in c}, key=int)
    teach = res.get("teachers", {}).get("qwen3")
    lines = [
        "# P-KL ← Qwen3 vs CE only: the study", "",
        f"`{res['command']}`, started {res['started']}, commit {res.get('commit', '?')}; seeds finished per cell in the table "
        f"(seeds run: {', '.join(seeds) or 'none'}); {_regime(res)}.", "",
        "Exact answer: greedy decoding of every held-out answer (per kind: copy / add / mul). log p(true): the student's "
        "log-probability of the true answer token(s), teacher-forced at the answer's position(s), mean over the "
        f"{_n_multi(res)} multi-digit held-out answers. Same-first-digit mass: at those positions, the probability on other "
        "numerals sharing the true token's first digit. Δ exact vs CE only: paired per seed (in brackets: seeds above CE only / seeds). "
        "Scale late: median CE/|KD| over the last quarter of training (the fixed weight for fixed cells); ratio late: "
        "‖scale·∇KD‖ / ‖∇CE‖ on a fixed held-out batch, mean over the second half of the evaluations.", "",
        format_study(res, markdown=True), "",
    ]
    if teach:
        lines.append(f"Teacher Qwen3: exact answer {100 * teach['exact']:.1f}% (copy {100 * teach['exact_copy']:.1f}%, "
                     f"add {100 * teach['exact_add']:.1f}%, mul {100 * teach['exact_mul']:.1f}%).")
    paths["table"].write_text("\n".join(lines) + "\n")
    plot_study(res, paths["plot"])
    return paths


def _regime(res: dict[str, Any]) -> str:
    c, d = res["config"], res.get("data") or {}
    drawn = c["student_steps"] * c["batch"]
    stories = d.get("student_stories") or max(c.get("n_student_stories", 0), drawn)
    text = f"{c['student_steps']} student steps × batch {c['batch']} = {drawn:,} stories drawn from a corpus of {stories:,}"
    if "student_max_draws" in d:
        text += f" ({d['student_epochs']:.3g} passes, no story drawn more than {d['student_max_draws']} time(s))"
    return text


def _n_multi(res: dict[str, Any]) -> str:
    for c in res["cells"].values():
        for r in c.values():
            return str(r["answer_probe"]["n"])
    return "?"


# ---- the run ----------------------------------------------------------------------------------------


def _code_hash() -> str:
    """The training code a cached cell depends on (the demo's modules other than this one)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("train.py", "run.py", "data.py", "corpus.py", "vocab_subset.py"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def cell_hash(cfg: Any, seed: int, key: str, over: dict[str, Any]) -> str:
    """Content hash of one cell: every setting of the run (but seeds, workers), the cell, the training code."""
    from nemo_xtoken.demo.run import CODE_VERSION

    c = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "workers", "methods")}
    d = {"cfg": c, "seed": seed, "key": key, "over": over, "code": _code_hash(), "v": [CODE_VERSION, STUDY_VERSION]}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _teacher_meta_path(cfg: Any, name: str) -> Path:
    """Where the demo keeps a cached teacher's figures (as :func:`~nemo_xtoken.demo.run.run_demo` names it)."""
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.demo.run import TEACHERS
    from nemo_xtoken.vocab import load_tokenizer

    fps = {n: load_tokenizer(tokenizer_path(n)).fingerprint for n in TEACHERS}
    return cache_dir() / "demo" / f"teacher-{name}-{cfg.teacher_key(name, fps)}.json"


def _commit() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_study(cfg: Any, out: Path, *, command: str, progress: bool = True, log=print) -> dict[str, Any]:
    """Train every cell not cached yet (seed by seed), writing the outputs after every finished cell; return the results."""
    from nemo_xtoken.assets import cache_dir
    from nemo_xtoken.demo.run import run_demo

    cells = study_cells(tuple(cfg.seeds))
    cdir = cache_dir() / "demo" / "study"
    cdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
        "config": asdict(cfg), "order": list(dict.fromkeys(k for _, k, _, _ in cells)), "cells": {}, "cache": {},
    }
    todo = []
    for seed, key, m, over in cells:
        h = cell_hash(cfg, seed, key, over)
        res["cache"].setdefault(key, {})[str(seed)] = h
        f = cdir / f"{h}.json"
        if f.is_file():
            res["cells"].setdefault(key, {})[str(seed)] = compact(json.loads(f.read_text()))
        else:
            todo.append((seed, key, m, over))
    teacher_meta = _teacher_meta_path(cfg, "qwen3")

    def teachers() -> None:
        if "teachers" not in res and teacher_meta.is_file():
            t = json.loads(teacher_meta.read_text())
            res["teachers"] = {"qwen3": {k: v for k, v in t.items() if k.startswith("exact") or k == "eval_ce"}}

    teachers()
    log(f"P-KL study: {len(cells)} cells over seeds {list(cfg.seeds)}, {len(cells) - len(todo)} cached ({cdir}), {len(todo)} to train")
    if todo:
        def on_student(k: tuple[int, str], r: dict[str, Any]) -> None:
            seed, key = k
            (cdir / f"{res['cache'][key][str(seed)]}.json").write_text(json.dumps(r))
            res["cells"].setdefault(key, {})[str(seed)] = compact(r)
            teachers()
            write_study(res, out)
            log(f"  {key} [seed {seed}]: exact {r['exact']:.1%}, log p(true) {r['answer_probe']['logp_true']:.2f}, "
                f"same-first-digit mass {r['answer_probe']['same_first_digit_mass']:.3f} ({r['train_seconds']:.0f} s)")

        run = run_demo(replace(cfg, seeds=tuple(sorted({c[0] for c in todo}))), progress=progress, log=log, cells=todo, on_student=on_student)
        res["data"] = {k: v for k, v in run["data"].items() if k != "common_set"}
        res["seconds"] = run["seconds"]
    teachers()
    res["cells"] = {k: dict(sorted(res["cells"][k].items(), key=lambda kv: int(kv[0]))) for k in res["order"] if k in res["cells"]}
    write_study(res, out)
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m nemo_xtoken.demo.study DIR/results_study.json``: re-print the table, re-write study.md / study.png beside it."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="a study's results_study.json")
    a = p.parse_args(argv)
    path = Path(a.results)
    res = json.loads(path.read_text())
    write_study(res, path.parent)
    print(format_study(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
