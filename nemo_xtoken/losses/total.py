"""The training objective: the student's own cross-entropy plus the distillation loss.

- ``"dynamic"`` (the paper's dynamic scaling): ``L = sg(L_CE / |L_KD|) · L_KD + L_CE`` with ``sg`` the
  stop-gradient.  The KD gradient is rescaled so that its term has the CE term's magnitude, with
  no weight to tune.  ``|L_KD|`` (rather than ``L_KD``) keeps the KD gradient's direction when a
  chain-merged (unnormalized) chunk loss is negative; ``L_KD == 0`` (e.g. an all-masked batch)
  gives scale 0: ``L = L_CE``, no NaN or inf.  ``max_scale`` (config ``distill.kd_scale_max``; default
  None: no cap) caps the scale: ``min(sg(L_CE / |L_KD|), max_scale)``.  Neither NeMo-RL nor TRL GOLD
  caps it (docs/losses.md, "Options that follow the reference code").
- ``"fixed"``: ``L = ce_weight · L_CE + kd_weight · L_KD``.
"""

from __future__ import annotations

import math

import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["TOTAL_MODES", "total_loss", "dynamic_scale"]

TOTAL_MODES = ("dynamic", "fixed")


def _scalar(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise XTokenError(f"{name} must be a scalar (0-dim) tensor, got {shape}: reduce it with 'mean' or 'sum' first")
    if not bool(torch.isfinite(x.detach())):
        raise XTokenError(f"{name} is {float(x.detach())}: the loss diverged or its inputs hold NaN/inf")
    return x


def check_max_scale(max_scale: float | None) -> None:
    """Refuse a cap that is not a positive finite number (None: no cap)."""
    if max_scale is None:
        return
    ok = isinstance(max_scale, (int, float)) and not isinstance(max_scale, bool) and math.isfinite(max_scale) and max_scale > 0
    if not ok:
        raise XTokenError(f"kd_scale_max must be a positive finite number or None (config distill.kd_scale_max), got {max_scale!r}")


def dynamic_scale(ce_loss: torch.Tensor, kd_loss: torch.Tensor, max_scale: float | None = None) -> torch.Tensor:
    """``sg(L_CE / |L_KD|)``, 0 where ``L_KD == 0`` (detached scalar), capped at ``max_scale`` if given."""
    check_max_scale(max_scale)
    ce, kd = ce_loss.detach(), kd_loss.detach()
    mag = kd.abs()
    scale = torch.where(mag > 0, ce / torch.where(mag > 0, mag, torch.ones_like(mag)), torch.zeros_like(ce))
    return scale if max_scale is None else scale.clamp(max=float(max_scale))


def total_loss(
    ce_loss: torch.Tensor,
    kd_loss: torch.Tensor,
    *,
    mode: str = "dynamic",
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    max_scale: float | None = None,
) -> torch.Tensor:
    """Combine the student's CE and the KD loss: dynamic scaling (default; ``max_scale`` caps the scale) or fixed weights."""
    ce = _scalar(ce_loss, "ce_loss")
    kd = _scalar(kd_loss, "kd_loss")
    check_max_scale(max_scale)
    if mode == "dynamic":
        return dynamic_scale(ce, kd, max_scale).to(kd.dtype) * kd + ce
    if mode == "fixed":
        if max_scale is not None:
            raise XTokenError(f"kd_scale_max ({max_scale}) caps the dynamic scale: with fixed weights use kd_weight instead (config distill.kd_scaling)")
        return float(ce_weight) * ce + float(kd_weight) * kd
    raise XTokenError(f"mode must be one of {TOTAL_MODES}, got {mode!r}")
