"""Learnable W for P-KL: the built W's sparsity pattern fixed, weights trained with the student.

One parameter per non-zero of the built W; the weights are a softmax over each row's non-zeros
(non-negative, every non-empty row sums to 1), initialized to ``log(w)`` so that the module
starts exactly at the built W.  Empty rows stay empty.  The indices are buffers, so
``state_dict()`` holds everything a checkpoint needs (safetensors-friendly tensors only).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.vocab.projection import ROW_EXACT, Projection

__all__ = ["LearnableProjection"]


class LearnableProjection(nn.Module):
    """A trainable W ``[V_S, V_T]`` with the sparsity pattern of a built one; pass it to ``p_kl``."""

    def __init__(self, projection: Projection | torch.Tensor, *, min_weight: float = 1e-30) -> None:
        super().__init__()
        if isinstance(projection, Projection):
            v_s, v_t = projection.shape
            rows = np.repeat(np.arange(v_s, dtype=np.int64), np.diff(projection.indptr))
            cols = projection.indices.astype(np.int64)
            vals = projection.data.astype(np.float64)
            exact = projection.row_kind == ROW_EXACT
            rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
            vals_t, exact_t = torch.from_numpy(vals), torch.from_numpy(exact)
        elif isinstance(projection, torch.Tensor) and projection.layout == torch.sparse_csr:
            v_s, v_t = int(projection.shape[0]), int(projection.shape[1])
            crow = projection.crow_indices().long().cpu()
            rows_t = torch.repeat_interleave(torch.arange(v_s), crow[1:] - crow[:-1])
            cols_t = projection.col_indices().long().cpu()
            vals_t = projection.values().detach().double().cpu()
            counts = torch.zeros(v_s, dtype=torch.long).index_add_(0, rows_t, torch.ones_like(rows_t))
            sums = torch.zeros(v_s, dtype=torch.float64).index_add_(0, rows_t, vals_t)
            exact_t = (counts == 1) & (sums == 1)
        else:
            raise XTokenError(
                f"LearnableProjection needs a nemo_xtoken.vocab.Projection or a torch sparse CSR tensor, got {type(projection).__name__}"
            )
        if bool((vals_t < 0).any()):
            raise XTokenError("LearnableProjection: W has negative weights; a built W has none (rebuild it)")
        self.student_vocab_size = int(v_s)
        self.teacher_vocab_size = int(v_t)
        self.register_buffer("rows", rows_t.contiguous())
        self.register_buffer("cols", cols_t.contiguous())
        self.register_buffer("exact_rows", exact_t.bool().contiguous())
        self.register_buffer("size", torch.tensor([v_s, v_t], dtype=torch.int64))
        # Zero weights would need log(0) = -inf; floor them so the pattern stays trainable.
        self.logits = nn.Parameter(torch.log(vals_t.clamp(min=min_weight)).float())
        # Megatron-Bridge's opt-out of Float16Module's cast (model_provider.py, read from the instance's
        # vars): in a bf16 run W stays fp32 — it starts at the built W and Adam's small steps are not lost.
        self._keep_in_float32_parameter_names = ("logits",)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Refuse a checkpoint of a learnable W with another shape or sparsity pattern."""
        size, rows, cols = (state_dict.get(prefix + k) for k in ("size", "rows", "cols"))
        if size is not None and tuple(int(x) for x in size) != self.shape:
            raise XTokenError(
                f"learnable W checkpoint has shape {tuple(int(x) for x in size)}, this LearnableProjection {self.shape}: "
                "it was trained for other tokenizers"
            )
        if rows is not None and cols is not None and (
            rows.shape != self.rows.shape or not torch.equal(rows.cpu(), self.rows.cpu()) or not torch.equal(cols.cpu(), self.cols.cpu())
        ):
            raise XTokenError(
                f"learnable W checkpoint has another sparsity pattern ({rows.numel()} non-zeros, this one {self.nnz}): "
                "build the LearnableProjection from the same W the checkpoint was trained from"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.student_vocab_size, self.teacher_vocab_size)

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def weights(self) -> torch.Tensor:
        """The current non-zero weights ``[nnz]``: a softmax over each row's entries (differentiable)."""
        z = self.logits
        n_rows = self.student_vocab_size
        row_max = torch.full((n_rows,), float("-inf"), dtype=z.dtype, device=z.device)
        row_max = row_max.scatter_reduce(0, self.rows, z.detach(), reduce="amax")
        e = torch.exp(z - row_max[self.rows])
        denom = torch.zeros(n_rows, dtype=z.dtype, device=z.device).index_add(0, self.rows, e)
        return e / denom[self.rows]

    def to_sparse_csr(self) -> torch.Tensor:
        """The current W as a (detached) torch sparse CSR tensor ``[V_S, V_T]``."""
        counts = torch.zeros(self.student_vocab_size, dtype=torch.long, device=self.rows.device).index_add_(
            0, self.rows, torch.ones_like(self.rows)
        )
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, self.cols, self.weights().detach(), size=self.shape, check_invariants=False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}"
