"""Cross-tokenizer distillation on Megatron models: the KD criterion and a student+teachers wrapper.

:class:`XTokenLogitsLoss` is the KD criterion: it takes the student's vocab-sharded logits, each
teacher's vocab-sharded logits *of its own vocabulary*, and each teacher's alignment, and computes
on the tensor-parallel group (``nemo_xtoken.parallel``): the student's CE, every teacher's KD term
(P-KL, H-KL, GOLD, ULD or same-tokenizer KL), their α-weighted sum, and the total (dynamic
scaling ``sg(L_CE/L_KD)·L_KD + L_CE`` or fixed weights).  Its name contains ``Logits`` as
ModelOpt's ``LogitsAndIntermediatesLossBalancer`` expects of a logits loss, and it reports the keys
Megatron-Bridge logs (``kd_loss``, ``logits_loss``, ``intermediate_loss``) plus ``ce_loss``,
``kd/<teacher>``, ``alpha/<teacher>``, ``dynamic_scale`` and ``aligned_chunk_fraction/<teacher>``.

:class:`XTokenDistillationModel` is what ModelOpt's ``DistillationModel`` cannot be for us: it
runs each teacher on *its own* token ids and sequence length (ModelOpt calls the teacher with the
student's arguments).  Teachers are frozen (``requires_grad=False``), kept in eval mode, under
``torch.no_grad()``, excluded from :meth:`student_parameters` (so no optimizer state) and from the
(sharded) state dict (checkpoints hold the student only, as ModelOpt's
``expose_minimal_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from nemo_xtoken.errors import XTokenError

__all__ = ["TeacherSpec", "XTokenLogitsLoss", "XTokenDistillationModel", "LOG_KEYS"]

LOG_KEYS = ("loss", "kd_loss", "logits_loss", "intermediate_loss", "ce_loss", "dynamic_scale")


@dataclass
class TeacherSpec:
    """A teacher for the criterion: loss mode, W (a ``Projection``; none for ``kl``/``uld``), weight, sizes."""

    name: str
    loss: str = "p_kl"
    projection: Any = None
    weight: float = 1.0
    teacher_vocab_size: int | None = None  # real ids (≤ the model's padded output width)
    options: dict[str, Any] = field(default_factory=dict)


class XTokenLogitsLoss(nn.Module):
    """X-Token KD criterion over vocab-parallel logits of different vocabularies (see module doc).

    ``student_vocab_size``: the student tokenizer's real ids (columns beyond are Megatron padding).
    ``tp``, ``student_padded`` and each teacher's ``teacher_padded`` width fix the P-KL exchange
    plans, built once here (never per step).
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
        kd_scaling: str = "dynamic",
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        scale_by_temperature_squared: bool = False,
        group: Any = None,
    ) -> None:
        super().__init__()
        from nemo_xtoken.losses.multi_teacher import Teacher
        from nemo_xtoken.parallel import PKLPlan

        if len(teacher_padded) != len(teachers) or not teachers:
            raise XTokenError(f"XTokenLogitsLoss needs one padded width per teacher: {len(teachers)} teachers, {len(teacher_padded)} widths")
        self.specs = list(teachers)
        self.student_vocab_size = int(student_vocab_size)
        self.weighting, self.merge, self.temperature = weighting, merge, float(temperature)
        self.kd_scaling, self.ce_weight, self.kd_weight = kd_scaling, float(ce_weight), float(kd_weight)
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.group = group
        self._teachers = []
        for spec, tpad in zip(self.specs, teacher_padded):
            opts = dict(spec.options)
            proj = spec.projection
            vt = spec.teacher_vocab_size
            if spec.loss == "p_kl":
                if proj is None:
                    raise XTokenError(f"teacher {spec.name}: p_kl needs W")
                proj = PKLPlan.build(proj, tp, student_padded, tpad)
            elif spec.loss in ("h_kl", "gold"):
                if proj is None:
                    raise XTokenError(f"teacher {spec.name}: {spec.loss} needs W")
                opts.setdefault("student_vocab_size", self.student_vocab_size)
                if vt is not None:
                    opts.setdefault("teacher_vocab_size", vt)
            else:  # kl, uld
                opts.setdefault("student_vocab_size", self.student_vocab_size)
                opts.setdefault("teacher_vocab_size", vt if vt is not None else self.student_vocab_size)
            self._teachers.append(Teacher(loss=spec.loss, projection=proj, weight=spec.weight, options=opts))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Sequence[torch.Tensor],
        alignments: Sequence[Any],
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """All terms for one micro-batch; ``student_logits`` ``[B, S, V_S'/tp]``, teacher ``[B, T_m, V_m'/tp]``.

        Returns a dict whose ``"loss"`` is the differentiable total; other values are detached scalars.
        """
        from nemo_xtoken.parallel import dynamic_scale, total_loss, vocab_parallel_cross_entropy, vocab_parallel_multi_teacher

        if len(teacher_logits) != len(self._teachers) or len(alignments) != len(self._teachers):
            raise XTokenError(
                f"got {len(teacher_logits)} teacher logits and {len(alignments)} alignments for {len(self._teachers)} teachers"
            )
        s = student_logits.reshape(-1, student_logits.shape[-1]).float()
        ce = vocab_parallel_cross_entropy(s, labels.reshape(-1), vocab_size=self.student_vocab_size, mask=loss_mask.reshape(-1), group=self.group)
        t = [x.reshape(-1, x.shape[-1]).float().detach() for x in teacher_logits]
        mt = vocab_parallel_multi_teacher(
            s, t, self._teachers, alignments=list(alignments), weighting=self.weighting, merge=self.merge,
            temperature=self.temperature, scale_by_temperature_squared=self.scale_by_temperature_squared, group=self.group,
        )
        kd = mt.loss
        total = total_loss(ce, kd, mode=self.kd_scaling, ce_weight=self.ce_weight, kd_weight=self.kd_weight)
        out: dict[str, torch.Tensor] = {
            "loss": total,
            "kd_loss": total.detach(),  # Bridge's key for the balanced total
            "logits_loss": kd.detach(),
            "intermediate_loss": torch.zeros((), dtype=kd.dtype, device=kd.device),
            "ce_loss": ce.detach(),
            "dynamic_scale": dynamic_scale(ce, kd).detach() if self.kd_scaling == "dynamic" else torch.tensor(self.kd_weight),
        }
        for k, spec in enumerate(self.specs):
            out[f"kd/{spec.name}"] = mt.losses[k].detach()
            out[f"alpha/{spec.name}"] = mt.alphas[k].detach()
            a = alignments[k]
            if a is not None and a.n_chunks > 0:
                out[f"aligned_chunk_fraction/{spec.name}"] = a.chunk_mask().float().mean().detach()
        return out


class XTokenDistillationModel(nn.Module):
    """A student plus frozen teachers that each read their own token ids (see module doc)."""

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], criterion: XTokenLogitsLoss) -> None:
        super().__init__()
        if len(teachers) != len(criterion.specs):
            raise XTokenError(f"{len(teachers)} teacher models for {len(criterion.specs)} teacher specs")
        self.student = student
        # Stored outside nn.Module registration: hidden from parameters(), state_dict() and .train().
        self._teachers = list(teachers)
        self.criterion = criterion
        for t in self._teachers:
            t.requires_grad_(False)
            t.eval()

    @property
    def teachers(self) -> list[nn.Module]:
        return list(self._teachers)

    def student_parameters(self):
        """The parameters to optimize (the student's only)."""
        return self.student.parameters()

    def to(self, *args: Any, **kwargs: Any) -> "XTokenDistillationModel":  # teachers follow the student
        super().to(*args, **kwargs)
        for t in self._teachers:
            t.to(*args, **kwargs)
        return self

    def sharded_state_dict(self, *args: Any, **kwargs: Any):
        """The student's Megatron sharded state dict (teachers are not checkpointed)."""
        return self.student.sharded_state_dict(*args, **kwargs)

    @staticmethod
    def _attention_mask(n: int, device: Any) -> torch.Tensor:
        return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)[None, None]

    def forward(self, batch: dict[str, torch.Tensor], teacher_batches: Sequence[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Run every teacher on its ids (no grad, eval), the student on its ids, and the criterion.

        ``batch`` is a collated :class:`~nemo_xtoken.integration.data.DualTokenizedDataset` batch
        (its teacher fields serve the first teacher); ``teacher_batches[m]`` gives teacher ``m``'s
        fields (``teacher_tokens``, ``teacher_position_ids``, ``teacher_chunk_ids``,
        ``teacher_targets``, ``student_chunk_ids``, ``student_targets``, ``n_chunks``) when
        teachers differ.
        """
        from nemo_xtoken.integration.data import aligned_positions_from_batch

        tb = list(teacher_batches) if teacher_batches is not None else [batch] * len(self._teachers)
        if len(tb) != len(self._teachers):
            raise XTokenError(f"{len(tb)} teacher batches for {len(self._teachers)} teachers")
        t_logits, aligns = [], []
        for model, b in zip(self._teachers, tb):
            model.eval()
            with torch.no_grad():
                ids = b["teacher_tokens"]
                t_logits.append(model(ids, b["teacher_position_ids"], self._attention_mask(ids.shape[1], ids.device)))
            aligns.append(aligned_positions_from_batch(b))
        ids = batch["tokens"]
        s_logits = self.student(ids, batch["position_ids"], self._attention_mask(ids.shape[1], ids.device))
        return self.criterion(s_logits, t_logits, aligns, batch["labels"], batch["loss_mask"])
