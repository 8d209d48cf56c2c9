"""Hugging Face teachers: load any causal LM ``transformers`` loads (GGUF included), fingerprint it, run it.

- :func:`load_hf_teacher` loads the model and its tokenizer (from a folder, a cached hub name, or a
  GGUF file inside a folder), and computes the teacher fingerprint a cache records: a hash of the
  model config, a sampled hash of the weights, and the tokenizer's content fingerprint.
- :class:`HFTeacher` wraps such a model as a *live* teacher of ModelOpt's distillation model
  (:func:`~nemo_xtoken.integration.distill.convert_to_xtoken_distillation_model`): it returns the
  logits of this tensor-parallel rank's vocabulary shard, so a teacher that has no Megatron bridge
  (or is only wanted for a comparison with its cache) runs in the Megatron loop unchanged.

``transformers`` (and ``gguf`` for GGUF files) are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_xtoken.errors import XTokenError

__all__ = ["DTYPES", "LoadedTeacher", "load_hf_teacher", "config_hash", "weights_hash", "HFTeacher"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# config keys that say nothing about the function the model computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset", "use_cache"}


@dataclass
class LoadedTeacher:
    """A loaded Hugging Face teacher: the model (eval, frozen), its tokenizer, where it came from."""

    model: nn.Module
    tokenizer: Any  # the transformers tokenizer (fast)
    source: str  # the folder / hub name (and GGUF file)
    dtype: str  # fp32 | bf16 | fp16: the forward's dtype
    device: str

    @property
    def tokenizer_info(self) -> Any:
        """The tokenizer as a :class:`~nemo_xtoken.vocab.TokenizerInfo` (content fingerprint, vocabulary size)."""
        if not hasattr(self, "_tok_info"):
            from nemo_xtoken.vocab import load_tokenizer

            self._tok_info = load_tokenizer(self.tokenizer)
        return self._tok_info

    @property
    def vocab_size(self) -> int:
        """The tokenizer's ids (``max id + 1``): the real vocabulary of the cache."""
        return int(self.tokenizer_info.vocab_size)

    @property
    def logits_width(self) -> int:
        """The model's output width (≥ the tokenizer's ids; wider = padding)."""
        emb = self.model.get_output_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return int(emb.weight.shape[0])
        return int(self.model.config.vocab_size)

    def fingerprint(self) -> dict[str, str]:
        """``config_sha256``, ``weights_sha256`` (sampled) and ``tokenizer_fingerprint``: what a cache is tied to."""
        if not hasattr(self, "_fp"):
            self._fp = {
                "config_sha256": config_hash(self.model.config),
                "weights_sha256": weights_hash(self.model),
                "tokenizer_fingerprint": self.tokenizer_info.fingerprint,
            }
        return self._fp


def config_hash(config: Any) -> str:
    """sha256 of the model config (sorted JSON, without version/name/dtype keys)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def weights_hash(model: nn.Module, samples: int = 4096) -> str:
    """sha256 over every tensor's name, shape and ``samples`` evenly strided values (float32): cheap, and
    different for another checkpoint of the same architecture."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > samples:
            idx = torch.arange(samples, dtype=torch.float64).mul_((flat.numel() - 1) / (samples - 1)).long()
            flat = flat[idx.to(flat.device)]
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_hf_teacher(
    model: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> LoadedTeacher:
    """Load a causal LM and its tokenizer with ``transformers`` (offline: a folder or a cached hub name).

    ``gguf_file``: a GGUF file name inside the folder ``model`` (or a path to the file itself),
    loaded through the ``gguf`` package.  The model is put in eval mode with gradients off.
    """
    if dtype not in DTYPES:
        raise XTokenError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise XTokenError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise XTokenError("loading a Hugging Face teacher needs `transformers`") from None
    src = str(model)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        g = Path(gguf_file)
        if g.is_file() and (not Path(src).is_dir() or g.parent.resolve() != Path(src).resolve()):
            src, gguf_file = str(g.parent), g.name
        if not (Path(src) / gguf_file).is_file():
            raise XTokenError(f"GGUF file {Path(src) / gguf_file} does not exist: pass --gguf FILE inside --hf-model DIR, or a path")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise XTokenError("loading a GGUF teacher needs the `gguf` package: pip install 'nemo-xtoken[hf]'") from None
        kw["gguf_file"] = gguf_file
    elif not Path(src).is_dir():
        kw["local_files_only"] = True
    label = src if gguf_file is None else f"{src}/{gguf_file}"
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise XTokenError(f"cannot load the tokenizer of {label} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        m = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kw)
    except Exception as e:  # noqa: BLE001
        raise XTokenError(
            f"cannot load {label} as a causal LM with transformers ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    m.eval().requires_grad_(False).to(device)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise XTokenError(f"{label}: its tokenizer has no fast (Rust) backend, which alignment needs")
    return LoadedTeacher(m, tok, label, dtype, device)


class HFTeacher(nn.Module):
    """A Hugging Face causal LM as a live teacher of the distillation model: logits of this rank's vocab shard.

    ``forward(input_ids, position_ids=None, attention_mask=None)`` → ``[B, T, padded/tp]`` float32
    (``attention_mask``: Megatron's boolean mask of a packed batch, True = masked, or Hugging Face's own):
    the model's logits, columns beyond its output width filled with a finite floor (probability 0
    once the loss masks the padded vocabulary).  The model is replicated on every rank (it is not
    sharded); it stays frozen and in eval mode.  ``vocab_size`` is ``padded`` (the criterion's width).
    """

    def __init__(self, model: nn.Module, *, padded: int, tp: int = 1, rank: int = 0) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = int(padded)
        self.tp, self.rank = int(tp), int(rank)
        if self.vocab_size % self.tp:
            raise XTokenError(f"HFTeacher: padded vocabulary {padded} is not divisible by tp = {tp}")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        from nemo_xtoken.losses.sparse import FLOOR

        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            # Megatron's mask of a packed batch (True = masked) → Hugging Face's additive mask (0 = attend)
            dt = next(self.model.parameters()).dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dt, device=attention_mask.device).masked_fill(
                attention_mask, torch.finfo(dt).min
            )
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).logits.float()
        w = self.vocab_size // self.tp
        a, b = self.rank * w, (self.rank + 1) * w
        if out.shape[-1] > self.vocab_size:
            raise XTokenError(f"HFTeacher: the model has {out.shape[-1]} output columns, more than the criterion's {self.vocab_size}")
        shard = out[..., a : min(b, out.shape[-1])]
        if shard.shape[-1] < w:
            shard = torch.cat([shard, shard.new_full((*shard.shape[:-1], w - shard.shape[-1]), FLOOR)], dim=-1)
        return shard
