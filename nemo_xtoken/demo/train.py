"""Training jobs of the demo: tiny Megatron ``GPTModel``s on gloo, one job per process.

A job is a teacher (plain CE on every token of its own tokenization of the teachers' corpus) or a
student (Llama-3 ids, every token of the students' corpus) trained with CE only or with CE + the
KD loss of one or two teachers.  A KD student is ModelOpt's ``DistillationModel``, built by
:func:`~nemo_xtoken.integration.distill.convert_to_xtoken_distillation_model` (the frozen teachers
run on their own ids through ``teacher_inputs``) with
:class:`~nemo_xtoken.integration.distill.XTokenLogitsLoss` as criterion (vocab-sharded, on
``nemo_xtoken.parallel``) and :class:`~nemo_xtoken.integration.distill.XTokenLossBalancer` (dynamic
scaling) combining it with the student's CE in ``compute_kd_loss(student_loss=ce, alignments=[...])``.
The CE-only student is a plain ``GPTModel`` (no teacher).  Every student of one seed starts from the
same weights and reads the same stories in the same order.  Jobs run in forked worker processes
(one thread each, one gloo group of ``tp`` ranks each) and report progress through a queue.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["ModelSize", "TeacherUse", "Job", "run_job", "set_shared"]


@dataclass(frozen=True)
class ModelSize:
    """Sizes and initialization of a tiny Llama-style Megatron GPT (RMSNorm, SwiGLU, RoPE)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    embed_std: float = 0.02  # input embeddings (Megatron's default 0.02); see _build
    tied: bool = True  # output layer = input embeddings


@dataclass(frozen=True)
class TeacherUse:
    """One teacher of a student: which (a side of the demo data), its KD loss and its weight α."""

    side: str
    loss: str
    weight: float = 1.0


@dataclass
class Job:
    """One training run: a teacher (``side``) or a student (``teachers``: none = CE only)."""

    name: str
    kind: str  # "teacher" | "student"
    side: str = ""  # teacher job: which teacher
    teachers: tuple[TeacherUse, ...] = ()
    learnable_w: bool = False  # P-KL with W trained jointly (the paper's best P-KL run)
    steps: int = 100
    batch: int = 16
    lr: float = 3e-3
    w_lr: float = 3e-3
    size: ModelSize = field(default_factory=ModelSize)
    seed: int = 1  # initialization
    data_seed: int = 1  # order of the training stories
    eval_every: int = 50
    n_eval_curve: int = 100
    teacher_weights: dict[str, str] = field(default_factory=dict)  # side → safetensors (students)
    teacher_size: ModelSize | None = None
    teacher_seed: int = 1
    save_to: str | None = None  # where a teacher job writes its weights
    tp: int = 1
    kd_weight: float | None = None  # None: dynamic scaling CE + sg(CE/|KD|)·KD; a number w: fixed CE + w·KD
    live_teachers: bool = False  # students: recompute the frozen teachers' logits at every step (no MemoTeacher memo)
    kd_scale_max: float | None = None  # dynamic scaling only: cap on CE/|KD| (distill.kd_scale_max)
    merge: str = "chain"  # the KD loss's chunk merge (nemo_xtoken.align.merge.MERGES)
    w_top1: bool = False  # P-KL: every student row of W keeps only its largest entry, weight 1 (the P-KL study)
    answer_probe: bool = False  # teacher-forced log p(true answer) and same-first-digit mass (nemo_xtoken.demo.study)


_SHARED: dict[str, Any] = {}


def set_shared(data: Any, queue: Any = None) -> None:
    """Give the workers the demo data (inherited through ``fork``) and the progress queue."""
    _SHARED["data"] = data
    _SHARED["queue"] = queue


def _report(job: str, step: int, total: int, **info: Any) -> None:
    q = _SHARED.get("queue")
    if q is not None:
        q.put((job, step, total, info))


# ---- models ---------------------------------------------------------------------------------------


def _build(vocab: int, size: ModelSize, seq: int, seed: int):
    from nemo_xtoken.demo.data import pad_to
    from nemo_xtoken.cpu.megatron import TinyGPTSpec, build_tiny_gpt, tiny_gpt_config

    spec = TinyGPTSpec(
        vocab_size=pad_to(vocab),
        max_sequence_length=seq,
        num_layers=size.layers,
        hidden_size=size.hidden,
        num_attention_heads=size.heads,
        ffn_hidden_size=size.ffn,
        share_embeddings_and_output_weights=size.tied,
    )
    model = build_tiny_gpt(spec, seed=seed, config=tiny_gpt_config(spec))
    if size.embed_std != 0.02:
        # Input embeddings drawn with their own std (in full, then this rank's rows: any TP size gets the
        # same weights).  Copying a numeral needs its embedding to stay distinct from the others.
        from megatron.core import parallel_state as ps

        w = model.embedding.word_embeddings.weight
        g = torch.Generator().manual_seed(seed + 7)
        full = torch.randn(spec.vocab_size, size.hidden, generator=g) * size.embed_std
        r, n = ps.get_tensor_model_parallel_rank(), w.shape[0]
        with torch.no_grad():
            w.copy_(full[r * n : (r + 1) * n])
    return model


def _mask(n: int) -> torch.Tensor:
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]


def _gather(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits (real ids only) from this rank's shard."""
    from nemo_xtoken.cpu.megatron import gather_vocab_parallel_logits

    return gather_vocab_parallel_logits(logits)[..., :vocab]


def _tensor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %."""
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---- evaluation -----------------------------------------------------------------------------------


def _categories(texts: list[str]) -> torch.Tensor:
    from nemo_xtoken.demo.data import CATEGORIES, token_category

    return torch.tensor([CATEGORIES.index(token_category(t)) for t in texts], dtype=torch.long)


@torch.no_grad()
def teacher_forced(model, samples: Any, n: int, side: str, vocab: int, cats: torch.Tensor, batch: int = 100) -> dict[str, float]:
    """Held-out next-token metrics over every token of ``n`` stories: CE, accuracy per target category, numeral mass.

    ``numeral_mass``: at the positions whose next token is a numeral, the probability the model puts on
    all numeral tokens together (GOLD and ULD move it elsewhere when numerals fall outside the
    common set: Proposition 1).  ``side``: ``"student"`` reads ``tokens``/``labels``/``loss_mask``,
    ``"teacher"`` the teacher fields.
    """
    from nemo_xtoken.demo.data import CATEGORIES

    tk, lb, mk = ("tokens", "labels", "loss_mask") if side == "student" else ("teacher_tokens", "teacher_targets", "teacher_loss_mask")
    ce_sum, n_tok, mass, n_num = 0.0, 0.0, 0.0, 0.0
    is_num = cats == CATEGORIES.index("numeral")
    hit = torch.zeros(len(CATEGORIES))
    cnt = torch.zeros(len(CATEGORIES))
    for i in range(0, n, batch):
        b = samples.rows(range(i, min(n, i + batch)))
        ids = b[tk]
        logits = _gather(model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), _mask(ids.shape[1])), vocab).float()
        lp = torch.log_softmax(logits, -1)
        m = b[mk].bool()
        tgt = b[lb]
        nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        ce_sum += float(nll[m].sum())
        n_tok += float(m.sum())
        ok = (lp.argmax(-1) == tgt)[m].float()
        c = cats[tgt[m]]
        hit += torch.zeros(len(CATEGORIES)).index_add(0, c, ok)
        cnt += torch.zeros(len(CATEGORIES)).index_add(0, c, torch.ones_like(ok))
        at_num = m & is_num[tgt]
        mass += float(lp.exp()[..., is_num].sum(-1)[at_num].sum())
        n_num += float(at_num.sum())
    out = {"ce": ce_sum / max(n_tok, 1), "numeral_mass": mass / max(n_num, 1)}
    for k, name in enumerate(CATEGORIES):
        out[f"acc_{name}"] = float(hit[k] / cnt[k]) if cnt[k] > 0 else float("nan")
    return out


def _decided(out: str, answer: str) -> bool:
    """Whether more generated text can still change ``exact`` for this answer (see :func:`greedy_answers`)."""
    if out.startswith(answer):
        return len(out) > len(answer)  # the character after the answer is known
    return not answer.startswith(out)  # diverged from the answer


@torch.no_grad()
def greedy_answers(model, prompts: Any, texts: list[str], vocab: int, n: int | None = None, max_new: int = 4, batch: int = 100,
                   full: int = 6) -> dict[str, Any]:
    """Greedy decoding after each prompt (the text before a held-out answer): exact digits, overall and per kind.

    Exact = the generated text starts with the answer's digits and no further digit follows.
    Prompts are decoded in batches of similar length (less padding), and a prompt stops once its
    outcome is decided (it left the answer, or the character after the answer is known), except the
    first ``full`` prompts, which decode all ``max_new`` tokens (the samples the results show).
    Each row's logits depend on its own ids only (causal attention, no cross-row op), so neither
    changes what is decoded beyond floating-point summation order.
    """
    ids_all = prompts.ids[:n] if n else prompts.ids
    answers_all = prompts.answers[: len(ids_all)]
    order = sorted(range(len(ids_all)), key=lambda i: len(ids_all[i]))
    gen: list[list[str]] = [[] for _ in ids_all]
    for c in range(0, len(order), batch):
        rows = order[c : c + batch]
        lens = torch.tensor([len(ids_all[i]) for i in rows])
        buf = torch.zeros(len(rows), int(lens.max()) + max_new, dtype=torch.long)
        for j, i in enumerate(rows):
            buf[j, : len(ids_all[i])] = torch.as_tensor(ids_all[i])
        cur = lens.clone()
        active = torch.arange(len(rows))
        for _ in range(max_new):
            if not active.numel():
                break
            m = int(cur[active].max())
            x = buf[active, :m]
            logits = _gather(model(x, torch.arange(m)[None].expand_as(x), _mask(m)), vocab)
            nxt = logits[torch.arange(len(active)), cur[active] - 1].argmax(-1)
            buf[active, cur[active]] = nxt
            cur[active] += 1
            keep = []
            for j, t in zip(active.tolist(), nxt.tolist()):
                i = rows[j]
                gen[i].append(texts[t])
                if i < full or not _decided("".join(gen[i]), answers_all[i]):
                    keep.append(j)
            active = torch.tensor(keep, dtype=torch.long)
    outs = ["".join(g) for g in gen]
    answers, kinds = answers_all, prompts.kinds[: len(outs)]
    ok = [o.startswith(a) and not o[len(a) : len(a) + 1].isdigit() for o, a in zip(outs, answers)]
    res: dict[str, Any] = {"exact": float(np.mean(ok)) if ok else float("nan"), "outputs": outs}
    for kind in sorted(set(kinds)):
        sel = [k == kind for k in kinds]
        res[f"exact_{kind}"] = float(np.mean([o for o, s in zip(ok, sel) if s]))
    return res


# ---- jobs -----------------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this (forked) process: init gloo + Megatron, train, evaluate; return curves and metrics."""
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, destroy_megatron_cpu, free_port, init_megatron_cpu, spawn

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if job.tp == 1:
        init_megatron_cpu(0, 1, tensor_model_parallel_size=1, seed=job.seed, port=free_port())
        try:
            with cpu_megatron_patches():
                return _train(job)
        finally:
            destroy_megatron_cpu()
    return spawn(_rank_entry, job.tp, job, timeout=3600)[0]


def _rank_entry(rank: int, world: int, job: Job) -> dict[str, Any]:
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, init_megatron_cpu

    torch.use_deterministic_algorithms(True)
    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=job.seed)
    with cpu_megatron_patches():
        return _train(job, quiet=rank != 0)


def _train(job: Job, quiet: bool = False) -> dict[str, Any]:
    from nemo_xtoken.cpu.megatron import clip_grad_norm_tp
    from nemo_xtoken.parallel import vocab_parallel_cross_entropy

    data = _SHARED["data"]
    t0, c0 = time.perf_counter(), time.process_time()
    teacher_job = job.kind == "teacher"
    distill = not teacher_job and bool(job.teachers)
    if teacher_job:
        side = data.sides[job.side]
        train_set, eval_set, sname = side.teacher_train, side.eval, "teacher"
        vocab, texts, prompts = side.vocab_size, side.token_texts, side.prompts
        model = _build(vocab, job.size, data.teacher_seq_length, job.seed)
    else:
        sides = [data.sides[t.side] for t in job.teachers] or [next(iter(data.sides.values()))]
        train_set, eval_set, sname = sides[0].student_train, sides[0].eval, "student"
        vocab, texts, prompts = data.student_vocab_size, data.student_texts, data.student_prompts
        model = _build(vocab, job.size, data.seq_length, job.seed)
    student_params = list(model.parameters())
    if distill:
        model = _distillation_model(job, model, data)
    fwd = _StudentOnly(model) if distill else model  # evaluation: the student alone
    cats = _categories(texts)
    w_params = [p for n, p in model.named_parameters() if p.requires_grad and "_loss_modules" in n] if distill else []
    groups = [{"params": student_params, "lr": job.lr, "weight_decay": 0.01}]
    if w_params:
        groups.append({"params": w_params, "lr": job.w_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    base_lr = [g["lr"] for g in groups]
    n_curve = min(job.n_eval_curve, len(eval_set))
    curves: dict[str, list] = {"step": [], "loss": [], "ce": [], "kd": [], "scale": [], "eval_step": [], "eval_ce": [], "eval_exact": []}
    probe = eval_set.rows(range(min(32, len(eval_set))))  # fixed held-out batch for the gradient diagnostics

    def evaluate(step: int) -> None:
        model.eval()
        m = teacher_forced(fwd, eval_set, n_curve, sname, vocab, cats)
        g = greedy_answers(fwd, prompts, texts, vocab, n=n_curve)
        model.train()
        curves["eval_step"].append(step)
        curves["eval_ce"].append(m["ce"])
        curves["eval_exact"].append(g["exact"])
        for k, v in m.items():
            if k.startswith("acc_"):
                curves.setdefault(f"eval_{k}", []).append(v)
        if distill:
            for k, v in _gradient_probe(model, probe, job, data, vocab, student_params).items():
                curves.setdefault(k, []).append(v)

    # A teacher's figures are its final held-out evaluation alone (nothing plots a teacher's curve),
    # so it skips the curve points: on a fresh machine that is ≈ 5 s of each teacher's ≈ 95.
    curve_points = not teacher_job
    model.train()
    for step in range(job.steps):
        if curve_points and step % job.eval_every == 0:
            evaluate(step)
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = _lr_at(step, job.steps, lr)
        if teacher_job:
            b = train_set.batch(step * job.batch, job.batch, job.data_seed)
            ids = b["teacher_tokens"]
            logits = model(ids, b["teacher_position_ids"], _mask(ids.shape[1]))
            ce = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["teacher_targets"].reshape(-1), vocab_size=vocab, mask=b["teacher_loss_mask"].reshape(-1))
            loss, kd, scale = ce, torch.zeros(()), torch.zeros(())
        elif not distill:
            b = train_set.batch(step * job.batch, job.batch, job.data_seed)
            ids = b["tokens"]
            logits = model(ids, b["position_ids"], _mask(ids.shape[1]))
            ce = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1), vocab_size=vocab, mask=b["loss_mask"].reshape(-1))
            loss, kd, scale = ce, torch.zeros(()), torch.zeros(())
        else:
            bs = [data.sides[t.side].student_train.batch(step * job.batch, job.batch, job.data_seed) for t in job.teachers]
            out = _distill_step(model, bs, vocab)
            loss, ce, kd, scale = out["kd_loss"], out["ce_loss"], out["logits_loss"], out["dynamic_scale"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_tp([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        curves["step"].append(step)
        curves["loss"].append(float(loss.detach()))
        curves["ce"].append(float(ce.detach()))
        curves["kd"].append(float(kd.detach()))
        curves["scale"].append(float(scale.detach()))
        if not quiet and (step % 10 == 0 or step + 1 == job.steps):
            _report(job.name, step + 1, job.steps, loss=curves["loss"][-1])
    if curve_points:
        evaluate(job.steps)
    model.eval()
    final = teacher_forced(fwd, eval_set, len(eval_set), sname, vocab, cats)
    greedy = greedy_answers(fwd, prompts, texts, vocab)
    result: dict[str, Any] = {
        "job": {k: v for k, v in asdict(job).items() if k not in ("save_to", "teacher_weights")},
        "curves": curves,
        **{k: v for k, v in greedy.items() if k != "outputs"},
        **{f"eval_{k}": v for k, v in final.items()},
        "samples": [{"prompt": _decode(prompts.ids[i], texts)[-60:], "answer": prompts.answers[i], "output": greedy["outputs"][i]} for i in range(6)],
        "train_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,  # this process's CPU time (wall depends on the machine's load)
    }
    if job.answer_probe:
        from nemo_xtoken.demo.study import answer_probe

        result["answer_probe"] = answer_probe(fwd, data, vocab, texts)
    if distill:
        result["eval_kd"] = _eval_kd(model, [data.sides[t.side].eval for t in job.teachers], len(eval_set), vocab)
        if w_params:
            result["w_drift"] = _w_drift(model)
    if teacher_job and job.save_to:
        from safetensors.torch import save_file

        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_rank() == 0:
            save_file(_tensor_state(model), job.save_to)
    return result


def _decode(ids: Any, texts: list[str]) -> str:
    return "".join(texts[int(i)] for i in ids)


def _load_teacher(path: str, side: Any, size: ModelSize, data: Any, seed: int):
    from safetensors.torch import load_file

    teacher = _build(side.vocab_size, size, data.teacher_seq_length, seed)
    state = load_file(path)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")]
    if bad or unexpected:
        raise RuntimeError(f"teacher weights {path} do not fit the model: missing {bad[:3]}, unexpected {unexpected[:3]}")
    return teacher


class MemoTeacher(torch.nn.Module):
    """A frozen teacher whose logits are computed once per distinct sample and then reused.

    The demo's students read the same 500 stories about 25 times; a frozen teacher (eval mode, no
    dropout) gives the same logits for the same story every epoch, so recomputing them is pure
    cost.  The memo is exact by construction: logits at position ``p`` of a causal model depend on
    ids ``0…p`` only, so a row's key is its ids without trailing padding (id 0) and a memo entry
    computed at width ``T_c`` serves every request of that row at width ``T ≤ T_c`` (a wider request
    recomputes it).  Rows are computed in the batch they first appear in, so the first epoch is the
    live teacher's computation itself.  Only the standard inputs (positions ``0…T-1``, the causal
    mask) are memoized; anything else runs the teacher live.  ``live=True`` disables the memo.
    """

    def __init__(self, teacher: torch.nn.Module, live: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        self.live = live
        self._memo: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def config(self):  # ModelOpt / the converter read the teacher's TransformerConfig
        return self.teacher.config

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.teacher.max_sequence_length

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        b, t = input_ids.shape
        standard = (not kw and not torch.is_grad_enabled() and torch.equal(position_ids, torch.arange(t).expand_as(input_ids))
                    and attention_mask.shape[-2:] == (t, t) and torch.equal(attention_mask.reshape(-1, t, t)[0], _mask(t)[0, 0]))
        if self.live or not standard:
            return self.teacher(input_ids, position_ids, attention_mask, **kw)
        keys = [_row_key(r) for r in input_ids]
        todo = [i for i, k in enumerate(keys) if k not in self._memo or self._memo[k].shape[0] < t]
        if todo:
            idx = torch.tensor(todo)
            out = self.teacher(input_ids[idx], position_ids[idx], attention_mask)
            for j, i in enumerate(todo):
                self._memo[keys[i]] = out[j].clone()
        self.misses += len(todo)
        self.hits += b - len(todo)
        return torch.stack([self._memo[k][:t] for k in keys])


def _row_key(row: torch.Tensor) -> bytes:
    """A row's ids without trailing padding (id 0): equal for one sample at any batch width."""
    nz = torch.nonzero(row, as_tuple=True)[0]
    n = int(nz[-1]) + 1 if nz.numel() else 0
    return row[:n].numpy().tobytes()


def _distillation_model(job: Job, student, data: Any):
    """ModelOpt's ``DistillationModel`` around the student: criterion = the job's X-Token loss(es), dynamic scaling."""
    from nemo_xtoken.integration.distill import convert_to_xtoken_distillation_model

    teachers = [MemoTeacher(_load_teacher(job.teacher_weights[t.side], data.sides[t.side], job.teacher_size or job.size, data, job.teacher_seed),
                            live=job.live_teachers) for t in job.teachers]
    crit, balancer = kd_criterion(job, data)
    return convert_to_xtoken_distillation_model(student, teachers, crit, balancer)


def kd_criterion(job: Job, data: Any):
    """The job's criterion (:class:`XTokenLogitsLoss`: its teachers' losses, W, merge) and balancer (weighting, scale cap)."""
    from nemo_xtoken.demo.data import pad_to
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, XTokenLossBalancer

    specs = []
    for t in job.teachers:
        side = data.sides[t.side]
        proj = side.projection if t.loss in ("p_kl", "gold", "h_kl") else None
        if t.loss == "partition_kl":
            proj = side.spellings  # reduced spellings of both vocabularies (run_demo attaches them)
        if job.w_top1 and t.loss == "p_kl":
            from nemo_xtoken.demo.study import top1_projection

            proj = top1_projection(proj)
        if job.learnable_w and t.loss == "p_kl":
            from nemo_xtoken.losses import LearnableProjection

            proj = LearnableProjection(side.projection)  # a submodule of the criterion: ModelOpt trains it with the student
            proj.initial_weights = proj.weights().detach().clone()  # for the drift report
        specs.append(TeacherSpec(t.side, t.loss, proj, t.weight, side.vocab_size))
    crit = XTokenLogitsLoss(
        specs,
        student_vocab_size=data.student_vocab_size,
        student_padded=pad_to(data.student_vocab_size),
        teacher_padded=[pad_to(data.sides[t.side].vocab_size) for t in job.teachers],
        tp=job.tp,
        merge=job.merge,
        block_size=None,  # [768 positions, ≈1k ids]: a few MB unblocked; blocking would only recompute the forward
    )
    balancer = XTokenLossBalancer("dynamic", kd_scale_max=job.kd_scale_max) if job.kd_weight is None else XTokenLossBalancer("fixed", kd_weight=job.kd_weight)
    return crit, balancer


class _StudentOnly:
    """Calls a converted model's student alone (ModelOpt's ``only_student_forward``): for evaluation."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any):
        with self.model.only_student_forward():
            return self.model(*args, **kwargs)


def _forward_distill(model, bs: list[dict[str, torch.Tensor]], vocab: int) -> torch.Tensor:
    """Teachers on their own ids, then the student; returns the student's CE (every token, real ids only)."""
    from nemo_xtoken.parallel import vocab_parallel_cross_entropy

    b = bs[0]
    ids = b["tokens"]
    teacher_in = [{"input_ids": x["teacher_tokens"], "position_ids": x["teacher_position_ids"], "attention_mask": _mask(x["teacher_tokens"].shape[1])} for x in bs]
    logits = model(ids, b["position_ids"], _mask(ids.shape[1]), teacher_inputs=teacher_in)
    return vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1), vocab_size=vocab, mask=b["loss_mask"].reshape(-1))


def _distill_step(model, bs: list[dict[str, torch.Tensor]], vocab: int) -> dict[str, torch.Tensor]:
    """One micro-batch through the ``DistillationModel``: ``compute_kd_loss`` with one alignment per teacher.

    ``bs[m]`` is teacher ``m``'s view of the same stories (same student fields).  The balancer returns
    ``kd_loss`` (the differentiable total, dynamic scaling), ``ce_loss``, ``logits_loss`` (the KD term)
    and ``dynamic_scale``.
    """
    from nemo_xtoken.data.batch import aligned_positions_from_batch

    ce = _forward_distill(model, bs, vocab)
    return model.compute_kd_loss(student_loss=ce, alignments=[aligned_positions_from_batch(x) for x in bs])


def _gradient_probe(model, b: dict[str, torch.Tensor], job: Job, data: Any, vocab: int, params: list) -> dict[str, float]:
    """On a fixed held-out batch: the CE gradient vs the scaled KD gradient (cosine, norm ratio), and the dynamic scale.

    Measures how the KD term steers the student: ``scale·∇KD`` is what the balancer adds to ``∇CE``
    (``scale`` = ``CE/|KD|`` under dynamic scaling, the job's fixed ``kd_weight`` otherwise).
    """
    from nemo_xtoken.data.batch import aligned_positions_from_batch

    bs = [b if t.side == job.teachers[0].side else data.sides[t.side].eval.rows(range(b["tokens"].shape[0])) for t in job.teachers]
    model.train()
    ce = _forward_distill(model, bs, vocab)
    d = model.compute_kd_loss(student_loss=ce, alignments=[aligned_positions_from_batch(x) for x in bs], skip_balancer=True)
    kd = next(v for k, v in d.items() if "Logits" in k)
    if job.kd_weight is not None:  # fixed weighting: the weight the update applies
        scale = torch.tensor(float(job.kd_weight))
    else:
        from nemo_xtoken.losses.total import dynamic_scale

        scale = dynamic_scale(ce, kd, job.kd_scale_max)  # what the balancer applies (capped if the job caps it)
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_kd = torch.autograd.grad(kd, params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])  # noqa: E731
    a, k = flat(g_ce), flat(g_kd) * scale
    cos = float(torch.dot(a, k) / (a.norm() * k.norm()).clamp(min=1e-30))
    return {"probe_cos": cos, "probe_ratio": float(k.norm() / a.norm().clamp(min=1e-30)), "probe_kd": float(kd.detach()), "probe_ce": float(ce.detach())}


@torch.no_grad()
def _eval_kd(model, sets: list[Any], n: int, vocab: int, batch: int = 100) -> dict[str, float]:
    """The method's own KD and the CE on the held-out stories (mean over batches)."""
    model.eval()
    kd, ce, k = 0.0, 0.0, 0
    for i in range(0, n, batch):
        out = _distill_step(model, [s.rows(range(i, min(n, i + batch))) for s in sets], vocab)
        kd += float(out["logits_loss"])
        ce += float(out["ce_loss"])
        k += 1
    return {"kd": kd / k, "ce": ce / k}


def _w_drift(model) -> dict[str, float]:
    """How far a learnable W moved from the built one: mean |ΔW| over its non-zeros, rows whose top-1 column changed."""
    out: dict[str, float] = {}
    for m in model.modules():
        w0 = getattr(m, "initial_weights", None)
        if w0 is None:
            continue
        with torch.no_grad():
            w = m.weights()
            rows = m.rows

            def top1(v: torch.Tensor) -> torch.Tensor:
                best = torch.full((m.student_vocab_size,), -1.0).scatter_reduce(0, rows, v, reduce="amax")
                hit = v == best[rows]
                return torch.full((m.student_vocab_size,), -1, dtype=torch.long).scatter_reduce(0, rows[hit], m.cols[hit], reduce="amax")

            multi = torch.bincount(rows, minlength=m.student_vocab_size) > 1
            changed = (top1(w) != top1(w0)) & multi
        out.update(nnz=float(m.nnz), mean_abs_change=float((w - w0).abs().mean()), max_abs_change=float((w - w0).abs().max()),
                   multi_rows=float(multi.sum()), top1_changed_rows=float(changed.sum()))
    return out
