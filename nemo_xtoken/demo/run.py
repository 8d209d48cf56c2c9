"""The demo's driver: data, cached teachers, six students, in two parallel worker processes.

Teachers are trained once and cached under ``$XTOKEN_CACHE/demo/teacher-<hash>.safetensors``; the
hash covers everything that determines the weights (corpus, sizes, steps, learning rate, seed,
tokenizer fingerprints, code version), so a changed setting retrains and an unchanged one reuses.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemo_xtoken.demo.train import Job, ModelSize

__all__ = ["DemoConfig", "METHODS", "run_demo", "FAST", "FULL"]

# (label, teacher, loss); loss None = CE only (the student never sees a teacher)
METHODS: list[tuple[str, str, str | None]] = [
    ("CE only", "qwen3", None),
    ("ULD ← Qwen3", "qwen3", "uld"),
    ("GOLD ← Qwen3", "qwen3", "gold"),
    ("P-KL ← Qwen3", "qwen3", "p_kl"),
    ("GOLD ← o200k", "o200k", "gold"),
    ("H-KL ← o200k", "o200k", "h_kl"),
]
TEACHERS = ("qwen3", "o200k")
CODE_VERSION = 1  # bump when training code changes what a cached teacher would be


@dataclass
class DemoConfig:
    """Every setting of a demo run (see ``xtoken demo --help``)."""

    n_train: int = 4000
    n_eval: int = 500
    min_items: int = 1
    max_items: int = 1
    teacher_steps: int = 400
    student_steps: int = 300
    batch: int = 32
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    size: ModelSize = field(default_factory=ModelSize)
    teacher_size: ModelSize = field(default_factory=ModelSize)
    seed: int = 1234
    eval_every: int = 25
    n_eval_curve: int = 200
    workers: int = 2
    tp: int = 1

    def teacher_key(self, teacher: str, fingerprints: dict[str, str]) -> str:
        """Content hash of everything that determines a teacher's weights."""
        d = {
            "teacher": teacher, "n_train": self.n_train, "items": [self.min_items, self.max_items], "steps": self.teacher_steps,
            "batch": self.batch, "lr": self.teacher_lr, "size": asdict(self.teacher_size), "seed": self.seed, "tp": self.tp,
            "fp": fingerprints, "v": CODE_VERSION,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


FULL = DemoConfig()
FAST = DemoConfig(n_train=1500, n_eval=100, teacher_steps=150, student_steps=12, eval_every=6, n_eval_curve=50)


def _init_worker(queue: Any) -> None:
    from nemo_xtoken.demo import train

    train._SHARED["queue"] = queue


def _run_in_pool(jobs: list[Job], workers: int, queue: Any) -> list[dict[str, Any]]:
    """Run jobs on ``workers`` forked processes (a fresh process per job), results in job order."""
    from nemo_xtoken.demo.train import run_job

    if jobs and jobs[0].tp > 1:  # each job spawns its own tp gloo ranks (pool workers cannot fork)
        return [run_job(j) for j in jobs]
    if workers <= 1 or len(jobs) == 1:
        ctx = mp.get_context("fork")
        out = []
        for j in jobs:  # still a fresh process per job: clean gloo/Megatron state
            with ctx.Pool(1, initializer=_init_worker, initargs=(queue,), maxtasksperchild=1) as pool:
                out.append(pool.apply(run_job, (j,)))
        return out
    ctx = mp.get_context("fork")
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(queue,), maxtasksperchild=1) as pool:
        return pool.map(run_job, jobs, chunksize=1)


class _Progress:
    """tqdm bars in the parent, fed by the workers' queue (one bar per job)."""

    def __init__(self, jobs: list[Job], queue: Any, disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.queue = queue
        self.bars = {j.name: tqdm(total=j.steps, desc=f"{j.name:<16}", position=i, leave=True, disable=disable, unit="step") for i, j in enumerate(jobs)}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        import queue as qmod

        while not self._stop.is_set():
            try:
                name, step, total, info = self.queue.get(timeout=0.2)
            except (qmod.Empty, EOFError, OSError):
                continue
            bar = self.bars.get(name)
            if bar is not None:
                bar.update(step - bar.n)
                if "loss" in info:
                    bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        for b in self.bars.values():
            b.n = b.total
            b.refresh()
            b.close()


def _preimport() -> None:
    """Import Megatron-core once in the parent: forked workers inherit it instead of each paying ~5–10 s."""
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401

    import modelopt.torch.distill.plugins.megatron  # noqa: F401
    import nemo_xtoken.integration.distill  # noqa: F401  (imports ModelOpt's distill)
    import nemo_xtoken.parallel  # noqa: F401
    import nemo_xtoken.megatron_cpu  # noqa: F401


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Build the data, train (or load) both teachers, train the six students; return every figure."""
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.demo import train
    from nemo_xtoken.demo.data import build_demo_data
    from nemo_xtoken.vocab import cached_projection, load_tokenizer

    t_start = time.perf_counter()
    _preimport()
    log(f"imports: {time.perf_counter() - t_start:.1f} s")
    student = load_tokenizer(tokenizer_path("llama3"))
    toks = {n: load_tokenizer(tokenizer_path(n)) for n in TEACHERS}
    teachers = {n: (toks[n], cached_projection(student, toks[n])) for n in TEACHERS}
    data = build_demo_data(student, teachers, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed % 1000,
                           min_items=cfg.min_items, max_items=cfg.max_items)
    t_data = time.perf_counter() - t_start
    log(f"data: {len(data.train_problems)} training / {len(data.eval_problems)} held-out problems, e.g. {data.eval_problems[0].text!r}")
    log("vocabularies reduced to the corpus' tokens (same for every method): " + ", ".join(f"{k} {v}" for k, v in data.summary().items() if k.endswith("_vocab")))
    queue = mp.get_context("fork").Queue()

    def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
        """Train ``jobs`` in the worker pool with one progress bar each."""
        bars = _Progress(jobs, queue, disable=not progress)
        try:
            return _run_in_pool(jobs, cfg.workers, queue)
        finally:
            bars.close()

    train.set_shared(data, queue)

    # ---- teachers (cached by content hash)
    tdir = cache_dir() / "demo"
    tdir.mkdir(parents=True, exist_ok=True)
    fps = {"llama3": student.fingerprint, **{n: toks[n].fingerprint for n in TEACHERS}}
    paths = {n: tdir / f"teacher-{n}-{cfg.teacher_key(n, fps)}.safetensors" for n in TEACHERS}
    metas = {n: p.with_suffix(".json") for n, p in paths.items()}
    todo = [n for n in TEACHERS if not (paths[n].is_file() and metas[n].is_file())]
    teacher_results: dict[str, Any] = {}
    for n in TEACHERS:
        if n not in todo:
            teacher_results[n] = {**json.loads(metas[n].read_text()), "cached": True}
            log(f"teacher {n}: cached ({paths[n].name}), held-out exact {teacher_results[n]['exact']:.1%}")
    if todo:
        jobs = [
            Job(name=f"teacher {n}", kind="teacher", teacher=n, loss=None, steps=cfg.teacher_steps, batch=cfg.batch, lr=cfg.teacher_lr,
                size=cfg.teacher_size, seed=cfg.seed + 1, eval_every=cfg.eval_every, n_eval_curve=cfg.n_eval_curve,
                save_to=str(paths[n]) + ".tmp", tp=cfg.tp)
            for n in todo
        ]
        log(f"training teacher(s) {', '.join(todo)} (once; cached afterwards)")
        res = run_jobs(jobs)
        log(f"teacher phase: {time.perf_counter() - t_start - t_data:.1f} s")
        for n, r in zip(todo, res):
            Path(str(paths[n]) + ".tmp").replace(paths[n])
            metas[n].write_text(json.dumps(r))
            teacher_results[n] = {**r, "cached": False}
            log(f"teacher {n}: held-out exact {r['exact']:.1%} ({r['train_seconds']:.0f} s)")
    t_teachers = time.perf_counter() - t_start - t_data

    # ---- students: same init (seed), same data order, one method each
    jobs = [
        Job(name=label, kind="student", teacher=tname, loss=loss, steps=cfg.student_steps, batch=cfg.batch, lr=cfg.student_lr,
            size=cfg.size, seed=cfg.seed, eval_every=cfg.eval_every, n_eval_curve=cfg.n_eval_curve,
            teacher_weights=str(paths[tname]), teacher_size=cfg.teacher_size, tp=cfg.tp)
        for label, tname, loss in METHODS
    ]
    log(f"training {len(jobs)} students (Llama-3 ids, same initialization, {cfg.workers} at a time)")
    res = run_jobs(jobs)
    students = {j.name: r for j, r in zip(jobs, res)}
    total = time.perf_counter() - t_start
    return {
        "config": asdict(cfg),
        "data": data.summary(),
        "examples": [p.text for p in data.eval_problems[:3]],
        "teachers": teacher_results,
        "students": students,
        "methods": [{"label": l, "teacher": t, "loss": s} for l, t, s in METHODS],
        "seconds": {"data": t_data, "teachers": t_teachers, "students": total - t_data - t_teachers, "total": total},
    }
