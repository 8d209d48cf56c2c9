"""Training jobs of the demo: tiny Megatron ``GPTModel``s on gloo, one job per process.

A job is a teacher (plain CE on its own tokens) or a student (Llama-3 ids) trained with CE only or
with CE + one cross-tokenizer KD loss.  A KD student is ModelOpt's ``DistillationModel``, built by
:func:`~nemo_xtoken.integration.distill.convert_to_xtoken_distillation_model` (the teacher, frozen,
runs on its own ids through ``teacher_inputs``) with :class:`~nemo_xtoken.integration.distill.XTokenLogitsLoss`
as criterion (vocab-sharded, on ``nemo_xtoken.parallel``) and
:class:`~nemo_xtoken.integration.distill.XTokenLossBalancer` (dynamic scaling) combining it with the
student's answer-only CE in ``compute_kd_loss(student_loss=ce, alignments=[...])``.  The CE-only
student is a plain ``GPTModel`` (no teacher).  Every student starts from the same weights and
reads the same problems in the same order.  Jobs run in forked worker processes
(one thread each, one gloo group of ``tp`` ranks each) and report progress through a queue.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["ModelSize", "Job", "run_job", "set_shared"]


@dataclass(frozen=True)
class ModelSize:
    """Sizes of a tiny Llama-style Megatron GPT (tied embeddings: copying a numeral is then easy)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    embed_std: float = 0.5  # see _build: large enough that Adam's drift of rare rows keeps them distinct


@dataclass
class Job:
    """One training run. ``teacher``: the teacher's name (for a teacher job: which one it is)."""

    name: str
    kind: str  # "teacher" | "student"
    teacher: str
    loss: str | None  # student KD loss; None = CE only
    steps: int
    batch: int
    lr: float
    size: ModelSize = field(default_factory=ModelSize)
    seed: int = 1234
    eval_every: int = 50
    n_eval_curve: int = 200
    teacher_weights: str | None = None  # safetensors file of the trained teacher (student jobs)
    teacher_size: ModelSize | None = None
    save_to: str | None = None  # where a teacher job writes its weights
    tp: int = 1


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
    from nemo_xtoken.megatron_cpu import TinyGPTSpec, build_tiny_gpt, tiny_gpt_config

    spec = TinyGPTSpec(
        vocab_size=pad_to(vocab),
        max_sequence_length=seq,
        num_layers=size.layers,
        hidden_size=size.hidden,
        num_attention_heads=size.heads,
        ffn_hidden_size=size.ffn,
        share_embeddings_and_output_weights=True,
    )
    model = build_tiny_gpt(spec, seed=seed, config=tiny_gpt_config(spec))
    # Tied embeddings of rare tokens (each 3-digit numeral is the answer a few times) are moved by
    # Adam at ~lr per step in the shared direction of the softmax's negative gradient; with
    # Megatron's default std 0.02 they soon lose their identity and a model cannot copy them.
    # A larger std keeps them apart.  Drawn in full and sliced, so any TP size gets the same weights.
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
    from nemo_xtoken.megatron_cpu import gather_vocab_parallel_logits

    return gather_vocab_parallel_logits(logits)[..., :vocab]


def _tensor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _lr_at(step: int, total: int, lr: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced(model, samples: Any, n: int, side: str, vocab: int, numerals: np.ndarray, multi_digit: np.ndarray, batch: int = 128) -> dict[str, float]:
    """Answer-position metrics under teacher forcing: CE, exact (every answer token argmax), numeral mass
    (all numeral tokens, and 2–3-digit numeral tokens only) at the first answer position.

    ``side``: ``"student"`` reads ``tokens``/``labels``/``loss_mask``, ``"teacher"`` the teacher fields.
    Exact under teacher forcing equals exact greedy decoding of the same tokenization.
    """
    tk, lb, mk = ("tokens", "labels", "loss_mask") if side == "student" else ("teacher_tokens", "teacher_targets", "teacher_loss_mask")
    num = torch.as_tensor(numerals, dtype=torch.long)
    multi = torch.as_tensor(multi_digit, dtype=torch.long)
    ce_sum = n_tok = exact = mass = mass_multi = 0.0
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
        ok = (lp.argmax(-1) == tgt) | ~m
        exact += float(ok.all(-1).sum())
        first = m.float().argmax(-1)
        p_first = lp[torch.arange(ids.shape[0]), first].exp()
        mass += float(p_first[:, num].sum(-1).sum())
        mass_multi += float(p_first[:, multi].sum(-1).sum())
    return {"ce": ce_sum / max(n_tok, 1), "exact_tf": exact / n, "numeral_mass": mass / n, "multi_digit_mass": mass_multi / n}


@torch.no_grad()
def greedy_exact(model, prompts: list[np.ndarray], answers: list[int], texts: list[str], vocab: int, max_new: int = 5, batch: int = 128) -> tuple[float, list[str]]:
    """Greedy decoding from ``prompt`` (ends with the space before the answer); exact = ``"{answer}."``."""
    outs: list[str] = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        lens = torch.tensor([len(p) for p in ps])
        L = int(lens.max()) + max_new
        buf = torch.zeros(len(ps), L, dtype=torch.long)
        for j, p in enumerate(ps):
            buf[j, : len(p)] = torch.as_tensor(p)
        gen = [[] for _ in ps]
        cur = lens.clone()
        for _ in range(max_new):
            n = int(cur.max())
            x = buf[:, :n]
            logits = _gather(model(x, torch.arange(n)[None].expand_as(x), _mask(n)), vocab)
            nxt = logits[torch.arange(len(ps)), cur - 1].argmax(-1)
            buf[torch.arange(len(ps)), cur] = nxt
            for j, t in enumerate(nxt.tolist()):
                gen[j].append(texts[t])
            cur = cur + 1
        outs.extend("".join(g) for g in gen)
    ok = [o.startswith(f"{a}.") for o, a in zip(outs, answers)]
    return float(np.mean(ok)), outs


# ---- jobs -----------------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this (forked) process: init gloo + Megatron, train, evaluate; return curves and metrics."""
    from nemo_xtoken.megatron_cpu import cpu_megatron_patches, free_port, init_megatron_cpu, spawn

    torch.set_num_threads(1)
    if job.tp == 1:
        init_megatron_cpu(0, 1, tensor_model_parallel_size=1, seed=job.seed, port=free_port())
        try:
            with cpu_megatron_patches():
                return _train(job)
        finally:
            from nemo_xtoken.megatron_cpu import destroy_megatron_cpu

            destroy_megatron_cpu()
    return spawn(_rank_entry, job.tp, job, timeout=3600)[0]


def _rank_entry(rank: int, world: int, job: Job) -> dict[str, Any]:
    from nemo_xtoken.megatron_cpu import cpu_megatron_patches, init_megatron_cpu

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=job.seed)
    with cpu_megatron_patches():
        out = _train(job, quiet=rank != 0)
    return out


def _train(job: Job, quiet: bool = False) -> dict[str, Any]:
    data = _SHARED["data"]
    side = data.sides[job.teacher]
    t0 = time.perf_counter()
    curves: dict[str, list] = {"step": [], "loss": [], "ce": [], "kd": [], "eval_step": [], "eval_exact": [], "eval_numeral_mass": [], "eval_ce": []}
    n_curve, n_all = min(job.n_eval_curve, len(side.eval)), len(side.eval)
    if job.kind == "teacher":
        model = _build(side.vocab_size, job.size, data.teacher_seq_length, job.seed)
        params = list(model.parameters())
        vocab, numerals, sname = side.vocab_size, side.numerals, "teacher"
        texts = side.token_texts
    else:
        model = _build(data.student_vocab_size, job.size, data.seq_length, job.seed)
        params = list(model.parameters())
        vocab, numerals, sname = data.student_vocab_size, data.student_numerals, "student"
        texts = data.student_texts
        if job.loss is not None:
            teacher = _load_teacher(job, side, data)
            model = _distillation_model(job, model, teacher, side, data)
            params = [p for p in model.parameters() if p.requires_grad]  # the student's (the teacher is frozen)
    distill = job.kind == "student" and job.loss is not None
    fwd = _StudentOnly(model) if distill else model  # evaluation: the student alone
    multi = np.asarray([i for i in numerals if len(texts[i].strip()) >= 2], dtype=np.int64)
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def evaluate(step: int) -> None:
        model.eval()
        m = teacher_forced(fwd, side.eval_m, n_curve, sname, vocab, numerals, multi)
        model.train()
        curves["eval_step"].append(step)
        curves["eval_exact"].append(m["exact_tf"])
        curves["eval_numeral_mass"].append(m["numeral_mass"])
        curves.setdefault("eval_multi_digit_mass", []).append(m["multi_digit_mass"])
        curves["eval_ce"].append(m["ce"])

    from nemo_xtoken.parallel import vocab_parallel_cross_entropy

    model.train()
    for step in range(job.steps):
        if step % job.eval_every == 0:
            evaluate(step)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, job.steps, job.lr)
        b = side.train_m.batch(step * job.batch, job.batch)
        if job.kind == "teacher":
            ids = b["teacher_tokens"]
            logits = model(ids, b["teacher_position_ids"], _mask(ids.shape[1]))
            ce = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["teacher_targets"].reshape(-1), vocab_size=vocab, mask=b["teacher_loss_mask"].reshape(-1))
            loss, kd = ce, torch.zeros(())
        elif not distill:
            ids = b["tokens"]
            logits = model(ids, b["position_ids"], _mask(ids.shape[1]))
            ce = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1), vocab_size=vocab, mask=b["loss_mask"].reshape(-1))
            loss, kd = ce, torch.zeros(())
        else:
            out = _distill_step(model, b, vocab)
            loss, ce, kd = out["kd_loss"], out["ce_loss"], out["logits_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curves["step"].append(step)
        curves["loss"].append(float(loss.detach()))
        curves["ce"].append(float(ce.detach()))
        curves["kd"].append(float(kd.detach()))
        if not quiet and (step % 10 == 0 or step + 1 == job.steps):
            _report(job.name, step + 1, job.steps, loss=curves["loss"][-1])
    evaluate(job.steps)
    model.eval()
    final = teacher_forced(fwd, side.eval_m, n_all, sname, vocab, numerals, multi)
    if job.kind == "teacher":
        prompts, texts = side.eval_prompts, side.token_texts
    else:
        prompts, texts = data.student_eval_prompts, data.student_texts
    acc, outs = greedy_exact(fwd, prompts, [p.answer for p in data.eval_problems], texts, vocab)
    result: dict[str, Any] = {
        "job": {k: v for k, v in asdict(job).items() if k not in ("save_to", "teacher_weights")},
        "curves": curves,
        "exact": acc,
        "exact_teacher_forced": final["exact_tf"],
        "numeral_mass": final["numeral_mass"],
        "multi_digit_mass": final["multi_digit_mass"],
        "eval_ce": final["ce"],
        "samples": [{"prompt": p.prompt, "answer": p.answer, "output": o} for p, o in list(zip(data.eval_problems, outs))[:8]],
        "train_seconds": time.perf_counter() - t0,
    }
    if distill:
        result["eval_kd"] = _eval_kd(model, side.eval_m, n_all, vocab)
    if job.kind == "teacher" and job.save_to:
        from safetensors.torch import save_file

        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_rank() == 0:
            save_file(_tensor_state(model), job.save_to)
    return result


def _load_teacher(job: Job, side: Any, data: Any):
    from safetensors.torch import load_file

    teacher = _build(side.vocab_size, job.teacher_size or job.size, data.teacher_seq_length, job.seed + 1)
    state = load_file(job.teacher_weights)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")]
    if bad or unexpected:
        raise RuntimeError(f"teacher weights {job.teacher_weights} do not fit the model: missing {bad[:3]}, unexpected {unexpected[:3]}")
    return teacher


def _distillation_model(job: Job, student, teacher, side: Any, data: Any):
    """ModelOpt's ``DistillationModel`` around the student: criterion = the job's X-Token loss, dynamic scaling."""
    from nemo_xtoken.demo.data import pad_to
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss, XTokenLossBalancer, convert_to_xtoken_distillation_model

    needs_w = job.loss in ("p_kl", "gold", "h_kl")
    crit = XTokenLogitsLoss(
        [TeacherSpec(job.teacher, job.loss, side.projection if needs_w else None, 1.0, side.vocab_size)],
        student_vocab_size=data.student_vocab_size,
        student_padded=pad_to(data.student_vocab_size),
        teacher_padded=[pad_to(side.vocab_size)],
        tp=job.tp,
    )
    return convert_to_xtoken_distillation_model(student, [teacher], crit, XTokenLossBalancer("dynamic"))


class _StudentOnly:
    """Calls a converted model's student alone (ModelOpt's ``only_student_forward``): for evaluation."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any):
        with self.model.only_student_forward():
            return self.model(*args, **kwargs)


def _distill_step(model, b: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """One micro-batch through the ``DistillationModel``: teacher on its own ids, student, CE, ``compute_kd_loss``.

    The CE is the answer-only CE of the CE-only student (``loss_mask``, real ids only: the padded
    vocabulary columns are left out of the softmax, as for the CE-only student and the teachers);
    the balancer returns ``kd_loss`` (the differentiable total, dynamic scaling), ``ce_loss``,
    ``logits_loss`` (the KD term) and ``dynamic_scale``.
    """
    from nemo_xtoken.integration.data import aligned_positions_from_batch
    from nemo_xtoken.parallel import vocab_parallel_cross_entropy

    ids, t_ids = b["tokens"], b["teacher_tokens"]
    teacher_in = {"input_ids": t_ids, "position_ids": b["teacher_position_ids"], "attention_mask": _mask(t_ids.shape[1])}
    logits = model(ids, b["position_ids"], _mask(ids.shape[1]), teacher_inputs=[teacher_in])
    ce = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1), vocab_size=vocab, mask=b["loss_mask"].reshape(-1))
    return model.compute_kd_loss(student_loss=ce, alignments=[aligned_positions_from_batch(b)])


@torch.no_grad()
def _eval_kd(model, samples: Any, n: int, vocab: int, batch: int = 128) -> dict[str, float]:
    """The method's own KD and the CE on the held-out problems (mean over batches)."""
    model.eval()
    kd, ce, k = 0.0, 0.0, 0
    for i in range(0, n, batch):
        out = _distill_step(model, samples.rows(range(i, min(n, i + batch))), vocab)
        kd += float(out["logits_loss"])
        ce += float(out["ce_loss"])
        k += 1
    return {"kd": kd / k, "ce": ce / k}
