"""Multi-teacher distillation: ``L = Σ_m α_m · L_m``, one W and one loss per teacher.

The weights ``α`` are either static (each :class:`Teacher`'s ``weight``, used as given) or
adaptive, recomputed on every batch from how sure each teacher is on that batch's data:

- ``"ce"``: the teacher's mean cross-entropy on its own next tokens (lower CE → higher weight);
- ``"entropy"``: the mean entropy of the teacher's distributions (lower → higher);
- ``"max_prob"``: the mean of the teacher's top probability (higher → higher);

``α = softmax_m(∓score_m / τ)`` (minus for CE and entropy), detached: the weights steer the
student, no gradient flows through them.  Scores use the teachers' distributions at temperature
1 over their real vocabularies, on the positions that enter the loss (mask, or positions inside
counted chunks of that teacher's alignment).  A teacher with no counted position scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses.reference import LOSSES, NEEDS_PROJECTION, ProjectionLike, resolve_projection
from nemo_xtoken.losses.sparse import dense_teacher

__all__ = ["Teacher", "MultiTeacherOutput", "WEIGHTINGS", "teacher_score", "adaptive_weights", "multi_teacher"]

WEIGHTINGS = ("static", "ce", "entropy", "max_prob")


@dataclass
class Teacher:
    """One teacher: its loss (``"p_kl"``, ``"h_kl"``, ``"gold"``, ``"uld"``, ``"kl"``), its W, its static weight.

    ``options`` are extra keyword arguments of that loss (e.g. ``teacher_vocab_size``,
    ``matched_weight``).
    """

    loss: str = "p_kl"
    projection: ProjectionLike | None = None
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MultiTeacherOutput:
    """The combined loss, the weights used (detached) and each teacher's own loss."""

    loss: torch.Tensor
    alphas: torch.Tensor  # [M], detached
    losses: list[torch.Tensor]  # per teacher, differentiable
    scores: torch.Tensor | None  # [M] adaptive scores (None for static)


def _teacher_vocab(teacher: Teacher, logits: torch.Tensor) -> int:
    if "teacher_vocab_size" in teacher.options and teacher.options["teacher_vocab_size"] is not None:
        return int(teacher.options["teacher_vocab_size"])
    if teacher.projection is not None:
        if hasattr(teacher.projection, "teacher_vocab_size") and not hasattr(teacher.projection, "indptr"):
            return int(teacher.projection.teacher_vocab_size)  # partition_kl's Spellings or its tensor-parallel plan
        return resolve_projection(teacher.projection).teacher_vocab_size
    return int(logits.shape[-1])


@torch.no_grad()
def teacher_score(
    teacher_logits: torch.Tensor,
    scheme: str,
    *,
    vocab_size: int | None = None,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean CE / entropy / max-probability of one teacher over the selected positions (0-dim, detached).

    ``positions`` bool ``[N]`` selects positions (None: all); ``targets`` int ``[N]`` are the
    teacher's next tokens, needed by ``"ce"``.
    """
    if scheme not in WEIGHTINGS[1:]:
        raise XTokenError(f"adaptive weighting must be one of {WEIGHTINGS[1:]}, got {scheme!r}")
    teacher_logits = dense_teacher(teacher_logits)
    x = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    v = x.shape[1] if vocab_size is None else int(vocab_size)
    lp = torch.log_softmax(x[:, :v].to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=-1)
    sel = torch.ones(lp.shape[0], dtype=torch.bool, device=lp.device) if positions is None else positions.reshape(-1).bool()
    if sel.shape[0] != lp.shape[0]:
        raise XTokenError(f"positions {tuple(sel.shape)} do not match teacher_logits {tuple(teacher_logits.shape)}")
    if scheme == "ce":
        if targets is None:
            raise XTokenError("the 'ce' weighting needs each teacher's next-token ids (teacher_targets or an alignment)")
        tg = targets.reshape(-1).long().to(lp.device)
        if tg.shape[0] != lp.shape[0]:
            raise XTokenError(f"teacher targets {tuple(targets.shape)} do not match teacher_logits {tuple(teacher_logits.shape)}")
        bad = sel & ((tg < 0) | (tg >= v))
        if bool(bad.any()):
            raise XTokenError(f"teacher targets hold ids outside [0, {v}) at selected positions (e.g. {int(tg[bad][0])})")
        per = -lp.gather(1, torch.where(sel, tg, torch.zeros_like(tg)).unsqueeze(1)).squeeze(1)
    elif scheme == "entropy":
        per = -(lp.exp() * lp).sum(1)
    else:
        per = lp.max(dim=1).values.exp()
    per = torch.where(sel, per, torch.zeros_like(per))
    return per.sum() / sel.sum().clamp(min=1)


def adaptive_weights(scores: torch.Tensor, scheme: str, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(-scores/τ)`` for ``"ce"``/``"entropy"``, ``softmax(scores/τ)`` for ``"max_prob"`` (detached)."""
    if not temperature > 0:
        raise XTokenError(f"weighting_temperature must be positive, got {temperature!r}")
    sign = 1.0 if scheme == "max_prob" else -1.0
    return torch.softmax(sign * scores.detach() / temperature, dim=0)


def multi_teacher(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    teachers: Sequence[Teacher],
    *,
    alignments: Sequence[AlignedPositions | None] | None = None,
    mask: torch.Tensor | None = None,
    weighting: str = "static",
    weighting_temperature: float = 1.0,
    teacher_targets: Sequence[torch.Tensor | None] | None = None,
    merge: str = "chain",
    temperature: float = 1.0,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
) -> MultiTeacherOutput:
    """``Σ_m α_m · L_m`` over teachers, each with its own logits, W, loss and (optional) alignment.

    A teacher may be a :class:`~nemo_xtoken.offline.SparseTeacher` (a cached teacher) in place of its logits.
    """
    teacher_logits = [dense_teacher(x) for x in teacher_logits]

    def score(tch: Teacher, logits: torch.Tensor, positions: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
        return teacher_score(logits, weighting, vocab_size=_teacher_vocab(tch, logits), positions=positions, targets=targets)

    return combine_teachers(
        student_logits, teacher_logits, teachers, LOSSES, NEEDS_PROJECTION, score,
        alignments=alignments, mask=mask, weighting=weighting, weighting_temperature=weighting_temperature,
        teacher_targets=teacher_targets,
        merge=merge, temperature=temperature, reduction=reduction, scale_by_temperature_squared=scale_by_temperature_squared,
    )


def combine_teachers(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    teachers: Sequence[Teacher],
    losses_table: dict[str, Any],
    needs_projection: dict[str, bool],
    score: Any,
    *,
    alignments: Sequence[AlignedPositions | None] | None = None,
    mask: torch.Tensor | None = None,
    weighting: str = "static",
    weighting_temperature: float = 1.0,
    teacher_targets: Sequence[torch.Tensor | None] | None = None,
    **loss_kwargs: Any,
) -> MultiTeacherOutput:
    """The multi-teacher driver shared by the reference and the tensor-parallel path.

    ``losses_table`` maps a loss name to its function; ``score(teacher, logits, positions,
    targets)`` gives a teacher's adaptive score on the positions entering its loss.  The other
    keywords (``merge``, ``temperature``, ``reduction``, ``scale_by_temperature_squared``, the
    parallel path's ``group``) go to every teacher's loss, with the teacher's own options.
    """
    m = len(teachers)
    if m == 0 or len(teacher_logits) != m:
        raise XTokenError(f"multi_teacher needs one teacher_logits tensor per Teacher: got {len(teacher_logits)} tensors for {m} teachers")
    if weighting not in WEIGHTINGS:
        raise XTokenError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    aligns: list[AlignedPositions | None] = list(alignments) if alignments is not None else [None] * m
    targets: list[torch.Tensor | None] = list(teacher_targets) if teacher_targets is not None else [None] * m
    if len(aligns) != m or len(targets) != m:
        raise XTokenError(f"alignments ({len(aligns)}) and teacher_targets ({len(targets)}) need one entry per teacher ({m})")
    losses = []
    for k, (tch, logits, align) in enumerate(zip(teachers, teacher_logits, aligns)):
        if tch.loss not in losses_table:
            raise XTokenError(f"teacher {k}: loss must be one of {tuple(losses_table)}, got {tch.loss!r}")
        kw: dict[str, Any] = dict(alignment=align, **loss_kwargs, **tch.options)
        if align is None:
            kw["mask"] = mask
        if needs_projection[tch.loss]:
            if tch.projection is None:
                raise XTokenError(f"teacher {k}: loss {tch.loss!r} needs a projection W")
            losses.append(losses_table[tch.loss](student_logits, logits, tch.projection, **kw))
        else:
            losses.append(losses_table[tch.loss](student_logits, logits, **kw))
    if loss_kwargs.get("reduction") == "none" and len({tuple(x.shape) for x in losses}) > 1:
        raise XTokenError(
            "reduction='none' needs the same items for every teacher; per-teacher alignments give "
            f"different chunk counts {[tuple(x.shape) for x in losses]}: use 'mean' or 'sum'"
        )
    dev, dt = losses[0].device, losses[0].dtype
    scores = None
    if weighting == "static":
        alphas = torch.tensor([float(t.weight) for t in teachers], dtype=dt, device=dev)
    else:
        vals = []
        for tch, logits, align, tg in zip(teachers, teacher_logits, aligns, targets):
            if align is not None:
                cm = align.chunk_mask().to(logits.device)
                ids = align.teacher_chunk_ids.to(logits.device)
                pos = (ids >= 0) & cm[ids.clamp(min=0)] if ids.numel() else ids >= 0
                tg = align.teacher_targets if tg is None else tg
            else:
                pos = None if mask is None else mask.reshape(-1).bool()
            vals.append(score(tch, logits, pos, tg))
        scores = torch.stack([v.to(dev) for v in vals])
        alphas = adaptive_weights(scores, weighting, weighting_temperature).to(dt)
    total = sum((alphas[k] * losses[k] for k in range(m)), torch.zeros((), dtype=dt, device=dev))
    return MultiTeacherOutput(total, alphas.detach(), losses, scores)
