"""``XTokenDistillConfig``: one dataclass for a cross-tokenizer distillation run, read from YAML strictly.

Every section is a dataclass; :func:`load_config` refuses unknown keys (naming the key, the file
and the valid keys), applies host-style overrides ``key.sub=value`` (list items by index:
``teachers.0.weight=0.8``; values parsed as YAML scalars), and :meth:`XTokenDistillConfig.validate`
checks everything that needs no file.  :func:`validate_resources` then loads tokenizers and W files
(fingerprints must match) and runs the coverage audit, warning when the configured loss contradicts
its recommendation — all before any GPU time is spent.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_xtoken.errors import XTokenError

__all__ = [
    "LOSSES",
    "ALPHA_SCHEMES",
    "TP_EXCHANGES",
    "exchange_mode",
    "ConfigError",
    "PIPELINE_REFUSAL",
    "CONTEXT_REFUSAL",
    "ParallelConfig",
    "ModelConfig",
    "TeacherConfig",
    "DistillConfig",
    "DataConfig",
    "OptimizerConfig",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "XTokenDistillConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "validate_resources",
    "ResourceReport",
    "JOB_WORKDIR",
    "resolve_input",
    "looks_like_hub_id",
    "loss_options",
    "format_loss_options",
]

LOSSES = ("p_kl", "h_kl", "gold", "uld", "kl", "partition_kl")
ALPHA_SCHEMES = ("static", "ce", "entropy", "max_prob")
KD_SCALINGS = ("dynamic", "fixed")
MERGES = ("chain", "mean", "reference")  # = nemo_xtoken.align.merge.MERGES (not imported: keeps the config import torch-free)
DATA_FORMATS = ("jsonl", "parquet", "preprocessed", "chat")
CHAT_LOSS_ON = ("assistant", "all")  # = nemo_xtoken.align.chat.LOSS_ON
#: How H-KL / GOLD / ULD cross tensor-parallel ranks (``distill.tp_exchange``): ``auto`` (summary when tp > 1,
#: else exact), ``exact`` (all-gather both vocabularies), ``summary`` (low traffic, bounded error).
TP_EXCHANGES = ("auto", "exact", "summary")
#: Options that follow the public reference code (docs/losses.md, "Options that follow the reference code");
#: = nemo_xtoken.losses.reference.ULD_TAILS / COMMON_SETS (not imported: keeps the config import torch-free).
ULD_TAILS = ("pad", "truncate")
COMMON_SETS = ("top1", "reference")


def exchange_mode(loss: str, tp_exchange: str, tp: int) -> str:
    """What one teacher's loss sends across TP ranks: ``plan`` (P-KL), ``local`` (KL), ``summary`` or ``all-gather``."""
    if tp_exchange not in TP_EXCHANGES:
        raise XTokenError(f"tp_exchange must be one of {list(TP_EXCHANGES)} (config distill.tp_exchange), got {tp_exchange!r}")
    if loss in ("p_kl", "partition_kl"):
        return "plan"
    if loss == "kl":
        return "local"
    return "summary" if tp_exchange == "summary" or (tp_exchange == "auto" and tp > 1) else "all-gather"


class ConfigError(XTokenError):
    """A distillation config that cannot run: unknown key, bad value, inconsistent sizes."""


#: Why pipeline parallelism is refused (``{pp}``: the configured size).
PIPELINE_REFUSAL = (
    "parallel.pipeline_model_parallel_size={pp}: pipeline parallelism is not supported by X-Token distillation: "
    "ModelOpt sends the student's and the teachers' activations between pipeline stages concatenated on the hidden "
    "dimension, which needs equal sequence lengths, and each cross-tokenizer teacher reads its own token sequence of "
    "another length; set parallel.pipeline_model_parallel_size=1 and scale with parallel.tensor_model_parallel_size "
    "and data parallelism (more GPUs)"
)
#: Why context parallelism is refused (``{cp}``: the configured size).
CONTEXT_REFUSAL = (
    "parallel.context_parallel_size={cp}: context parallelism splits the student's and the teachers' sequences at "
    "different text offsets and would cut aligned chunks across ranks; X-Token supports context_parallel_size=1 only: "
    "scale with parallel.tensor_model_parallel_size and data parallelism (more GPUs)"
)


#: Names other trainers use for a key of this config (checked before spelling distance).
_ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "lr_min": "min_lr", "grad_clip": "clip_grad", "max_grad_norm": "clip_grad",
    "gradient_clipping": "clip_grad", "seq_len": "seq_length", "max_seq_length": "seq_length", "steps": "train_iters",
    "max_steps": "train_iters", "batch_size": "global_batch_size", "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size", "cp": "context_parallel_size", "tensor_parallel_size": "tensor_model_parallel_size",
    "pipeline_parallel_size": "pipeline_model_parallel_size", "warmup_ratio": "warmup_fraction", "beta1": "adam_beta1",
    "beta2": "adam_beta2", "save_dir": "save", "load_dir": "load", "tokenizer_path": "tokenizer", "alpha_scheme": "alpha",
}


def _suggest(key: str, valid: list[str], where: str) -> str:
    """"(did you mean 'x'?)" for the nearest valid key, then the valid keys (CLI spelling: dotted paths)."""
    import difflib

    near = [_ALIASES[key]] if _ALIASES.get(key) in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # also catch abbreviations and extensions: 'temp' for 'temperature', 'learning_rate' for 'lr'
        near = [v for v in valid if len(min(v, key, key=len)) >= 2 and (v.startswith(key) or key.startswith(v))][:1]
    hint = f" (did you mean '{where}{near[0]}'?)" if near else ""
    return f"{hint}; valid keys{' under ' + where.rstrip('.') if where else ''}: {sorted(valid)}"


@dataclass
class ParallelConfig:
    """Model-parallel sizes; teachers must use the student's (ModelOpt runs them side by side)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class ModelConfig:
    """The student: its tokenizer, where its weights come from, its maximum sequence length."""

    name: str = "student"
    tokenizer: str = ""  # tokenizer.json, Hugging Face folder or cached hub name
    model: str | None = None  # Hugging Face id/folder (Megatron-Bridge AutoBridge)
    checkpoint: str | None = None  # Megatron torch_dist checkpoint to start from (Bridge's pretrained_checkpoint)
    seq_length: int = 4096
    chat_template: str | None = None  # data.format chat: a Jinja file replacing the tokenizer's own chat template


@dataclass
class TeacherConfig:
    """One frozen teacher: its tokenizer, W (student → teacher), loss mode and weight α.

    ``model`` (a live teacher) or ``cache`` (an ``xtoken cache-teacher`` folder: distil from its
    cached top-k distributions, no teacher model in memory; its tokenizer is the cache's unless given).
    """

    name: str = ""
    tokenizer: str = ""
    projection: str | None = None  # W file from `xtoken build-projection`; none for loss "kl"
    loss: str = "p_kl"  # p_kl | h_kl | gold | uld | kl | partition_kl (no W: spellings from the tokenizers)
    weight: float = 1.0  # α_m for the static scheme
    model: str | None = None  # Hugging Face id/folder: architecture (and weights unless checkpoint is given)
    checkpoint: str | None = None  # Megatron torch_dist checkpoint (DIR or DIR/iter_N) loaded instead of the HF weights
    seq_length: int | None = None  # teacher-side maximum length (None: the student's)
    parallel: ParallelConfig | None = None  # if given, must equal the run's
    learnable_w: bool = False  # p_kl only: train W's weights with the student (its sparsity pattern fixed)
    cache: str | None = None  # `xtoken cache-teacher` output: an offline teacher instead of model/checkpoint
    chat_template: str | None = None  # data.format chat: a Jinja file replacing the tokenizer's own chat template


@dataclass
class DistillConfig:
    """How KD terms are formed and combined."""

    temperature: float = 1.0
    merge: str = "chain"  # chain | mean | reference (the public reference code's merge)
    alpha: str = "static"  # static | ce | entropy | max_prob
    kd_scaling: str = "dynamic"  # dynamic: sg(L_CE / L_KD)·L_KD + L_CE; fixed: ce_weight·L_CE + kd_weight·L_KD
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    scale_by_temperature_squared: bool = False
    audit: bool = True  # run the coverage audit at start-up
    block_size: int = 512  # positions per token block (recomputed in the backward); 0: unblocked
    # how H-KL/GOLD/ULD teachers cross tensor-parallel ranks: summary (low traffic: the sorted L1 from shard
    # summaries within a computed bound, docs/tensor-parallel.md), exact (all-gather both vocabularies), auto
    # (summary when tensor_model_parallel_size > 1, exact on one rank)
    tp_exchange: str = "auto"
    summary_bins: int = 2048  # intervals of the summary (= nemo_xtoken.parallel.summary.DEFAULT_BINS): 4·bins values per item
    # options that follow the public reference code (docs/losses.md); the defaults are this project's own losses
    uld_tail: str = "pad"  # ULD/GOLD/H-KL sorted L1: pad (ours, TRL) | truncate (NeMo-RL: both sides cut to the shorter)
    uld_top_k: int = 8192  # with uld_tail truncate: at most this many sorted entries per side (NeMo-RL's uncommon_topk)
    common_set: str = "top1"  # H-KL: top1 (ours) | reference (NeMo-RL: top weight >= 0.6, one student row per teacher token)
    kd_scale_max: float | None = None  # cap of the dynamic scale CE/|KD| (None: no cap)
    teacher_top_k: int | None = None  # P-KL: the teacher restricted to its k ids of largest logit per micro-batch (NeMo-RL: 8192)


@dataclass
class ChatConfig:
    """Conversations (``data.format: chat``; docs/chat.md): which tokens carry the loss, how templates render."""

    loss_on: str = "assistant"  # assistant: assistant contents + end-of-turn tokens; all: every token
    enable_thinking: bool = False  # passed to the chat templates (Qwen3's thinking switch)


@dataclass
class DataConfig:
    """Training text and how it is dual-tokenized and packed (see docs/data.md)."""

    paths: list[str] = field(default_factory=list)  # files, folders of them, or `xtoken preprocess` folders
    format: str = "jsonl"  # jsonl | parquet | preprocessed | chat (jsonl/parquet rows with "messages")
    text_key: str = "text"
    seed: int = 1234
    packing: bool = True  # documents concatenated into full samples in lock-step with every teacher
    on_too_long: str = "split"  # without packing: split | error for a piece whose teacher side exceeds its length
    chat: ChatConfig = field(default_factory=ChatConfig)


@dataclass
class OptimizerConfig:
    """AdamW with warmup and cosine decay (the paper's recipe)."""

    name: str = "adamw"
    lr: float = 5e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.05
    lr_decay_style: str = "cosine"


@dataclass
class TrainConfig:
    """Steps and batch sizes."""

    train_iters: int = 30000
    global_batch_size: int = 768
    micro_batch_size: int = 1
    seed: int = 1234
    eval_interval: int = 1000
    bf16: bool = True
    # Bridge's exit_duration_in_mins: save a checkpoint and exit cleanly after this many minutes of training (None: never);
    # examples/launch_slurm.py sets it from --time so each job of a resubmission chain ends before Slurm kills it
    exit_duration_in_mins: int | None = None


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints (``torch_dist``)."""

    save: str | None = None
    load: str | None = None
    save_interval: int = 1000
    ckpt_format: str = "torch_dist"
    async_save: bool = False


@dataclass
class LoggingConfig:
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    log_interval: int = 10


@dataclass
class XTokenDistillConfig:
    """A whole run: student, teachers, KD recipe, data, optimizer, schedule, parallelism, checkpoints."""

    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def teacher_seq_length(self, teacher: TeacherConfig) -> int:
        """The teacher's maximum sequence length (its own, or the student's)."""
        return int(teacher.seq_length or self.student.seq_length)

    @property
    def warmup_iters(self) -> int:
        return int(round(self.optimizer.warmup_fraction * self.train.train_iters))

    def validate(self, source: str = "<config>") -> "XTokenDistillConfig":
        """Check values and cross-field consistency (no file access); raise :class:`ConfigError`."""

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: {key}: {msg}")

        if not self.student.tokenizer:
            raise bad("student.tokenizer", "is required (a tokenizer.json, Hugging Face folder or hub name)")
        if self.student.seq_length < 2:
            raise bad("student.seq_length", f"must be ≥ 2, got {self.student.seq_length}")
        if not self.teachers:
            raise bad("teachers", "needs at least one teacher")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise bad("teachers", f"need distinct non-empty names, got {names}")
        for i, t in enumerate(self.teachers):
            k = f"teachers.{i} ({t.name})"
            if t.loss not in LOSSES:
                raise bad(f"{k}.loss", f"{t.loss!r} is not one of {list(LOSSES)}")
            if t.cache is not None and (t.model or t.checkpoint):
                raise bad(f"{k}.cache", "replaces the teacher model: remove model/checkpoint, or remove cache to run the teacher live")
            if t.cache is not None and t.loss == "kl":
                raise bad(f"{k}.cache", "a same-tokenizer (loss kl) teacher reads the student's ids and has no cached side in the dataset: run it live (model), or cache a cross-tokenizer teacher")
            if not t.tokenizer and t.cache is None:
                raise bad(f"{k}.tokenizer", "is required (or a cache, whose tokenizer is used)")
            if t.loss in ("p_kl", "h_kl", "gold") and not t.projection:
                raise bad(f"{k}.projection", f"loss {t.loss} needs W: build it with `xtoken build-projection`")
            if t.learnable_w and t.loss != "p_kl":
                raise bad(f"{k}.learnable_w", f"a learnable W is trained through P-KL only; loss {t.loss} uses W's top-1 map (set loss: p_kl or learnable_w: false)")
            if t.loss == "kl" and t.projection:
                raise bad(f"{k}.projection", "loss kl is same-tokenizer KD and takes no W: remove projection or pick p_kl/h_kl")
            if not (t.weight >= 0.0):
                raise bad(f"{k}.weight", f"must be ≥ 0, got {t.weight}")
            if t.seq_length is not None and t.seq_length < 2:
                raise bad(f"{k}.seq_length", f"must be ≥ 2, got {t.seq_length}")
            if t.parallel is not None:
                for attr in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
                    mine, run = getattr(t.parallel, attr), getattr(self.parallel, attr)
                    if mine != run:
                        raise bad(
                            f"{k}.parallel.{attr}",
                            f"is {mine} but the student runs with {run}: ModelOpt's distillation model runs teacher and "
                            "student on the same ranks, so their TP/PP/CP sizes must be equal (remove the teacher's value)",
                        )
        if self.distill.alpha == "static" and sum(t.weight for t in self.teachers) <= 0:
            raise bad("teachers.*.weight", "static weights sum to 0: give at least one teacher a positive weight")
        d = self.distill
        for key, val, allowed in (("distill.merge", d.merge, MERGES), ("distill.alpha", d.alpha, ALPHA_SCHEMES), ("distill.kd_scaling", d.kd_scaling, KD_SCALINGS), ("distill.tp_exchange", d.tp_exchange, TP_EXCHANGES), ("data.format", self.data.format, DATA_FORMATS), ("data.on_too_long", self.data.on_too_long, ("error", "split")), ("data.chat.loss_on", self.data.chat.loss_on, CHAT_LOSS_ON)):
            if val not in allowed:
                raise bad(key, f"{val!r} is not one of {list(allowed)}")
        if not d.temperature > 0:
            raise bad("distill.temperature", f"must be > 0, got {d.temperature}")
        if d.block_size < 0:
            raise bad("distill.block_size", f"must be ≥ 0 (0: unblocked), got {d.block_size}")
        if d.summary_bins < 2:
            raise bad("distill.summary_bins", f"must be ≥ 2 (intervals of the low-traffic sorted-L1 summary; default 2048), got {d.summary_bins}")
        _validate_reference_options(self, bad)
        p = self.parallel
        for attr in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(p, attr) < 1:
                raise bad(f"parallel.{attr}", f"must be ≥ 1, got {getattr(p, attr)}")
        if p.pipeline_model_parallel_size > 1:
            raise ConfigError(f"{source}: " + PIPELINE_REFUSAL.format(pp=p.pipeline_model_parallel_size))
        if p.context_parallel_size > 1:
            raise ConfigError(f"{source}: " + CONTEXT_REFUSAL.format(cp=p.context_parallel_size))
        tp = p.tensor_model_parallel_size
        if p.sequence_parallel and tp == 1:
            raise bad(
                "parallel.sequence_parallel",
                "is true but parallel.tensor_model_parallel_size is 1: Megatron refuses sequence parallelism without "
                "tensor parallelism ('Cannot use sequence parallelism without tensor parallelism'); set "
                "parallel.sequence_parallel=false, or parallel.tensor_model_parallel_size=2 (or more)",
            )
        o = self.optimizer
        if o.name != "adamw":
            raise bad("optimizer.name", f"{o.name!r}: only 'adamw' is supported")
        if not (0.0 <= o.warmup_fraction < 1.0):
            raise bad("optimizer.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise bad("optimizer.lr", f"need 0 ≤ min_lr ≤ lr and lr > 0, got lr={o.lr}, min_lr={o.min_lr}")
        if o.lr_decay_style not in ("cosine", "linear", "constant"):
            raise bad("optimizer.lr_decay_style", f"{o.lr_decay_style!r} is not one of ['cosine', 'linear', 'constant']")
        tr = self.train
        if tr.train_iters < 1 or tr.micro_batch_size < 1 or tr.global_batch_size < tr.micro_batch_size:
            raise bad(
                "train",
                "need train_iters ≥ 1 and global_batch_size ≥ micro_batch_size ≥ 1, got "
                f"train.train_iters={tr.train_iters} train.global_batch_size={tr.global_batch_size} "
                f"train.micro_batch_size={tr.micro_batch_size}",
            )
        if tr.global_batch_size % tr.micro_batch_size:
            raise bad("train.global_batch_size", f"{tr.global_batch_size} is not a multiple of micro_batch_size {tr.micro_batch_size}")
        if tr.exit_duration_in_mins is not None and tr.exit_duration_in_mins < 1:
            raise bad("train.exit_duration_in_mins", f"must be ≥ 1 minute (or null: no time limit), got {tr.exit_duration_in_mins}")
        if self.checkpoint.ckpt_format != "torch_dist":
            raise bad("checkpoint.ckpt_format", f"{self.checkpoint.ckpt_format!r}: only 'torch_dist' is supported")
        return self

    def check_sequence_parallel(self, source: str = "<config>") -> None:
        """With sequence parallelism, every model's sequence length must be a multiple of TP (Megatron splits it).

        Not part of :meth:`validate` so that ``xtoken distill --check`` first names a TP that a model's
        heads or vocabulary cannot take (:func:`nemo_xtoken.integration.train.check_tensor_parallel`).
        """
        p, tp = self.parallel, self.parallel.tensor_model_parallel_size
        if not p.sequence_parallel or tp == 1:
            return
        for key, seq in [("student.seq_length", self.student.seq_length)] + [
            (f"teachers.{i}.seq_length" + ("" if t.seq_length else " (the student's)"), self.teacher_seq_length(t))
            for i, t in enumerate(self.teachers) if t.cache is None
        ]:
            if seq % tp:
                lo, hi = seq // tp * tp, -(-seq // tp) * tp
                near = lo if lo >= 2 and seq - lo <= hi - seq else hi  # a tie: the shorter
                raise ConfigError(
                    f"{source}: {key}: {seq} is not a multiple of parallel.tensor_model_parallel_size={tp}: with sequence "
                    f"parallelism Megatron splits each model's sequence over the TP ranks; the nearest valid value is {near} "
                    "(or set parallel.sequence_parallel=false)"
                )


def _validate_reference_options(self: XTokenDistillConfig, bad: Any) -> None:  # part of XTokenDistillConfig.validate
    """distill.uld_tail / uld_top_k / common_set / kd_scale_max / teacher_top_k (docs/losses.md)."""
    d = self.distill
    for key, val, allowed in (("distill.uld_tail", d.uld_tail, ULD_TAILS), ("distill.common_set", d.common_set, COMMON_SETS)):
        if val not in allowed:
            raise bad(key, f"{val!r} is not one of {list(allowed)}")
    if d.uld_top_k < 1:
        raise bad("distill.uld_top_k", f"must be ≥ 1 (sorted entries kept per side with uld_tail truncate; NeMo-RL: 8192), got {d.uld_top_k}")
    if d.teacher_top_k is not None and d.teacher_top_k < 1:
        raise bad("distill.teacher_top_k", f"must be ≥ 1 or null (null: the whole teacher vocabulary; NeMo-RL: 8192), got {d.teacher_top_k}")
    if d.kd_scale_max is not None:
        if not (d.kd_scale_max > 0 and d.kd_scale_max < float("inf")):
            raise bad("distill.kd_scale_max", f"must be a positive finite number or null (no cap), got {d.kd_scale_max}")
        if d.kd_scaling != "dynamic":
            raise bad("distill.kd_scale_max", f"caps the dynamic scale but distill.kd_scaling is {d.kd_scaling!r}: remove it or set kd_scaling: dynamic")
    if d.teacher_top_k is not None:
        for i, t in enumerate(self.teachers):
            if t.loss == "p_kl" and t.cache is not None:
                raise bad(
                    "distill.teacher_top_k",
                    f"teacher {t.name} is cached (teachers.{i}.cache): a cache keeps its own top-k per position "
                    "(xtoken cache-teacher --top-k); teacher_top_k applies to live P-KL teachers: remove one of them",
                )
    if d.uld_tail == "truncate" and exchange_mode("uld", d.tp_exchange, self.parallel.tensor_model_parallel_size) == "summary":
        users = [t.name for t in self.teachers if t.loss in ("uld", "gold", "h_kl")]
        if users:
            raise bad(
                "distill.uld_tail",
                f"truncate has no low-traffic summary, but teachers {users} would cross the "
                f"{self.parallel.tensor_model_parallel_size} tensor-parallel ranks by summary (distill.tp_exchange "
                f"{d.tp_exchange!r}): set distill.tp_exchange: exact, or uld_tail: pad",
            )


def loss_options(d: DistillConfig, loss: str) -> dict[str, Any]:
    """The reference-code options of ``distill`` that reach a teacher's loss (only those away from their defaults)."""
    out: dict[str, Any] = {}
    if loss in ("uld", "gold", "h_kl") and d.uld_tail != "pad":
        out.update(uld_tail=d.uld_tail, uld_top_k=int(d.uld_top_k))
    if loss == "h_kl" and d.common_set != "top1":
        out["common_set"] = d.common_set
    if loss == "p_kl" and d.teacher_top_k is not None:
        out["teacher_top_k"] = int(d.teacher_top_k)
    return out


def format_loss_options(cfg: XTokenDistillConfig) -> str:
    """``xtoken distill --check``'s line on the options that follow the reference code, and which teachers they reach."""
    d = cfg.distill
    parts = [
        f"uld_tail {d.uld_tail}" + (f" (top {d.uld_top_k}, NeMo-RL)" if d.uld_tail == "truncate" else " (zero-padded: ours, TRL)"),
        f"common_set {d.common_set}" + (" (NeMo-RL: top weight >= 0.6, one row per teacher token)" if d.common_set == "reference" else " (ours)"),
        f"kd_scale_max {d.kd_scale_max if d.kd_scale_max is not None else 'none'}",
        f"teacher_top_k {d.teacher_top_k if d.teacher_top_k is not None else 'none (the whole teacher vocabulary)'}",
    ]
    reach = [f"{t.name} ({t.loss}): " + ", ".join(f"{k}={v}" for k, v in loss_options(d, t.loss).items())
             for t in cfg.teachers if loss_options(d, t.loss)]
    return "kd options: " + "; ".join(parts) + ("\nkd options reach: " + "; ".join(reach) if reach else "")


# ---- strict (de)serialization ------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} must not be null")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping with keys {sorted(_field_types(inner))}, got {value!r}")
        return _build(inner, value, key, source)
    origin = typing.get_origin(inner)
    if origin is list:
        (item_tp,) = typing.get_args(inner)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}.{i}", source) for i, v in enumerate(value)]
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported field type {inner}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key '{where}{unknown[0]}'" + _suggest(str(unknown[0]), list(types_), where))
    # A string whose default is "" means "not given" (e.g. teachers.N.tokenizer: the cache's): null says the same.
    unset = {f.name for f in dataclasses.fields(cls) if f.default == ""}
    kwargs = {
        k: "" if v is None and k in unset else _convert(v, types_[k], f"{prefix}.{k}" if prefix else k, source)
        for k, v in data.items()
    }
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> XTokenDistillConfig:
    """Build and validate a config from a plain mapping (unknown keys refused)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return _build(XTokenDistillConfig, data, "", source).validate(source)


def config_to_dict(cfg: XTokenDistillConfig) -> dict[str, Any]:
    """The config as plain data (YAML-ready)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "<overrides>") -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw mapping (values parsed as YAML; list items by index).

    Keys are checked against the dataclasses, so a misspelt override fails like a misspelt file key.
    """
    import copy

    import yaml

    out = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{source}: override {ov!r} is not key.sub=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: override {ov!r}: value is not valid YAML ({yaml_error(e)})") from None
        node: Any = out
        cls: Any = XTokenDistillConfig
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            path = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{source}: override {ov!r}: {path} needs an index < {len(node)}")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
                continue
            types_ = _field_types(cls)
            if part not in types_:
                where = ".".join(parts[:i]) + "." if i else ""
                raise ConfigError(f"{source}: override {ov!r}: unknown key '{path}'" + _suggest(part, list(types_), where))
            if last:
                node[part] = value
                break
            tp, _ = _unwrap_optional(types_[part])
            if typing.get_origin(tp) is list:
                node = node.setdefault(part, [])
                (cls,) = typing.get_args(tp)
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
                cls = tp
    return out


def yaml_error(e: Exception) -> str:
    """A YAML parse error in one line: where (line and column, 1-based), what, and what it was inside."""
    mark, ctx, ctx_mark = getattr(e, "problem_mark", None), getattr(e, "context", None), getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    if mark is None:
        return what
    out = f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    if ctx:
        out += f" ({ctx}" + (f" started at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})" if ctx_mark is not None else ")")
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> XTokenDistillConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, build and validate it strictly."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (see conf/ for examples)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {yaml_error(e)}: fix the file there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    # Check the file itself first so an error names the file, then the overrides.
    _build(XTokenDistillConfig, data, "", str(p))
    if overrides:
        data = apply_overrides(data, overrides, f"{p} (overrides)")
    return config_from_dict(data, str(p) + (" + overrides" if overrides else ""))


# ---- checks that read files ---------------------------------------------------------------------

#: The working directory of every rank under NeMo-Run on Slurm (NeMo-Run's container ``cd``), not the config's folder.
JOB_WORKDIR = "/nemo_run/code"


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name``: what a Hugging Face hub id looks like (no ``./``, ``~``, file suffix or deeper path)."""
    return (
        bool(text) and not text.startswith((".", "/", "~")) and text.count("/") <= 1
        and not text.endswith((".json", ".safetensors", ".jsonl", ".parquet", ".yaml"))
    )


def resolve_input(path: str, base_dir: str | Path | None, key: str, *, hub_ok: bool = False) -> str:
    """Where a run reads an input (tokenizer, W file, data, cache, model) given in the config as ``path``.

    Absolute paths are taken as given; relative ones resolve against ``base_dir`` (the config's folder)
    and nowhere else: every rank of a NeMo-Run/Slurm job starts in :data:`JOB_WORKDIR`, so a path that
    exists only relative to this process's working directory would not be found there — refused,
    naming ``key``.  With ``hub_ok`` (tokenizers, models) a string that is not a local path and looks
    like a hub id is returned as given (a hub name).  ``base_dir=None`` (no config file): as given.
    """
    import os

    p = Path(path).expanduser()
    if base_dir is None:
        return str(path)
    if p.is_absolute():
        if p.exists() or hub_ok and looks_like_hub_id(str(path)):
            return str(p)
        raise ConfigError(f"{key}: {p} does not exist (an absolute path: it must exist on every node that runs the job)")
    cand = Path(base_dir) / p
    if cand.exists():
        return str(cand)
    here = Path.cwd() / p
    if here.exists():
        rel = os.path.relpath(here.resolve(), Path(base_dir).resolve())
        raise ConfigError(
            f"{key}: {path} exists relative to the working directory ({here}) but not relative to the config's folder "
            f"({cand} does not exist): the run resolves relative paths against the config's folder only, since every rank "
            f"of a NeMo-Run/Slurm job starts in {JOB_WORKDIR}; write {key}={rel} (relative to {base_dir}) or an absolute path"
        )
    if hub_ok and looks_like_hub_id(str(path)):
        return str(path)
    raise ConfigError(
        f"{key}: {cand} does not exist (relative paths in a config resolve against the config's folder {base_dir}); "
        "fix the path, relative to that folder or absolute"
    )



@dataclass
class ResourceReport:
    """What :func:`validate_resources` loaded: tokenizers, W per teacher, audit recommendations."""

    student_tokenizer: Any
    teacher_tokenizers: dict[str, Any]
    projections: dict[str, Any]
    recommendations: dict[str, str]
    warnings: list[str]
    caches: dict[str, Any] = field(default_factory=dict)  # teacher name → TeacherCache (cached teachers)
    spellings: dict[str, Any] = field(default_factory=dict)  # teacher name → Spellings (partition_kl teachers)


def validate_resources(cfg: XTokenDistillConfig, *, base_dir: str | Path | None = None) -> ResourceReport:
    """Load tokenizers and W files, refuse mismatched fingerprints, run the coverage audit (warns).

    Relative paths resolve against ``base_dir`` (the config file's folder) only (:func:`resolve_input`):
    a path that exists only relative to the working directory is refused, naming the key.
    Same-tokenizer teachers (loss ``kl``) must share the student's tokenizer.
    """
    from nemo_xtoken.vocab import audit, load_projection, load_tokenizer

    def resolve(s: str, key: str, hub_ok: bool = False) -> str:
        return resolve_input(s, base_dir, key, hub_ok=hub_ok)

    student = load_tokenizer(resolve(cfg.student.tokenizer, "student.tokenizer", hub_ok=True))
    teachers, projs, recs, warns, caches, spellings = {}, {}, {}, [], {}, {}
    for i, t in enumerate(cfg.teachers):
        cache = None
        if t.cache is not None:
            from nemo_xtoken.offline.cache import TeacherCache

            cache = caches[t.name] = TeacherCache(resolve(t.cache, f"teachers.{i}.cache"))
        tok = load_tokenizer(resolve(t.tokenizer, f"teachers.{i}.tokenizer", hub_ok=True) if t.tokenizer else cache.tokenizer_path)
        if cache is not None and tok.fingerprint != cache.tokenizer_fingerprint:
            raise ConfigError(
                f"teachers.{i} ({t.name}): the cache {t.cache} was built with another teacher tokenizer than {tok.source}: "
                "remove teachers.N.tokenizer (the cache's is used) or rebuild the cache"
            )
        if cache is not None and cache.params.get("corpus_student_fingerprint") != student.fingerprint:
            raise ConfigError(
                f"teachers.{i} ({t.name}): the cache {t.cache} covers a corpus aligned for another student tokenizer than "
                f"{student.source}: rebuild it with `xtoken cache-teacher -s {cfg.student.tokenizer}`"
            )
        teachers[t.name] = tok
        if t.loss == "kl":
            if tok.fingerprint != student.fingerprint:
                raise ConfigError(
                    f"teachers.{i} ({t.name}): loss kl needs the student's tokenizer, but {tok.source} differs from "
                    f"{student.source}: use p_kl or h_kl with a W built by `xtoken build-projection`"
                )
            continue
        if t.loss == "partition_kl":  # the spellings of both vocabularies, built from the tokenizers (cached by fingerprint)
            from nemo_xtoken.vocab.spellings import cached_spellings

            spellings[t.name] = cached_spellings(student, tok)
        if t.projection is None:  # uld / partition_kl without W: nothing to load
            continue
        proj = load_projection(resolve(t.projection, f"teachers.{i}.projection"), student, tok)
        projs[t.name] = proj
        if cfg.distill.audit and t.loss in ("p_kl", "h_kl"):
            rep = audit(proj, student, tok)
            recs[t.name] = rep.recommended_loss
            if rep.recommended_loss != t.loss:
                msg = (
                    f"teacher {t.name}: configured loss {t.loss} but the coverage audit recommends "
                    f"{rep.recommended_loss} ({rep.reason})"
                )
                warns.append(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)
    return ResourceReport(student, teachers, projs, recs, warns, caches, spellings)
