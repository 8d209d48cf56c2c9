"""The demo's driver: corpora, cached teachers, the students of every method and seed, in parallel workers.

Teachers are trained once and cached under ``$XTOKEN_CACHE/demo/teacher-<name>-<hash>.safetensors``;
the hash covers everything that determines the weights (corpus, sizes, steps, learning rate, seed,
tokenizer fingerprints, code version), so a changed setting retrains and an unchanged one reuses —
also across ``--seeds`` (the seeds vary the students' initialization and data order, not the
teachers).
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

from nemo_xtoken.demo.train import Job, ModelSize, TeacherUse
from nemo_xtoken.errors import XTokenError

__all__ = ["DemoConfig", "Method", "METHODS", "EXTRA_METHODS", "TEACHERS", "run_demo", "FAST", "FULL", "teacher_gate", "sampler_usage",
           "TeacherGateError"]


@dataclass(frozen=True)
class Method:
    """A student: its key (``--methods``), label, teachers (none = CE only), whether W is learned with it,
    and its own fixed KD weight (None: the run's weighting, dynamic scaling unless ``--kd-weight``)."""

    key: str
    label: str
    teachers: tuple[TeacherUse, ...] = ()
    learnable_w: bool = False
    kd_weight: float | None = None
    in_default: bool = True  # in the run without --methods (make demo); False: --methods only (time budget)


METHODS: list[Method] = [
    Method("ce", "CE only"),
    Method("kd_llama3", "KD ← Llama-3 (same tokenizer)", (TeacherUse("llama3", "kl"),)),
    Method("uld_qwen3", "ULD ← Qwen3", (TeacherUse("qwen3", "uld"),), in_default=False),
    Method("gold_qwen3", "GOLD ← Qwen3", (TeacherUse("qwen3", "gold"),)),
    Method("pkl_qwen3", "P-KL ← Qwen3", (TeacherUse("qwen3", "p_kl"),)),
    Method("pkl_learned_w_qwen3", "P-KL ← Qwen3, learnable W", (TeacherUse("qwen3", "p_kl"),), learnable_w=True, in_default=False),
    Method("gold_o200k", "GOLD ← o200k", (TeacherUse("o200k", "gold"),)),
    Method("hkl_o200k", "H-KL ← o200k", (TeacherUse("o200k", "h_kl"),)),
    Method("two_teachers", "H-KL ← o200k 0.8 + KL ← Llama-3 0.2", (TeacherUse("o200k", "h_kl", 0.8), TeacherUse("llama3", "kl", 0.2))),
]
#: selectable with ``--methods`` only (not in the default run, which keeps ``make demo`` within its time budget;
#: so are the METHODS with ``in_default=False``: with one pass over 12,800 stories the teachers run live, and
#: seven methods fit the 10 minutes on two idle cores — docs/demo.md, "Time, load and determinism")
EXTRA_METHODS: list[Method] = [
    Method("partkl_qwen3", "partition-KL ← Qwen3", (TeacherUse("qwen3", "partition_kl"),)),
    Method("partkl_o200k", "partition-KL ← o200k", (TeacherUse("o200k", "partition_kl"),)),
    # the paper's Table 4 (dynamic scaling beats fixed KD weights), on P-KL ← Qwen3: CE + w·KD
    *[Method(f"pkl_qwen3_w{w:g}", f"P-KL ← Qwen3, fixed w={w:g}", (TeacherUse("qwen3", "p_kl"),), kd_weight=w) for w in (0.5, 1.0, 2.0)],
]
#: teacher name → tokenizer (``nemo_xtoken.assets`` name); llama3 is the student's own tokenizer (no W)
TEACHERS = ("qwen3", "o200k", "llama3")
CODE_VERSION = 2  # bump when training code changes what a cached teacher would be


@dataclass
class DemoConfig:
    """Every setting of a demo run (see ``xtoken demo --help``)."""

    n_teacher_stories: int = 12800
    n_student_stories: int = 12800  # at least: grown to student_steps x batch (one story per sample, none drawn twice)
    n_eval_stories: int = 300
    corpus_seed: int = 0
    seq_length: int = 48
    teacher_seq_length: int = 56
    teacher_steps: int = 800
    # per teacher: Qwen3 splits numerals into digits, and its 800-step teacher answered 7 % of the add answers
    # (CE only: 46 %); at 2,400 steps 82 % (measured 2026-12-07, docs/demo.md) — the gate needs it stronger
    teacher_steps_by: tuple[tuple[str, int], ...] = (("qwen3", 2400),)
    student_steps: int = 800
    batch: int = 16
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    w_lr: float = 3e-3
    size: ModelSize = field(default_factory=ModelSize)
    teacher_size: ModelSize = field(default_factory=lambda: ModelSize(hidden=128, layers=2, heads=4, ffn=512))
    seeds: tuple[int, ...] = (1,)
    teacher_seed: int = 1000
    eval_every: int = 200
    n_eval_curve: int = 100
    workers: int = 2
    tp: int = 1
    methods: tuple[str, ...] = ()  # method keys to run (empty: all)
    kd_weight: float | None = None  # None: dynamic scaling (the paper's); a number w: fixed CE + w·KD
    live_teachers: bool = False  # recompute the frozen teachers' logits at every student step (default: once per story, MemoTeacher)
    teacher_gate: bool = True  # stop before any KD student unless every teacher beats CE only in every answer category

    def steps_of(self, teacher: str) -> int:
        """A teacher's training steps (``teacher_steps`` unless ``teacher_steps_by`` names it)."""
        return dict(self.teacher_steps_by).get(teacher, self.teacher_steps)

    def student_stories(self) -> int:
        """Stories in the students' corpus: enough for every sample of the budget to be a story not drawn before."""
        return max(self.n_student_stories, self.student_steps * self.batch)

    def teacher_key(self, teacher: str, fingerprints: dict[str, str]) -> str:
        """Content hash of everything that determines a teacher's weights."""
        d = {
            "teacher": teacher, "corpus": [self.n_teacher_stories, self.student_stories(), self.n_eval_stories, self.corpus_seed],
            "seq": [self.seq_length, self.teacher_seq_length], "steps": self.steps_of(teacher), "batch": self.batch,
            "lr": self.teacher_lr, "size": asdict(self.teacher_size), "seed": self.teacher_seed, "tp": self.tp,
            "fp": fingerprints, "v": CODE_VERSION,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def selected(self) -> list[Method]:
        """The methods this run trains."""
        if not self.methods:
            return [m for m in METHODS if m.in_default]
        known = {m.key: m for m in METHODS + EXTRA_METHODS}
        bad = [x for x in self.methods if x not in known]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {', '.join(known)}")
        return [m for m in METHODS + EXTRA_METHODS if m.key in self.methods]


FULL = DemoConfig()
FAST = DemoConfig(
    n_teacher_stories=400, n_student_stories=150, n_eval_stories=40, teacher_steps=40, student_steps=8, batch=8,
    teacher_size=ModelSize(hidden=32, layers=1, heads=2, ffn=64), size=ModelSize(hidden=32, layers=1, heads=2, ffn=64),
    eval_every=4, n_eval_curve=30, teacher_steps_by=(),
    teacher_gate=False,  # seconds of training: every model answers ~0 %, a gate would only stop the smoke test
)

_KINDS = ("copy", "add", "mul")


class TeacherGateError(XTokenError):
    """A teacher is not stronger than the CE-only student in some answer category (see :func:`teacher_gate`)."""


def teacher_gate(teachers: dict[str, dict[str, Any]], ce_students: dict[str, dict[str, Any]]) -> list[str]:
    """Every teacher must answer more held-out answers exactly than the CE-only student, in every category.

    ``teachers``: name → result (``exact_copy``, ``exact_add``, ``exact_mul``); ``ce_students``: seed →
    the CE-only student's result.  Compared against the best CE-only seed (strictly greater).
    Returns one line per failure, naming the teacher, the category and both figures (empty: passed).
    """
    bad = []
    for name, t in teachers.items():
        for kind in _KINDS:
            k = f"exact_{kind}"
            seed, best = max(((s, float(r[k])) for s, r in ce_students.items()), key=lambda x: x[1])
            if not float(t[k]) > best:
                bad.append(f"teacher {name} answers {100 * float(t[k]):.1f}% of the held-out {kind} answers exactly, "
                           f"the CE-only student (seed {seed}) {100 * best:.1f}%: a teacher must be stronger in every category")
        # a teacher without a category's figure would raise KeyError above: results always carry all three
    return bad


def sampler_usage(samples: Any, seed: int, n_samples: int) -> dict[str, Any]:
    """What the students' sampler draws for ``seed`` over ``n_samples`` samples (the training budget).

    ``epochs`` = samples drawn / stories in the corpus (passes over the students' corpus);
    ``max_draws`` = the most times one story is drawn (1: no story seen twice).
    """
    import collections

    ds = samples.order(seed)
    counts = collections.Counter(ds.piece_index(i) for i in range(n_samples))
    return {"stories": len(samples), "drawn": n_samples, "distinct": len(counts), "epochs": n_samples / len(samples),
            "max_draws": max(counts.values()) if counts else 0}


def _init_worker(queue: Any) -> None:
    from nemo_xtoken.demo import train

    train._SHARED["queue"] = queue


def _run_scheduled(jobs: list[Job], needs: list[set[str]], provides: list[str | None], done: set[str], workers: int, queue: Any,
                   on_result: Any) -> list[dict[str, Any]]:
    """Run jobs on ``workers`` forked processes (a fresh process per job) as soon as their teachers exist.

    ``needs[i]``: the teachers job ``i`` reads; ``provides[i]``: the teacher job ``i`` trains (or
    None); ``done``: teachers already available.  Among the jobs that can start, earlier ones go
    first (teachers, then students longest first), so no worker idles while a teacher still trains.
    ``on_result(i, result)`` runs in this process when job ``i`` ends (a teacher is saved there
    before any student can start on it).  Results in job order; each job's figures do not depend
    on the schedule (own process, own seeds).
    """
    import queue as qmod

    from nemo_xtoken.demo.train import run_job

    ctx = mp.get_context("fork")
    if any(j.tp > 1 for j in jobs):  # a tp > 1 job spawns its own gloo ranks (pool workers cannot fork): one job at a time
        out = []
        for i, j in enumerate(jobs):  # teachers come first in ``jobs``
            if j.tp > 1:
                out.append(run_job(j))
            else:  # still a fresh process (the parent keeps no gloo/Megatron state)
                with ctx.Pool(1, initializer=_init_worker, initargs=(queue,), maxtasksperchild=1) as pool:
                    out.append(pool.apply(run_job, (j,)))
            on_result(i, out[-1])
        return out
    finished: qmod.Queue = qmod.Queue()
    results: dict[int, dict[str, Any]] = {}
    have, started = set(done), set()
    with ctx.Pool(max(1, min(workers, len(jobs))), initializer=_init_worker, initargs=(queue,), maxtasksperchild=1) as pool:
        while len(results) < len(jobs):
            for i, j in enumerate(jobs):
                if i not in started and needs[i] <= have:
                    started.add(i)
                    pool.apply_async(run_job, (j,), callback=lambda r, i=i: finished.put((i, r, None)),
                                     error_callback=lambda e, i=i: finished.put((i, None, e)))
            if len(started) == len(results):
                missing = sorted({t for i in range(len(jobs)) if i not in started for t in needs[i]} - have)
                raise RuntimeError(f"no job can start: teachers {missing} are neither cached nor trained in this run")
            i, r, err = finished.get()
            if err is not None:
                raise RuntimeError(f"demo job {jobs[i].name!r} failed: {err}") from err
            on_result(i, r)
            results[i] = r
            if provides[i] is not None:
                have.add(provides[i])
    return [results[i] for i in range(len(jobs))]


class _Progress:
    """tqdm bars in the parent, fed by the workers' queue (one bar per job)."""

    def __init__(self, jobs: list[Job], queue: Any, disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.queue = queue
        w = max(len(j.name) for j in jobs)
        self.bars = {j.name: tqdm(total=j.steps, desc=f"{j.name:<{w}}", position=i, leave=True, disable=disable, unit="step") for i, j in enumerate(jobs)}
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
    import nemo_xtoken.cpu.megatron  # noqa: F401
    import nemo_xtoken.parallel  # noqa: F401


def student_name(label: str, seed: int, n_seeds: int) -> str:
    """A job's display name (the seed appears when there are several)."""
    return label if n_seeds == 1 else f"{label} [seed {seed}]"


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print, on_partial: Any = None,
             cells: list[tuple[int, str, Method, dict[str, Any]]] | None = None, on_student: Any = None) -> dict[str, Any]:
    """Build the corpora, train (or load) the teachers, train every method's student for every seed; return every figure.

    ``on_partial(results)``, if given, is called after every student job with the results so far:
    the methods whose students have finished for every seed (the same structure as the return value).
    ``cells`` (the P-KL study, :mod:`nemo_xtoken.demo.study`): instead of every method for every seed,
    exactly these students, in this order: ``(seed, key, method, Job overrides)``; ``on_student(key
    pair, result)`` runs in this process as each student ends.
    """
    from nemo_xtoken.assets import cache_dir, tokenizer_path
    from nemo_xtoken.demo import train
    from nemo_xtoken.demo.corpus import story_splits
    from nemo_xtoken.demo.data import build_demo_data
    from nemo_xtoken.vocab import cached_projection, load_tokenizer

    t_start = time.perf_counter()
    methods = cfg.selected() if cells is None else list({id(c[2]): c[2] for c in cells}.values())
    _preimport()
    log(f"imports: {time.perf_counter() - t_start:.1f} s")
    student = load_tokenizer(tokenizer_path("llama3"))
    toks = {n: load_tokenizer(tokenizer_path(n)) for n in TEACHERS}
    teachers = {n: (toks[n], None if n == "llama3" else cached_projection(student, toks[n])) for n in TEACHERS}
    t_corpus, s_corpus, e_corpus = story_splits(cfg.n_teacher_stories, cfg.student_stories(), cfg.n_eval_stories, seed=cfg.corpus_seed)
    data = build_demo_data(student, teachers, t_corpus, s_corpus, e_corpus, seq_length=cfg.seq_length, teacher_seq_length=cfg.teacher_seq_length)
    for n in sorted({t.side for m in methods for t in m.teachers if t.loss == "partition_kl"}):  # partition-KL: spellings, reduced
        from nemo_xtoken.demo.vocab_subset import reduce_spellings
        from nemo_xtoken.vocab.spellings import cached_spellings

        data.sides[n].spellings = reduce_spellings(cached_spellings(student, toks[n]), data.student_subset, data.sides[n].subset)
    t_data = time.perf_counter() - t_start
    summ = data.summary()
    # the regime: what the students' sampler really draws over the step budget, per seed (the same for every method)
    usage = {str(seed): sampler_usage(next(iter(data.sides.values())).student_train, seed, cfg.student_steps * cfg.batch) for seed in cfg.seeds}
    summ["student_sampler"] = usage
    summ["student_epochs"] = max(u["epochs"] for u in usage.values())
    summ["student_max_draws"] = max(u["max_draws"] for u in usage.values())
    # a story drawn once makes a teacher memo pure memory (GBs at 12,800 stories): run the teachers live then
    live = cfg.live_teachers or summ["student_max_draws"] <= 1
    log(f"corpora: {len(t_corpus)} teacher / {len(s_corpus)} student / {len(e_corpus)} held-out stories "
        f"({summ['eval_answers']} held-out answers), e.g. {e_corpus[0].text!r}")
    log(f"students draw {cfg.student_steps} x {cfg.batch} = {cfg.student_steps * cfg.batch} stories: {summ['student_epochs']:.3g} passes "
        f"over their corpus, no story more than {summ['student_max_draws']} time(s)")
    log("vocabularies reduced to the corpora's tokens (same for every method): " + ", ".join(f"{k} {v}" for k, v in summ.items() if k.endswith("_vocab")))
    queue = mp.get_context("fork").Queue()

    train.set_shared(data, queue)

    # ---- teachers (cached by content hash) and students, in one schedule: a student starts once its teachers exist
    needed = [n for n in TEACHERS if any(t.side == n for m in methods for t in m.teachers)]
    tdir = cache_dir() / "demo"
    tdir.mkdir(parents=True, exist_ok=True)
    fps = {"llama3": student.fingerprint, **{n: toks[n].fingerprint for n in TEACHERS}}
    paths = {n: tdir / f"teacher-{n}-{cfg.teacher_key(n, fps)}.safetensors" for n in TEACHERS}
    metas = {n: p.with_suffix(".json") for n, p in paths.items()}
    todo = [n for n in needed if not (paths[n].is_file() and metas[n].is_file())]
    teacher_results: dict[str, Any] = {}
    for n in needed:
        if n not in todo:
            teacher_results[n] = {**json.loads(metas[n].read_text()), "cached": True}
            log(f"teacher {n}: cached ({paths[n].name}), held-out exact {teacher_results[n]['exact']:.1%}")
    jobs: list[Job] = [
        Job(name=f"teacher {n}", kind="teacher", side=n, steps=cfg.steps_of(n), batch=cfg.batch, lr=cfg.teacher_lr,
            size=cfg.teacher_size, seed=cfg.teacher_seed, data_seed=cfg.teacher_seed, eval_every=cfg.eval_every,
            n_eval_curve=cfg.n_eval_curve, save_to=str(paths[n]) + ".tmp", tp=cfg.tp)
        for n in todo
    ]
    keys: list[tuple[int, str] | None] = [None] * len(jobs)
    students_jobs = []
    # method by method, every seed of a method before the next method (a run cut short has whole methods);
    # the order of --methods when given, so the comparisons that matter most can go first
    order = sorted(methods, key=lambda m: cfg.methods.index(m.key)) if cfg.methods else methods
    for m in order:
        for seed in cfg.seeds:  # per seed: same initialization and data order for every method
            students_jobs.append(((seed, m.label), Job(
                name=student_name(m.label, seed, len(cfg.seeds)), kind="student", teachers=m.teachers, learnable_w=m.learnable_w,
                steps=cfg.student_steps, batch=cfg.batch, lr=cfg.student_lr, w_lr=cfg.w_lr, size=cfg.size, seed=seed, data_seed=seed,
                eval_every=cfg.eval_every, n_eval_curve=cfg.n_eval_curve, teacher_weights={t.side: str(paths[t.side]) for t in m.teachers},
                teacher_size=cfg.teacher_size, teacher_seed=cfg.teacher_seed, tp=cfg.tp, live_teachers=live,
                kd_weight=m.kd_weight if m.kd_weight is not None else cfg.kd_weight,
            )))
    if not cfg.methods:
        students_jobs.sort(key=lambda kj: -len(kj[1].teachers))  # longest first (two teachers), so the workers finish together
    if cells is not None:
        seeds = sorted({c[0] for c in cells})
        students_jobs = [((seed, key), Job(
            name=student_name(key, seed, len(seeds)), kind="student", teachers=m.teachers, learnable_w=m.learnable_w,
            steps=cfg.student_steps, batch=cfg.batch, lr=cfg.student_lr, w_lr=cfg.w_lr, size=cfg.size, seed=seed, data_seed=seed,
            eval_every=cfg.eval_every, n_eval_curve=cfg.n_eval_curve, teacher_weights={t.side: str(paths[t.side]) for t in m.teachers},
            teacher_size=cfg.teacher_size, teacher_seed=cfg.teacher_seed, tp=cfg.tp, live_teachers=live,
            **{"kd_weight": cfg.kd_weight, **over},
        )) for seed, key, m, over in cells]
    for k, j in students_jobs:
        jobs.append(j)
        keys.append(k)
    needs = [set() if j.kind == "teacher" else {t.side for t in j.teachers} for j in jobs]
    provides = [j.side if j.kind == "teacher" else None for j in jobs]
    t_phase = time.perf_counter()
    seconds: dict[str, float] = {}

    def on_result(i: int, r: dict[str, Any]) -> None:
        j = jobs[i]
        if j.kind == "teacher":
            n = j.side
            Path(str(paths[n]) + ".tmp").replace(paths[n])
            metas[n].write_text(json.dumps(r))
            teacher_results[n] = {**r, "cached": False}
            seconds[f"teacher {n} done"] = time.perf_counter() - t_start
            log(f"teacher {n}: held-out exact {r['exact']:.1%} ({r['train_seconds']:.0f} s; cached for later runs)")
        else:
            if on_student is not None:
                on_student(keys[i], r)
            if on_partial is not None:
                res[i] = r
                on_partial(assemble())

    log(f"training {len(todo)} teacher(s) ({', '.join(todo) or 'all cached'}) and {len(students_jobs)} students "
        f"({len(methods)} methods x {len(cfg.seeds)} seed(s); Llama-3 ids), {cfg.workers} jobs at a time")
    # two phases: the teachers and the CE-only students first, then the teacher gate, then the KD students
    first = [i for i, j in enumerate(jobs) if j.kind == "teacher" or not j.teachers]
    second = [i for i in range(len(jobs)) if i not in first]
    res: list[Any] = [None] * len(jobs)
    gate: dict[str, Any] = {"checked": False}

    def assemble() -> dict[str, Any]:
        """Every figure so far: the methods whose students finished for every seed."""
        students: dict[str, dict[str, Any]] = {str(seed): {} for seed in cfg.seeds}
        for k, r in zip(keys, res):
            if k is not None and r is not None:
                students[str(k[0])][k[1]] = r
        done = [m for m in methods if all(m.label in students[str(seed)] for seed in cfg.seeds)]
        students = {s: {m.label: d[m.label] for m in done} for s, d in students.items()}
        return {
            "config": asdict(cfg),
            "data": summ,
            "teacher_gate": gate,
            "examples": [s.text for s in e_corpus[:2]],
            "teachers": {n: teacher_results[n] for n in needed if n in teacher_results},  # a fixed order, whatever the schedule
            "students": students,
            "methods": [{"key": m.key, "label": m.label, "teachers": [asdict(t) for t in m.teachers], "learnable_w": m.learnable_w,
                         "kd_weight": m.kd_weight} for m in done],
            "seconds": {"data": t_data, "training": time.perf_counter() - t_phase, "total": time.perf_counter() - t_start, **seconds},
        }

    bars = _Progress(jobs, queue, disable=not progress)
    try:
        for phase in (first, second):
            if not phase:
                continue
            if phase is second:
                ce = {str(k[0]): res[i] for i, k in enumerate(keys) if k is not None and not jobs[i].teachers}
                if not ce:
                    log("teacher gate: not checked (no CE-only student in --methods)")
                elif teacher_results:
                    failures = teacher_gate({n: teacher_results[n] for n in needed}, ce)
                    gate = {"checked": cfg.teacher_gate, "failures": failures}
                    if failures and cfg.teacher_gate:
                        raise TeacherGateError("; ".join(failures) + " — no KD student trained (raise teacher_steps or n_teacher_stories "
                                               "in nemo_xtoken/demo/run.py FULL, or choose a larger teacher_size)")
                    log("teacher gate: " + ("every teacher beats CE only in copy, add and mul" if not failures
                                            else "off (" + "; ".join(failures) + ")"))
            r = _run_scheduled([jobs[i] for i in phase], [needs[i] for i in phase], [provides[i] for i in phase],
                               {n for n in needed if n in teacher_results}, cfg.workers, queue,
                               lambda k, r, phase=phase: on_result(phase[k], r))
            for i, x in zip(phase, r):
                res[i] = x
    finally:
        bars.close()
    return assemble()
