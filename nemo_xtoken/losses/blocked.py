"""Token-blocked losses: the same values and gradients with a bounded amount of ``[n, V]`` memory.

A loss over ``N`` items holds several ``[N, V]`` intermediates (log-probabilities of both sides,
projected probabilities, their gradients).  :func:`run_blocked` computes any loss of this package
(reference or tensor-parallel: the function is given) block by block of items, in the forward
without keeping a graph, and recomputes each block in the backward to get its gradient (the
activation-checkpointing idea, per block of tokens).  What stays alive beyond the inputs is the
gradient of the student logits (which the caller needs anyway) and one block's intermediates.

Blocks are ranges of positions (no alignment) or of chunk ids (with an alignment: every chunk's
positions on both sides are in one block, so merges are unchanged); a block holds at most
``block_size`` positions on each side unless a single chunk is longer.  The value is the sum of
the blocks' sums (``"mean"``: divided by the number of counted items); the gradient of each
block is that of the unblocked loss restricted to the block's rows, because items do not
interact.  Every rank of a tensor-parallel group forms the same blocks (they depend on the
alignment or the positions only), so the collectives of the recomputed blocks match.

Cost: the forward runs twice (once without a graph, once per block in the backward).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.errors import XTokenError

__all__ = ["run_blocked", "item_blocks", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 512  # positions per block: ≈ 0.4–0.8 GB of fp32 intermediates per [block, 200k] tensor set

# call(student_block, teacher_block, alignment_block, mask_block, reduction, params) -> loss of the block
BlockCall = Callable[[torch.Tensor, torch.Tensor, AlignedPositions | None, torch.Tensor | None, str, tuple], torch.Tensor]


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise XTokenError(f"{name} must be a [N, V] or [B, S, V] tensor, got {shape}")
    return x.reshape(-1, x.shape[-1])


def item_blocks(
    n_student: int, n_teacher: int, alignment: AlignedPositions | None, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, AlignedPositions | None, slice]]:
    """The blocks: ``(student rows, teacher rows, the block's alignment, its slice of the items)``.

    Without an alignment the rows are position ranges (the same on both sides).  With one, chunk
    ids ``[c0, c1)`` are grouped greedily in id order so that each block has at most
    ``block_size`` positions per side (a longer chunk is a block of its own); the block's
    alignment renumbers its chunks from 0.
    """
    if block_size < 1:
        raise XTokenError(f"block_size must be ≥ 1 (positions per block), got {block_size}")
    if alignment is None:
        if n_student != n_teacher:
            raise XTokenError(
                f"student_logits ({n_student} positions) and teacher_logits ({n_teacher}) differ: without an alignment "
                "position i is compared with position i; pass alignment="
            )
        return [
            (torch.arange(a, min(a + block_size, n_student)), torch.arange(a, min(a + block_size, n_student)), None, slice(a, min(a + block_size, n_student)))
            for a in range(0, n_student, block_size)
        ]
    a = alignment
    if a.student_chunk_ids.numel() != n_student or a.teacher_chunk_ids.numel() != n_teacher:
        raise XTokenError(
            f"the alignment covers {a.student_chunk_ids.numel()} student and {a.teacher_chunk_ids.numel()} teacher positions, "
            f"the logits {n_student} and {n_teacher}: build the alignment for these sequences"
        )
    sid, tid = a.student_chunk_ids.long().cpu(), a.teacher_chunk_ids.long().cpu()
    k = int(a.n_chunks)
    cs = torch.bincount(sid[sid >= 0], minlength=k)[:k] if k else torch.zeros(0, dtype=torch.long)
    ct = torch.bincount(tid[tid >= 0], minlength=k)[:k] if k else torch.zeros(0, dtype=torch.long)
    bounds = [0]
    ns = nt = 0
    for c, (n_s, n_t) in enumerate(zip(cs.tolist(), ct.tolist())):  # greedy: close the block before a chunk that would overflow it
        if (ns + n_s > block_size or nt + n_t > block_size) and (ns or nt):
            bounds.append(c)
            ns = nt = 0
        ns += n_s
        nt += n_t
    bounds.append(k)
    out = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        if c1 <= c0:
            continue
        rs = torch.nonzero((sid >= c0) & (sid < c1), as_tuple=True)[0]
        rt = torch.nonzero((tid >= c0) & (tid < c1), as_tuple=True)[0]
        sub = AlignedPositions(sid[rs] - c0, tid[rt] - c0, a.student_targets.cpu()[rs], a.teacher_targets.cpu()[rt], c1 - c0)
        out.append((rs, rt, sub, slice(c0, c1)))
    return out


class _Blocked(torch.autograd.Function):
    """Forward without a graph, block by block; backward recomputes each block (see the module doc)."""

    @staticmethod
    def forward(ctx, spec: dict, student: torch.Tensor, teacher: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.spec = spec
        ctx.save_for_backward(student, teacher, *params)
        call, blocks, reduction, mask = spec["call"], spec["blocks"], spec["reduction"], spec["mask"]
        sub_reduction = "none" if reduction == "none" else "sum"
        parts = []
        with torch.no_grad():
            for rs, rt, sub, items in blocks:
                s_b, t_b = _rows(student, rs), _rows(teacher, rt)
                m_b = None if mask is None else mask[items]
                parts.append(call(s_b, t_b, sub, m_b, sub_reduction, tuple(p.detach() for p in params)))
        if reduction == "none":
            return torch.cat(parts) if parts else student.new_zeros(spec["n_items"], dtype=torch.float32)
        total = torch.stack(parts).sum() if parts else student.new_zeros((), dtype=torch.float32)
        return total / max(spec["n_counted"], 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        student, teacher, *params = ctx.saved_tensors
        spec = ctx.spec
        call, blocks, reduction, mask = spec["call"], spec["blocks"], spec["reduction"], spec["mask"]
        sub_reduction = "none" if reduction == "none" else "sum"
        want_s, want_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want_p = ctx.needs_input_grad[3:]
        gs = torch.zeros_like(student) if want_s else None
        gt = torch.zeros_like(teacher) if want_t else None
        gp = [torch.zeros_like(p) if w else None for p, w in zip(params, want_p)]
        scale = g / max(spec["n_counted"], 1) if reduction == "mean" else g
        for rs, rt, sub, items in blocks:
            with torch.enable_grad():
                s_b = _rows(student, rs).detach().requires_grad_(want_s)
                t_b = _rows(teacher, rt).detach().requires_grad_(want_t)
                p_b = tuple(p.detach().requires_grad_(w) for p, w in zip(params, want_p))
                m_b = None if mask is None else mask[items]
                out = call(s_b, t_b, sub, m_b, sub_reduction, p_b)
                inputs = [x for x, w in zip((s_b, t_b, *p_b), (want_s, want_t, *want_p)) if w]
                go = scale[items] if reduction == "none" else scale
                grads = torch.autograd.grad(out, inputs, grad_outputs=go.to(out.dtype), allow_unused=True) if inputs else ()
            it = iter(grads)
            if want_s:
                _add_rows(gs, rs, next(it))
            if want_t:
                _add_rows(gt, rt, next(it))
            for k, w in enumerate(want_p):
                if w:
                    d = next(it)
                    if d is not None:
                        gp[k].add_(d)
        return (None, gs, gt, *gp)


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The block's rows: a view for a contiguous range, a copy otherwise."""
    if rows.numel() and int(rows[-1]) - int(rows[0]) + 1 == rows.numel():
        return x[int(rows[0]) : int(rows[-1]) + 1]
    return x.index_select(0, rows.to(x.device))


def _add_rows(buf: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None or rows.numel() == 0:
        return
    if int(rows[-1]) - int(rows[0]) + 1 == rows.numel():
        buf[int(rows[0]) : int(rows[-1]) + 1].add_(grad.to(buf.dtype))
    else:
        buf.index_add_(0, rows.to(buf.device), grad.to(buf.dtype))


def run_blocked(
    call: BlockCall,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    params: Sequence[torch.Tensor] = (),
    *,
    block_size: int,
    alignment: AlignedPositions | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """A loss computed block by block of items with recomputation in the backward (see the module doc).

    ``call(student_rows, teacher_rows, block_alignment, block_mask, reduction, params)`` is the
    unblocked loss of one block (``reduction`` ``"sum"`` or ``"none"``); ``params`` are further
    differentiable inputs (a learnable W's weights) handed to every block as leaves.  When
    everything fits in one block the loss is called directly (no recomputation).
    """
    if reduction not in ("mean", "sum", "none"):
        raise XTokenError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    if alignment is not None and mask is not None:
        raise XTokenError(
            "mask cannot be combined with alignment: put the loss mask into the alignment "
            "(positions_from_token_chunks(..., student_loss_mask=...))"
        )
    s, t = _flat(student_logits, "student_logits"), _flat(teacher_logits, "teacher_logits")
    m = None if mask is None else mask.reshape(-1).bool()
    if m is not None and m.shape[0] != s.shape[0]:
        raise XTokenError(f"mask {tuple(mask.shape)} does not match the {s.shape[0]} positions of student_logits {tuple(student_logits.shape)}")
    blocks = item_blocks(s.shape[0], t.shape[0], alignment, block_size)
    if len(blocks) <= 1:
        return call(s, t, alignment, m, reduction, tuple(params))
    if alignment is None:
        n_items = s.shape[0]
        n_counted = int(m.sum()) if m is not None else n_items
    else:
        n_items = int(alignment.n_chunks)
        n_counted = int(alignment.chunk_mask().sum())
    spec = {"call": call, "blocks": blocks, "reduction": reduction, "mask": m, "n_items": n_items, "n_counted": n_counted}
    return _Blocked.apply(spec, s, t, *params)
