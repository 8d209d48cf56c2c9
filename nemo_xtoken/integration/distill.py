"""Cross-tokenizer distillation through ModelOpt's ``DistillationModel``: criterion, balancer, teacher routing.

ModelOpt's distillation (``modelopt.torch.distill``, used by Megatron-Bridge's ``distill()``) wraps
the student into a ``DistillationModel``: forward hooks capture the output of a student layer and
of a teacher layer, ``compute_kd_loss(student_loss, **kwargs)`` calls every
``criterion[(student_layer, teacher_layer)]`` on the captured pair (forwarding ``kwargs``) and a
loss balancer reduces the losses.  The teacher is frozen (``requires_grad=False``), run in eval
mode under ``torch.no_grad()``, and hidden from ``state_dict`` / ``sharded_state_dict``
(``expose_minimal_state_dict``, ``adjust_distillation_model_for_mcore``).  All of that is kept.

What ModelOpt cannot do for us is feed the teacher: its ``forward`` calls the teacher with the
student's arguments (same ids, same sequence length).  :func:`convert_to_xtoken_distillation_model`
therefore converts the student with ``mtd.convert(..., mode=[("kd_loss", ...)])`` as usual, with

* the teacher model = a :class:`TeacherBundle` (one or several Megatron teachers; its forward takes
  one input dict per teacher and returns the list of their vocab-sharded logits);
* one criterion entry ``{("output_layer", ""): XTokenLogitsLoss}``: the student's output layer
  (``[S, B, V_S'/tp]`` logits, vocab-sharded) against the bundle's whole output (every teacher's
  ``[B, T_m, V_m'/tp]`` logits).  One entry for all teachers, because the adaptive teacher weights
  α_m need every teacher's logits at once;
* :class:`XTokenLossBalancer`, a ModelOpt ``DistillationLossBalancer`` (no parameters) combining
  the student's CE (``student_loss``) and the KD term: dynamic scaling
  ``sg(L_CE/|L_KD|)·L_KD + L_CE`` (what ModelOpt's ``LogitsAndIntermediatesLossBalancer`` does for
  ``L_KD > 0``) or fixed weights; it returns Bridge's keys (``kd_loss`` = the total,
  ``logits_loss``, ``intermediate_loss``) plus ``ce_loss`` and ``dynamic_scale``;
* ModelOpt's ``adjust_distillation_model_for_mcore`` applied (teacher hidden from the sharded
  state dict, teacher LM loss skipped), the student's LM loss kept from overwriting fp32 logits
  in place (Megatron's CE does, and ModelOpt's hook hands the same tensor to the KD loss),
  ``set_input_tensor`` (called by Megatron's schedules) given to the student only, and its
  ``forward`` replaced by :func:`_xtoken_forward`:
  ``model(input_ids, position_ids, attention_mask, labels=..., teacher_inputs=[{...}, ...])`` runs
  each teacher on *its own* ids and sequence length (no grad, eval), then the student alone.

The alignment reaches the criterion through ``compute_kd_loss(..., alignments=[...])``, ModelOpt's
kwargs path.  :func:`xtoken_loss` is that call for a collated
:class:`~nemo_xtoken.data.packing.DualTokenizedDataset` batch, returning the total and a log
dict (``ce_loss``, ``kd/<teacher>``, ``alpha/<teacher>``, ``dynamic_scale``,
``aligned_chunk_fraction/<teacher>``, Bridge's keys).

Not supported (refused with an error at conversion): pipeline parallelism > 1 (ModelOpt sends
student and teacher activations concatenated on the hidden dimension between stages, which needs
equal sequence lengths and a single teacher), context parallelism > 1 (it would cut chunks), and
teachers whose TP/PP/CP sizes differ from the student's, and a model whose vocabulary width differs
from the one the criterion's W / P-KL plan was built for; teacher inputs longer than the teacher
model's maximum sequence length are refused before the teacher runs.

A learnable W (:class:`~nemo_xtoken.losses.learnable.LearnableProjection`, P-KL teachers;
``teachers[i].learnable_w`` in the config) is a submodule of the criterion: ModelOpt registers
criteria with parameters as the model's ``_loss_modules``, so W's weights are in
``model.parameters()`` (the optimizer trains them), in ``state_dict`` and in Megatron's
``sharded_state_dict`` (a replicated tensor, saved once, restored exactly on resume).  Its P-KL
exchange plan is built once from W's sparsity pattern; every step fills it with the current
weights, and W's gradient is summed over the TP group (the full gradient on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MethodType
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.integration.config import TP_EXCHANGES, exchange_mode, loss_options

__all__ = [
    "TeacherSpec",
    "XTokenLogitsLoss",
    "XTokenLossBalancer",
    "TeacherBundle",
    "convert_to_xtoken_distillation_model",
    "criterion_from_config",
    "xtoken_criterion",
    "teacher_inputs_from_batch",
    "xtoken_loss",
    "LOG_KEYS",
    "TP_EXCHANGES",
    "exchange_mode",
]

LOG_KEYS = ("kd_loss", "logits_loss", "intermediate_loss", "ce_loss", "dynamic_scale")
_PARALLEL_ATTRS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")


@dataclass
class TeacherSpec:
    """A teacher for the criterion: loss mode, W (a ``Projection``; none for ``kl``/``uld``), weight, sizes.

    ``tokenizer`` (a :class:`~nemo_xtoken.vocab.TokenizerInfo`, optional) is checked against W's
    teacher fingerprint when the criterion is built.
    """

    name: str
    loss: str = "p_kl"
    projection: Any = None
    weight: float = 1.0
    teacher_vocab_size: int | None = None  # real ids (≤ the model's padded output width)
    options: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None


def _logits(x: Any) -> torch.Tensor:
    """A layer output as a tensor (``ColumnParallelLinear`` returns ``(logits, bias)``)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def is_sparse(x: Any) -> bool:
    """A cached teacher's output (:class:`~nemo_xtoken.losses.sparse.SparseTeacher`) rather than logits."""
    from nemo_xtoken.losses.sparse import SparseTeacher

    return isinstance(x, SparseTeacher)


class XTokenLogitsLoss(_Loss):
    """X-Token KD criterion over vocab-parallel logits of different vocabularies (a ModelOpt criterion).

    Called by ``DistillationModel.compute_kd_loss`` as ``loss(student_out, teachers_out,
    alignments=[...])``: ``student_out`` is the student output layer's output (``[S, B, V_S'/tp]``
    with ``student_layout="sbv"``, Megatron's sequence-first layout; ``"bsv"`` for ``[B, S, ·]``),
    ``teachers_out`` the :class:`TeacherBundle`'s list of ``[B, T_m, V_m'/tp]`` logits,
    ``alignments[m]`` teacher ``m``'s :class:`~nemo_xtoken.align.AlignedPositions` over the
    flattened ``B*S`` student and ``B*T_m`` teacher positions.  Returns the α-weighted KD loss, a
    scalar that is already the full value on every TP rank (no further TP reduction), and keeps
    detached per-teacher terms in :attr:`last_metrics`.  Its class name contains ``Logits`` as
    ModelOpt's balancers expect of the logits loss.

    ``student_vocab_size``: the student tokenizer's real ids (columns beyond are Megatron padding).
    ``tp``, ``student_padded`` and each teacher's ``teacher_padded`` width fix the P-KL exchange
    plans, built once here (never per step).  ``block_size`` (positions, default 512; None:
    unblocked): every loss runs token-blocked with recomputation in the backward
    (:mod:`nemo_xtoken.losses.blocked`), so its ``[N, V]`` intermediates never exceed one block.

    ``tp_exchange`` (:data:`TP_EXCHANGES`) picks how H-KL / GOLD / ULD teachers cross the TP ranks:
    ``"exact"`` all-gathers both vocabularies per item; ``"summary"`` is the low-traffic path of
    :mod:`nemo_xtoken.parallel.summary` (a :class:`~nemo_xtoken.parallel.summary.HybridPlan` built
    here once per teacher, ``summary_bins`` intervals; the common-set KL exact, the sorted L1 within
    a computed bound, logged per step as ``kd_bound/<teacher>``); ``"auto"``: summary when
    ``tp > 1``, exact on one rank (where nothing crosses ranks).  :attr:`exchanges` says what each
    teacher uses; :meth:`traffic` what it sends.
    """

    def __init__(
        self,
        teachers: Sequence[TeacherSpec],
        *,
        student_vocab_size: int,
        student_padded: int,
        teacher_padded: Sequence[int],
        tp: int = 1,
        weighting: str = "static",
        merge: str = "chain",
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = False,
        student_layout: str = "sbv",
        student_tokenizer: Any = None,
        group: Any = None,
        block_size: int | None = 512,
        tp_exchange: str = "auto",
        summary_bins: int | None = None,
    ) -> None:
        super().__init__()
        from nemo_xtoken.losses.learnable import LearnableProjection
        from nemo_xtoken.losses.multi_teacher import Teacher
        from nemo_xtoken.parallel import PKLPlan
        from nemo_xtoken.parallel.summary import DEFAULT_BINS, HybridPlan, SummaryBound

        if not teachers or len(teacher_padded) != len(teachers):
            raise XTokenError(f"XTokenLogitsLoss needs one padded width per teacher: {len(teachers)} teachers, {len(teacher_padded)} widths")
        if student_layout not in ("sbv", "bsv"):
            raise XTokenError(f"student_layout must be 'sbv' (Megatron's output layer) or 'bsv', got {student_layout!r}")
        self.specs = list(teachers)
        self.student_vocab_size = int(student_vocab_size)
        self.student_padded = int(student_padded)
        self.teacher_padded = [int(x) for x in teacher_padded]
        self.tp = int(tp)
        self.weighting, self.merge, self.temperature = weighting, merge, float(temperature)
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.student_layout = student_layout
        self.group = group
        if block_size is not None and int(block_size) < 1:
            raise XTokenError(f"block_size must be ≥ 1 positions (or None: unblocked), got {block_size}")
        self.block_size = None if block_size is None else int(block_size)
        if tp_exchange not in TP_EXCHANGES:
            raise XTokenError(f"tp_exchange must be one of {list(TP_EXCHANGES)} (config distill.tp_exchange), got {tp_exchange!r}")
        self.summary_bins = DEFAULT_BINS if summary_bins is None else int(summary_bins)
        if self.summary_bins < 2:
            raise XTokenError(f"summary_bins must be ≥ 2 (config distill.summary_bins), got {summary_bins}")
        self.tp_exchange = tp_exchange
        low_traffic = exchange_mode("h_kl", tp_exchange, self.tp) == "summary"
        self.exchanges: list[str] = []  # per teacher: "plan" (P-KL), "summary", "all-gather" or "local" (KL)
        self._bounds: list[Any] = []  # per teacher: its SummaryBound in summary mode, else None
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.learnable_w = nn.ModuleDict()  # teacher name → LearnableProjection (parameters, checkpointed)
        self._teachers = []
        for spec, tpad in zip(self.specs, self.teacher_padded):
            opts = dict(spec.options)
            proj = spec.projection
            vt = spec.teacher_vocab_size
            if isinstance(proj, LearnableProjection):
                if spec.loss != "p_kl":
                    raise XTokenError(
                        f"teacher {spec.name}: a learnable W (LearnableProjection) is trained through P-KL only; "
                        f"loss {spec.loss} uses W's top-1 map: pass the built Projection or use p_kl"
                    )
                key = spec.name.replace(".", "_") or f"teacher{len(self._teachers)}"
                if key in self.learnable_w:
                    raise XTokenError(f"teacher {spec.name}: two teachers named alike ({key!r}); give them distinct names")
                self.learnable_w[key] = proj
                if vt is not None and vt != proj.teacher_vocab_size:
                    raise XTokenError(
                        f"teacher {spec.name}: its tokenizer has {vt} ids but the learnable W has {proj.teacher_vocab_size} "
                        "columns: W was built for another tokenizer"
                    )
            if proj is not None and hasattr(proj, "check_tokenizers"):
                proj.check_tokenizers(student_tokenizer, spec.tokenizer, path=f"teacher {spec.name}'s W")
            if spec.loss == "p_kl":
                if proj is None:
                    raise XTokenError(f"teacher {spec.name}: p_kl needs W")
                proj = PKLPlan.build(proj, self.tp, self.student_padded, tpad)
            elif spec.loss == "partition_kl":  # spec.projection: the tokens' Spellings (nemo_xtoken.vocab.spellings)
                from nemo_xtoken.parallel.partition import PartitionTPPlan

                if proj is None:
                    raise XTokenError(f"teacher {spec.name}: partition_kl needs the tokens' spellings (nemo_xtoken.vocab.spellings)")
                proj = PartitionTPPlan.build(proj, self.tp, self.student_padded, tpad)
            elif spec.loss in ("h_kl", "gold"):
                if proj is None:
                    raise XTokenError(f"teacher {spec.name}: {spec.loss} needs W")
                opts.setdefault("student_vocab_size", self.student_vocab_size)
                if vt is not None:
                    opts.setdefault("teacher_vocab_size", vt)
                if low_traffic:  # built once here, never per step
                    proj = HybridPlan.build(
                        proj, self.tp, self.student_padded, tpad, relaxed=spec.loss == "h_kl", bins=self.summary_bins,
                        student_vocab_size=self.student_vocab_size, teacher_vocab_size=vt,
                        common_set=opts.get("common_set", "top1"),
                    )
            elif spec.loss in ("kl", "uld"):
                opts.setdefault("student_vocab_size", self.student_vocab_size)
                opts.setdefault("teacher_vocab_size", vt if vt is not None else self.student_vocab_size)
                if spec.loss == "uld" and low_traffic:
                    opts.setdefault("summary_bins", self.summary_bins)
            else:
                raise XTokenError(f"teacher {spec.name}: loss {spec.loss!r} is not one of p_kl, h_kl, gold, uld, kl, partition_kl")
            self.exchanges.append(exchange_mode(spec.loss, tp_exchange, self.tp))
            if self.exchanges[-1] == "summary" and opts.get("uld_tail", "pad") != "pad":
                raise XTokenError(
                    f"teacher {spec.name}: uld_tail {opts['uld_tail']!r} has no low-traffic summary but {spec.loss} crosses "
                    f"the {self.tp} tensor-parallel ranks by summary: set tp_exchange 'exact' (config distill.tp_exchange)"
                )
            bound = SummaryBound() if self.exchanges[-1] == "summary" else None
            if bound is not None:
                opts["bound_out"] = bound
            self._bounds.append(bound)
            if self.block_size is not None:
                opts.setdefault("block_size", self.block_size)
            self._teachers.append(Teacher(loss=spec.loss, projection=proj, weight=spec.weight, options=opts))

    def traffic(self) -> list[dict[str, Any]]:
        """Per teacher: its exchange and the bytes each TP rank sends per item in the forward (fp32, from the plans).

        ``bytes_per_token_per_rank`` (mean and busiest rank, the per-item scalars included;
        ``bytes_per_rank``: every rank's) against
        ``all_gather_bytes``, what gathering the vocabulary would send: the student's logits for P-KL
        (the P-KL table's comparison), both sides' rows for ULD / GOLD / H-KL (their exact path).
        """
        from nemo_xtoken.parallel.traffic import BYTES_PER_VALUE, all_gather_values, exchange_values_per_token

        out = []
        for spec, tch, ex, tpad in zip(self.specs, self._teachers, self.exchanges, self.teacher_padded):
            plan = tch.projection if ex in ("plan", "summary") and spec.loss != "uld" else None
            sent = exchange_values_per_token(spec.loss, ex, self.tp, self.student_padded, tpad, plan=plan, bins=self.summary_bins) * BYTES_PER_VALUE
            width = self.student_padded if spec.loss in ("p_kl", "partition_kl") else self.student_padded + tpad
            gather = all_gather_values(width, self.tp) * BYTES_PER_VALUE if spec.loss != "kl" else 0.0
            row = {
                "teacher": spec.name, "loss": spec.loss, "exchange": ex, "tp": self.tp,
                "student_padded": self.student_padded, "teacher_padded": tpad,
                "bytes_per_token_per_rank": {"mean": float(sent.mean()), "max": float(sent.max())},
                "bytes_per_rank": [float(x) for x in sent],
                "all_gather_bytes": float(gather),
                "fraction_of_all_gather": float(sent.mean() / gather) if gather > 0 else None,
            }
            if ex == "summary":
                row["summary_bins"] = self.summary_bins
            if spec.loss == "partition_kl":
                row["partition"] = tch.projection.spellings.summary()
            out.append(row)
        return out

    def forward(self, predictions: Any, targets: Any, *, alignments: Sequence[Any], **_: Any) -> torch.Tensor:
        """The α-weighted KD loss of one micro-batch (see the class doc); extra kwargs are ignored."""
        from nemo_xtoken.parallel import vocab_parallel_multi_teacher

        s = _logits(predictions)
        if self.student_layout == "sbv":
            s = s.transpose(0, 1)
        b, n_s = s.shape[0], s.shape[1]
        s = s.reshape(b * n_s, s.shape[-1])  # kept in the model's dtype: the losses upcast one block at a time
        outs = list(targets) if isinstance(targets, (list, tuple)) else [targets]
        if len(outs) != len(self._teachers) or len(alignments) != len(self._teachers):
            raise XTokenError(
                f"got {len(outs)} teacher outputs and {len(alignments)} alignments for {len(self._teachers)} teachers"
            )
        t = []
        for spec, out, a in zip(self.specs, outs, alignments):
            x = _logits(out).detach()
            sparse = is_sparse(x)  # a cached teacher (CachedTeacher): a SparseTeacher over [B, T] positions
            if len(x.shape) != (2 if sparse else 3) or x.shape[0] != b:
                raise XTokenError(f"teacher {spec.name}: logits must be [B={b}, T, V/tp] (a cached teacher's rows [B, T, k]), got {tuple(x.shape)}")
            if sparse and spec.teacher_vocab_size is not None and x.vocab_size != spec.teacher_vocab_size:
                raise XTokenError(
                    f"teacher {spec.name}: the cached rows are over {x.vocab_size} teacher ids, the criterion's teacher has "
                    f"{spec.teacher_vocab_size}: the cache belongs to another teacher tokenizer"
                )
            if a is not None and (a.student_chunk_ids.numel() != b * n_s or a.teacher_chunk_ids.numel() != x.shape[0] * x.shape[1]):
                raise XTokenError(
                    f"teacher {spec.name}: the alignment covers {a.student_chunk_ids.numel()} student and "
                    f"{a.teacher_chunk_ids.numel()} teacher positions, the logits {b}x{n_s} and {x.shape[0]}x{x.shape[1]}: "
                    "the batch's teacher fields belong to another teacher or sequence length"
                )
            t.append(x.flat() if sparse else x.reshape(-1, x.shape[-1]))
        for bound in self._bounds:
            if bound is not None:
                bound.reset()
        mt = vocab_parallel_multi_teacher(
            s, t, self._teachers, alignments=list(alignments), weighting=self.weighting, merge=self.merge,
            temperature=self.temperature, scale_by_temperature_squared=self.scale_by_temperature_squared, group=self.group,
        )
        metrics: dict[str, torch.Tensor] = {}
        for k, spec in enumerate(self.specs):
            metrics[f"kd/{spec.name}"] = mt.losses[k].detach()
            metrics[f"alpha/{spec.name}"] = mt.alphas[k].detach()
            bound = self._bounds[k]
            if bound is not None:  # the low-traffic term's stated bound: |exact − kd/<teacher>| ≤ kd_bound/<teacher>
                bound.freeze()  # the backward's recomputed blocks do not count again
                metrics[f"kd_bound/{spec.name}"] = bound.total("mean").to(device=mt.losses[k].device, dtype=mt.losses[k].dtype)
            a = alignments[k]
            if a is not None and a.n_chunks > 0:
                metrics[f"aligned_chunk_fraction/{spec.name}"] = a.chunk_mask().float().mean().detach()
        self.last_metrics = metrics
        return mt.loss


def _balancer_base():
    from modelopt.torch.distill import DistillationLossBalancer

    return DistillationLossBalancer


class XTokenLossBalancer(_balancer_base()):
    """ModelOpt loss balancer for :class:`XTokenLogitsLoss`: CE + KD by dynamic scaling or fixed weights.

    ``loss_dict`` is ModelOpt's: ``student_loss`` (the student's reduced CE) and one logits loss
    (a key containing ``Logits``).  Returns Bridge's dict: ``kd_loss`` is the differentiable total;
    ``logits_loss``, ``intermediate_loss`` (always 0: X-Token distils logits only), ``ce_loss``
    and ``dynamic_scale`` are detached, for logging.
    """

    def __init__(self, kd_scaling: str = "dynamic", ce_weight: float = 1.0, kd_weight: float = 1.0, kd_scale_max: float | None = None) -> None:
        super().__init__()
        from nemo_xtoken.losses.total import check_max_scale

        if kd_scaling not in ("dynamic", "fixed"):
            raise XTokenError(f"kd_scaling must be 'dynamic' or 'fixed', got {kd_scaling!r}")
        check_max_scale(kd_scale_max)
        if kd_scale_max is not None and kd_scaling != "dynamic":
            raise XTokenError("kd_scale_max caps the dynamic scale: it needs kd_scaling 'dynamic' (config distill.kd_scale_max)")
        self.kd_scaling, self.ce_weight, self.kd_weight = kd_scaling, float(ce_weight), float(kd_weight)
        self.kd_scale_max = kd_scale_max

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from modelopt.torch.distill.loss_balancers import STUDENT_LOSS_KEY

        from nemo_xtoken.losses.total import dynamic_scale, total_loss

        d = dict(loss_dict)
        ce = d.pop(STUDENT_LOSS_KEY, None)
        if ce is None:
            raise XTokenError("XTokenLossBalancer needs the student's CE: call compute_kd_loss(student_loss=ce, ...)")
        if self._student_loss_reduction_fn is not None:
            ce = self._student_loss_reduction_fn(ce)
        keys = [k for k in d if "Logits" in k]
        if len(keys) != 1 or len(d) != 1:
            raise XTokenError(f"XTokenLossBalancer takes exactly one logits loss (no intermediate losses), got {sorted(d)}")
        kd = d[keys[0]]
        total = total_loss(ce, kd, mode=self.kd_scaling, ce_weight=self.ce_weight, kd_weight=self.kd_weight, max_scale=self.kd_scale_max)
        scale = dynamic_scale(ce, kd, self.kd_scale_max) if self.kd_scaling == "dynamic" else torch.tensor(self.kd_weight, dtype=kd.dtype)
        return {
            "kd_loss": total,
            "logits_loss": kd.detach(),
            "intermediate_loss": torch.zeros((), dtype=kd.dtype, device=kd.device),
            "ce_loss": ce.detach(),
            "dynamic_scale": scale.detach(),
        }


class TeacherBundle(nn.Module):
    """The teachers as one ModelOpt teacher model: ``forward([inputs_0, inputs_1, ...])`` → their logits.

    ``inputs_m`` is a dict of keyword arguments for teacher ``m`` (``input_ids``, ``position_ids``,
    ``attention_mask``), so every teacher reads its own ids at its own sequence length.
    """

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, teacher_inputs: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        if len(teacher_inputs) != len(self.teachers):
            raise XTokenError(f"{len(teacher_inputs)} teacher inputs for {len(self.teachers)} teachers")
        for k, (m, x) in enumerate(zip(self.teachers, teacher_inputs)):
            ids, limit = x.get("input_ids"), getattr(m, "max_sequence_length", None)
            if ids is not None and limit is not None and ids.shape[-1] > int(limit):
                raise XTokenError(
                    f"teacher {k}: {ids.shape[-1]} teacher tokens per sample exceed the teacher model's maximum sequence "
                    f"length {limit}: set the dataset's teacher_seq_length (config teachers.{k}.seq_length) ≤ {limit}"
                )
        return [m(**x) for m, x in zip(self.teachers, teacher_inputs)]


def _xtoken_forward(self: Any, *args: Any, teacher_inputs: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> Any:
    """Replacement ``DistillationModel.forward``: each teacher on its own inputs (no grad, eval), then the student.

    Honours ModelOpt's ``only_student_forward()`` (teachers skipped, no ``teacher_inputs`` needed)
    and ``only_teacher_forward()`` (returns the teachers' logits).
    """
    if not self._only_student_fwd:
        if teacher_inputs is None:
            raise XTokenError(
                "a cross-tokenizer distillation model needs teacher_inputs=[{input_ids, position_ids, attention_mask}, ...] "
                "(one dict per teacher, from the dual-tokenized batch: see teacher_inputs_from_batch)"
            )
        with torch.no_grad():
            self._teacher_model.eval()
            teacher_output = self._teacher_model(list(teacher_inputs))  # its forward hook keeps it for compute_kd_loss
        if self._only_teacher_fwd:
            return teacher_output
    self._lm_loss_call_count = 0  # ModelOpt's MTP loss counter (adjust_distillation_model_for_mcore)
    with self.only_student_forward():
        return type(self).forward(self, *args, **kwargs)


def _model_config(m: nn.Module) -> Any:
    return getattr(m, "config", None)


def convert_to_xtoken_distillation_model(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    criterion: XTokenLogitsLoss,
    balancer: Any = None,
    *,
    student_layer: str = "output_layer",
) -> Any:
    """Wrap a Megatron student and its teachers into ModelOpt's ``DistillationModel`` (see the module doc).

    Checks before anything runs: one teacher model per criterion teacher; equal TP/PP/CP sizes;
    PP = CP = 1; each model's (padded) vocabulary equal to the width the criterion was built for.
    Returns the converted student (its class is ModelOpt's ``Distill<StudentClass>``).
    """
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import DistillationConfig, adjust_distillation_model_for_mcore

    teachers = list(teachers)
    if len(teachers) != len(criterion.specs):
        raise XTokenError(f"{len(teachers)} teacher models for {len(criterion.specs)} teachers in the criterion")
    s_cfg = _model_config(student)
    for spec, t in zip(criterion.specs, teachers):
        t_cfg = _model_config(t)
        if s_cfg is None or t_cfg is None:
            continue
        for attr in _PARALLEL_ATTRS:
            mine, run = getattr(t_cfg, attr, 1), getattr(s_cfg, attr, 1)
            if mine != run:
                raise XTokenError(
                    f"teacher {spec.name}: {attr} is {mine} but the student's is {run}: ModelOpt's distillation model runs "
                    "teacher and student on the same ranks, so their TP/PP/CP sizes must be equal"
                )
    if s_cfg is not None:
        if getattr(s_cfg, "context_parallel_size", 1) > 1:
            raise XTokenError(
                f"context_parallel_size is {s_cfg.context_parallel_size}: context parallelism splits the student and teacher "
                "sequences at different text offsets and would cut aligned chunks across ranks; X-Token supports CP = 1 only"
            )
        if getattr(s_cfg, "pipeline_model_parallel_size", 1) > 1:
            raise XTokenError(
                f"pipeline_model_parallel_size is {s_cfg.pipeline_model_parallel_size}: ModelOpt passes student and teacher "
                "activations concatenated between pipeline stages, which needs equal sequence lengths; cross-tokenizer "
                "teachers are supported with PP = 1 only (use tensor/data parallelism)"
            )
        if getattr(s_cfg, "tensor_model_parallel_size", 1) != criterion.tp:
            raise XTokenError(f"the criterion was built for tp = {criterion.tp} but the student runs with {s_cfg.tensor_model_parallel_size}")
    for who, m, width in [("the student", student, criterion.student_padded)] + [
        (f"teacher {s.name}", t, w) for s, t, w in zip(criterion.specs, teachers, criterion.teacher_padded)
    ]:
        v = getattr(m, "vocab_size", None)
        if v is not None and int(v) != width:
            raise XTokenError(
                f"{who}'s output layer has {v} vocabulary columns but the criterion (its W / P-KL plan) was built for {width}: "
                "W belongs to another tokenizer or the padded vocabulary size differs"
            )
    bundle = TeacherBundle(teachers)
    model = mtd.convert(
        student,
        mode=[(
            "kd_loss",
            {
                "teacher_model": bundle,
                "criterion": {(student_layer, ""): criterion},
                "loss_balancer": balancer if balancer is not None else XTokenLossBalancer(),
                "expose_minimal_state_dict": True,
            },
        )],
    )
    adjust_distillation_model_for_mcore(
        model, DistillationConfig(skip_lm_loss=False, criterion={(student_layer, ""): criterion}, loss_balancer=model.loss_balancer)
    )
    for t in teachers:
        t.eval()
    model.forward = MethodType(_xtoken_forward, model)
    model.set_input_tensor = MethodType(_student_set_input_tensor, model)
    model.compute_language_model_loss = MethodType(_lm_loss_keeping_logits(model.compute_language_model_loss), model)
    return model


def _student_set_input_tensor(self: Any, input_tensor: Any) -> None:
    """Megatron's schedules call ``set_input_tensor([None])`` before every micro-batch.

    ModelOpt's pipeline-parallel version (``adjust_distillation_model_for_mcore``) also hands a
    slice to the teacher model with the student's method, which a :class:`TeacherBundle` (no
    ``decoder``) cannot take.  With PP = 1 (the only size accepted here) the teachers start from
    their own embeddings: the input tensor is the student's alone.
    """
    type(self).set_input_tensor(self, input_tensor)


def _lm_loss_keeping_logits(lm_loss: Any):
    """Wrap the student's LM loss so it cannot overwrite the logits the criterion reads.

    Megatron-core's ``vocab_parallel_cross_entropy`` works in place on ``logits.float()``
    (subtracts the max, then ``exp`` into the same storage).  With bf16/fp16 logits ``.float()``
    is a copy; with fp32 logits it is the output layer's own tensor, which ModelOpt's hook has
    captured for the KD loss — the KD term would then read ``exp(logits - max)``.  fp32 logits
    are cloned first (no cost in bf16 training).
    """

    def _compute(self: Any, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if logits.dtype == torch.float32:
            logits = logits.clone()
        return lm_loss(labels, logits)

    return _compute


def criterion_from_config(
    cfg: Any,
    resources: Any,
    *,
    tp: int,
    student_padded: int,
    teacher_padded: Sequence[int],
    group: Any = None,
) -> tuple[XTokenLogitsLoss, XTokenLossBalancer]:
    """The criterion and balancer of an :class:`~nemo_xtoken.integration.config.XTokenDistillConfig`.

    ``resources`` is :func:`~nemo_xtoken.integration.config.validate_resources`'s report (its
    tokenizers and W files); W's fingerprints are checked again against those tokenizers here.
    ``student_padded`` / ``teacher_padded[m]``: the models' padded output widths.
    """
    from nemo_xtoken.losses.learnable import LearnableProjection

    d = cfg.distill
    specs = []
    for t in cfg.teachers:
        tok = resources.teacher_tokenizers.get(t.name)
        proj = resources.projections.get(t.name)
        if t.loss == "partition_kl":
            proj = getattr(resources, "spellings", {}).get(t.name)
        if getattr(t, "learnable_w", False) and proj is not None:
            if hasattr(proj, "check_tokenizers"):  # the built W's fingerprints, before it becomes a parameter
                proj.check_tokenizers(resources.student_tokenizer, tok, path=f"teacher {t.name}'s W")
            proj = LearnableProjection(proj)
        specs.append(
            TeacherSpec(
                name=t.name, loss=t.loss, projection=proj, weight=t.weight,
                teacher_vocab_size=getattr(tok, "vocab_size", None), tokenizer=tok, options=loss_options(d, t.loss),
            )
        )
    crit = XTokenLogitsLoss(
        specs, student_vocab_size=int(resources.student_tokenizer.vocab_size), student_padded=student_padded,
        teacher_padded=teacher_padded, tp=tp, weighting=d.alpha, merge=d.merge, temperature=d.temperature,
        scale_by_temperature_squared=d.scale_by_temperature_squared, student_tokenizer=resources.student_tokenizer, group=group,
        block_size=getattr(d, "block_size", 512) or None, tp_exchange=d.tp_exchange, summary_bins=d.summary_bins,
    )
    return crit, XTokenLossBalancer(d.kd_scaling, ce_weight=d.ce_weight, kd_weight=d.kd_weight, kd_scale_max=getattr(d, "kd_scale_max", None))


def xtoken_criterion(model: Any) -> XTokenLogitsLoss:
    """The :class:`XTokenLogitsLoss` of a converted model."""
    for loss in model._layers_to_loss.values():
        if isinstance(loss, XTokenLogitsLoss):
            return loss
    raise XTokenError("this model has no XTokenLogitsLoss criterion: build it with convert_to_xtoken_distillation_model")


def teacher_inputs_from_batch(batch: dict[str, torch.Tensor], teacher: Any = None) -> dict[str, Any]:
    """One teacher's forward inputs from a collated dual-tokenized batch (causal mask built by the model).

    For a cached teacher (``teacher`` a :class:`~nemo_xtoken.offline.teachers.CachedTeacher`) they are
    the batch's cached rows instead of ids.
    """
    from nemo_xtoken.offline.teachers import cached_teacher_inputs, is_cached_teacher

    if is_cached_teacher(teacher):
        return cached_teacher_inputs(batch, teacher.name)
    return {"input_ids": batch["teacher_tokens"], "position_ids": batch["teacher_position_ids"], "attention_mask": batch.get("teacher_attention_mask")}


def xtoken_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    output_tensor: torch.Tensor,
    teacher_batches: Sequence[dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and log dict of one micro-batch, after ``output_tensor = model(..., labels=..., teacher_inputs=...)``.

    ``output_tensor`` is the student's per-token CE ``[B, S]`` (Megatron's LM loss); it is
    reduced as the loss-mask mean (the CE the dynamic scale compares with the KD mean over
    chunks).  ``teacher_batches[m]`` holds teacher ``m``'s alignment fields when teachers differ;
    by default the batch serves every teacher.
    """
    from nemo_xtoken.data.batch import aligned_positions_from_batch

    crit = xtoken_criterion(model)
    tb = list(teacher_batches) if teacher_batches is not None else [batch] * len(crit.specs)
    mask = batch["loss_mask"].to(output_tensor.device).float()
    ce = (output_tensor.float() * mask).sum() / mask.sum().clamp(min=1.0)
    out = model.compute_kd_loss(student_loss=ce, alignments=[aligned_positions_from_batch(b) for b in tb])
    logs = {k: v.detach() for k, v in out.items()}
    logs.update(crit.last_metrics)
    return out["kd_loss"], logs
