"""Batches: collation of packed samples, the flattened chunk positions, and the attention inputs of packed samples.

:func:`collate` stacks samples of :class:`~nemo_xtoken.data.packing.DualTokenizedDataset`;
:func:`aligned_positions_from_batch` offsets their per-sample chunk ids into one flattened
:class:`~nemo_xtoken.align.AlignedPositions`; :func:`attention_inputs` turns ``segment_ids`` into an
attention mask (Megatron's local attention) or ``PackedSeqParams`` (Transformer Engine), and
:func:`student_model_inputs` / :func:`teacher_model_inputs` give each model's forward arguments.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["collate", "aligned_positions_from_batch", "attention_kind", "packed_attention_mask", "packed_seq_params", "attention_inputs", "student_model_inputs", "teacher_model_inputs"]


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch (every field gains a leading batch dimension)."""
    if not samples:
        raise XTokenError("collate needs at least one sample")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def aligned_positions_from_batch(batch: dict[str, torch.Tensor]):
    """One flattened :class:`~nemo_xtoken.align.AlignedPositions` for a batch (b-major, ids offset per sample).

    Student positions are ``[B*S]`` (logits ``[B, S, V]`` flattened), teacher ``[B*T]``.
    """
    from nemo_xtoken.align import AlignedPositions

    sc, tc = batch["student_chunk_ids"], batch["teacher_chunk_ids"]
    n = batch["n_chunks"].reshape(-1).long()
    if sc.dim() != 2 or tc.dim() != 2 or sc.shape[0] != n.shape[0] or tc.shape[0] != n.shape[0]:
        raise XTokenError(
            f"aligned_positions_from_batch needs student_chunk_ids [B, S], teacher_chunk_ids [B, T] and n_chunks [B]; "
            f"got {tuple(sc.shape)}, {tuple(tc.shape)}, {tuple(n.shape)}"
        )
    off = torch.cumsum(n, 0) - n
    sc = torch.where(sc >= 0, sc + off[:, None], sc)
    tc = torch.where(tc >= 0, tc + off[:, None], tc)
    return AlignedPositions(
        sc.reshape(-1), tc.reshape(-1), batch["student_targets"].reshape(-1).long(), batch["teacher_targets"].reshape(-1).long(), int(n.sum())
    )


# ---- attention over packed samples -----------------------------------------------------------------
#
# How a model is told where one document ends, in one place (the Bridge forward step uses these for
# the student and for every teacher):
#   - Megatron's local attention (``DotProductAttention``, the CPU harness): an explicit boolean
#     mask ``[B, 1, S, S]`` (True = masked), causal inside each segment, nothing across segments;
#   - Transformer Engine's attention (GPU runs): ``PackedSeqParams`` in Megatron's THD format
#     (``cu_seqlens`` = segment starts), which also restarts RoPE per segment.
# A batch without segment ids, or whose samples hold one segment each, needs neither: the models'
# default causal mask is the same thing.


def attention_kind(model: Any) -> str:
    """``"mask"`` for Megatron's local attention, ``"thd"`` for Transformer Engine's (packed-sequence params).

    Reads the core attention of the first decoder layer of ``model`` (a Megatron ``GPTModel``, or
    anything wrapping one under ``.module``); anything else is treated as local attention.
    """
    m = model
    for _ in range(8):
        decoder = getattr(m, "decoder", None)
        if decoder is not None:
            layers = getattr(decoder, "layers", None)
            core = getattr(getattr(layers[0], "self_attention", None), "core_attention", None) if layers else None
            name = type(core).__name__ if core is not None else ""
            return "thd" if name.startswith("TE") or "Flash" in name else "mask"
        if not hasattr(m, "module"):
            break
        m = m.module
    return "mask"


def _segments_of(segment_ids: torch.Tensor) -> bool:
    """True when some sample holds more than one segment (packing changes the attention)."""
    return bool((segment_ids != segment_ids[:, :1]).any())


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]`` (True = masked): causal, and only within a segment."""
    if segment_ids.dim() != 2:
        raise XTokenError(f"segment_ids must be [B, S], got {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(segment_ids: torch.Tensor) -> Any:
    """Megatron's ``PackedSeqParams`` (THD format, ``cu_seqlens`` at segment starts) for a ``[1, S]`` sample.

    Transformer Engine reads one packed sequence per micro-batch: a batch of several samples is
    refused (set ``train.micro_batch_size: 1``, as Megatron's packed-sequence training does).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.dim() != 2 or segment_ids.shape[0] != 1:
        raise XTokenError(
            f"packed samples with Transformer Engine attention need one sample per micro-batch (Megatron's THD format), "
            f"got segment_ids of shape {tuple(segment_ids.shape)}: set train.micro_batch_size: 1"
        )
    ids = segment_ids[0]
    starts = torch.nonzero(ids[1:] != ids[:-1], as_tuple=True)[0] + 1
    cu = torch.cat([ids.new_zeros(1), starts, ids.new_full((1,), ids.shape[0])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def attention_inputs(segment_ids: torch.Tensor | None, kind: str = "mask") -> dict[str, Any]:
    """The attention keyword arguments of a Megatron GPT forward for a (possibly packed) batch.

    ``{"attention_mask": None}`` when nothing is packed; otherwise ``{"attention_mask": mask}``
    (``kind="mask"``) or ``{"attention_mask": None, "packed_seq_params": ...}`` (``kind="thd"``).
    """
    if kind not in ("mask", "thd"):
        raise XTokenError(f"attention kind must be 'mask' or 'thd', got {kind!r}")
    if segment_ids is None or not _segments_of(segment_ids):
        return {"attention_mask": None}
    if kind == "mask":
        return {"attention_mask": packed_attention_mask(segment_ids)}
    return {"attention_mask": None, "packed_seq_params": packed_seq_params(segment_ids)}


def student_model_inputs(batch: dict[str, torch.Tensor], kind: str = "mask") -> dict[str, Any]:
    """The student's forward inputs: ``input_ids``, ``position_ids`` and the attention of a packed batch."""
    att = attention_inputs(batch.get("segment_ids"), kind)
    if att["attention_mask"] is None and "packed_seq_params" not in att:
        att["attention_mask"] = batch.get("attention_mask")  # a mask the batch brings itself
    return {"input_ids": batch["tokens"], "position_ids": batch["position_ids"], **att}


def teacher_model_inputs(teacher_batch: dict[str, torch.Tensor], kind: str = "mask") -> dict[str, Any]:
    """One teacher's forward inputs from its fields (``teacher_tokens``, ``teacher_position_ids``, segments)."""
    att = attention_inputs(teacher_batch.get("teacher_segment_ids"), kind)
    if att["attention_mask"] is None and "packed_seq_params" not in att:
        att["attention_mask"] = teacher_batch.get("teacher_attention_mask")
    return {"input_ids": teacher_batch["teacher_tokens"], "position_ids": teacher_batch["teacher_position_ids"], **att}
