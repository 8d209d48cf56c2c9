"""A Megatron-Bridge model bridge for ``Phi3ForCausalLM`` (Phi-3, Phi-3.5, Phi-4-mini): the paper's second teacher.

Megatron-Bridge 0.6.2 registers no Phi3 bridge (``AutoBridge.from_hf_config`` raises "Model
architecture 'Phi3ForCausalLM' is not yet supported"), so the plugin registers this one with
AutoBridge's dispatch when :func:`nemo_xtoken.integration.bridge.register_plugin_bridges` runs
(every Bridge entry point of the plugin calls it).  A Phi3 layer is a Llama layer with

* a fused ``self_attn.qkv_proj`` (Q, K, V rows concatenated): Bridge's ``ConcatenatedQKVMapping``
  turns it into Megatron's per-group interleaved ``linear_qkv`` and back;
* a fused ``mlp.gate_up_proj`` (gate rows, then up rows): :class:`FusedGatedMLPMapping` splits it
  into gate and up and lays out each tensor-parallel shard as ``[gate_r; up_r]`` (what
  ``GatedMLPMapping`` does for separate tensors), and concatenates them back on export;
* a partial rotary embedding (``partial_rotary_factor``, 0.75 in Phi-4-mini) = Megatron's
  ``rotary_percent`` (the first ``rotary_percent·head_dim`` channels rotate, the rest pass);
* LongRoPE (``rope_type: longrope``, old name ``su``): per-frequency divisors ``short_factor`` /
  ``long_factor`` and a cos/sin scale ``attention_factor``.  Hugging Face picks the long factors
  when the sequence (max position + 1) exceeds ``original_max_position_embeddings``, else the short
  ones, and derives ``attention_factor = sqrt(1 + ln(factor) / ln(original))`` with
  ``factor = max_position_embeddings / original_max_position_embeddings`` unless given.
  :class:`Phi3ModelProvider` computes the same inverse frequencies for the provider's configured
  ``seq_length`` (the run's sequence length) and sets the scale as Megatron's per-attention
  rotary ``mscale``.  A batch shorter than ``original_max_position_embeddings`` in a run configured
  longer than it gets the long factors here but the short ones in Hugging Face (HF switches per
  batch): training at a fixed sequence length is what this reproduces.
* tied or untied embeddings as ``tie_word_embeddings`` says (Phi-4-mini ties them).

A ``sliding_window`` shorter than the configured sequence length is refused (Megatron's local
attention has no window here); Phi-4-mini's 262,144 is longer than any run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.attention import Attention
from transformers import Phi3ForCausalLM

from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.bridge.models.conversion.param_mapping import (
    AutoMapping,
    ConcatenatedQKVMapping,
    GatedMLPMapping,
    MegatronParamMapping,
)
from megatron.bridge.models.gpt_provider import GPTModelProvider

from nemo_xtoken.errors import XTokenError

__all__ = ["Phi3ModelProvider", "Phi3Bridge", "FusedGatedMLPMapping", "longrope_parameters"]


def longrope_parameters(rope: dict, max_position_embeddings: int) -> tuple[list[float], list[float], int, float]:
    """``(short_factor, long_factor, original_max_position_embeddings, attention_factor)`` of a LongRoPE config, as HF derives them."""
    try:
        short, long_ = list(rope["short_factor"]), list(rope["long_factor"])
        original = int(rope["original_max_position_embeddings"])
    except KeyError as e:
        raise XTokenError(f"Phi3 LongRoPE rope_parameters lack {e.args[0]!r} (have {sorted(rope)})") from None
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        factor = rope.get("factor") or max_position_embeddings / original
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return short, long_, original, float(attention_factor)


@dataclass
class Phi3ModelProvider(GPTModelProvider):
    """``GPTModelProvider`` + LongRoPE: the inverse frequencies and cos/sin scale of Hugging Face's Phi3.

    ``longrope_short_factor is None``: plain RoPE (Phi-3-mini-4k).  The long factors apply when
    ``seq_length > longrope_original_max_position_embeddings``.
    """

    longrope_short_factor: Optional[list] = None
    longrope_long_factor: Optional[list] = None
    longrope_original_max_position_embeddings: Optional[int] = None
    longrope_attention_factor: float = 1.0
    sliding_window: Optional[int] = None

    def longrope_factors(self) -> Optional[list]:
        """The per-frequency divisors used for ``seq_length`` (``None`` without LongRoPE)."""
        if self.longrope_short_factor is None:
            return None
        long_ = self.seq_length > int(self.longrope_original_max_position_embeddings)
        return list(self.longrope_long_factor if long_ else self.longrope_short_factor)

    def provide(self, pre_process=None, post_process=None, vp_stage=None) -> GPTModel:
        """Build the ``GPTModel``, then set LongRoPE's inverse frequencies and rotary scale on it."""
        if self.sliding_window is not None and self.sliding_window < self.seq_length:
            raise XTokenError(
                f"this Phi3 model uses sliding-window attention ({self.sliding_window} tokens) shorter than the "
                f"sequence length {self.seq_length}; the plugin's Phi3 bridge supports full causal attention only: "
                f"use a sequence length ≤ {self.sliding_window}"
            )
        factors = self.longrope_factors()
        if factors is not None and self.apply_rope_fusion and self.longrope_attention_factor != 1.0:
            self.apply_rope_fusion = False  # TE's fused RoPE has no cos/sin scale (mscale)
        model = super().provide(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if factors is None:
            return model
        rope = getattr(model, "rotary_pos_emb", None)
        if rope is None:
            raise XTokenError("Phi3 LongRoPE: the Megatron model has no rotary_pos_emb (position_embedding_type must be 'rope')")
        dim = int(self.kv_channels * self.rotary_percent) if self.rotary_percent < 1.0 else int(self.kv_channels)
        if len(factors) != dim // 2:
            raise XTokenError(f"Phi3 LongRoPE: {len(factors)} factors for {dim // 2} rotary frequencies (head_dim·partial_rotary_factor/2)")
        device = rope.inv_freq.device
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        rope.inv_freq = 1.0 / (ext * self.rotary_base**shape)  # Hugging Face's _compute_longrope_parameters
        for m in model.modules():
            if isinstance(m, Attention):
                m._yarn_concentration_factor = float(self.longrope_attention_factor)  # Megatron's rotary mscale
        return model


class FusedGatedMLPMapping(MegatronParamMapping[torch.Tensor]):
    """One HF tensor ``[gate; up]`` (Phi3's ``gate_up_proj``) ↔ Megatron's ``linear_fc1`` (``[gate_r; up_r]`` per TP rank)."""

    def __init__(self, megatron_param: str, hf_param: str) -> None:
        super().__init__(megatron_param, hf_param)
        self._inner = GatedMLPMapping(megatron_param, gate=f"{hf_param}#gate", up=f"{hf_param}#up")

    def set_process_groups_from_pg_collection(self, pg_collection: Any) -> None:  # noqa: D102
        super().set_process_groups_from_pg_collection(pg_collection)
        self._inner.set_process_groups_from_pg_collection(pg_collection)

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module) -> torch.Tensor:
        """Split the fused tensor into gate and up, then shard as ``GatedMLPMapping``."""
        parts = None
        if hf_weights is not None:
            if hf_weights.shape[0] % 2:
                raise XTokenError(f"{self.hf_param}: gate_up_proj has an odd number of rows ({hf_weights.shape[0]})")
            gate, up = torch.chunk(hf_weights, 2, dim=0)
            parts = {"gate": gate, "up": up}
        return self._inner.hf_to_megatron(parts, megatron_module)

    def megatron_to_hf(self, megatron_weights: Optional[torch.Tensor], megatron_module: Optional[torch.nn.Module]) -> Dict[str, torch.Tensor]:
        """Gather gate and up as ``GatedMLPMapping`` does, then concatenate them into one HF tensor."""
        out = self._inner.megatron_to_hf(megatron_weights, megatron_module)
        if not out:
            return {}
        return {str(self.hf_param): torch.cat([out[f"{self.hf_param}#gate"], out[f"{self.hf_param}#up"]], dim=0)}

    def resolve(self, captures: Tuple[str, ...]) -> "FusedGatedMLPMapping":
        """This mapping with the wildcards filled in."""
        megatron_param, hf_param = self._resolve_names(captures)
        return type(self)(megatron_param, hf_param)


def _rope_parameters(hf_config: Any) -> dict:
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return dict(rope)


# Registered twice: by class (configs without auto_map) and by name (Phi-4-mini's config.json carries an
# ``auto_map``, and Bridge then dispatches on the class name string).
@MegatronModelBridge.register_bridge(source="Phi3ForCausalLM", target=GPTModel, provider=Phi3ModelProvider, model_type="phi3")
@MegatronModelBridge.register_bridge(source=Phi3ForCausalLM, target=GPTModel, provider=Phi3ModelProvider, model_type="phi3")
class Phi3Bridge(MegatronModelBridge):
    """Phi3ForCausalLM ↔ Megatron ``GPTModel`` (see the module doc)."""

    def provider_bridge(self, hf_pretrained: Any) -> Phi3ModelProvider:
        """Phi3's Hugging Face config as a :class:`Phi3ModelProvider`."""
        provider = super().provider_bridge(hf_pretrained)
        cfg = hf_pretrained.config
        rope = _rope_parameters(cfg)
        provider.normalization = "RMSNorm"
        provider.gated_linear_unit = True
        provider.add_bias_linear = False
        provider.add_qkv_bias = False
        provider.position_embedding_type = "rope"
        provider.rotary_base = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        provider.rotary_percent = float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
        provider.hidden_dropout = float(getattr(cfg, "resid_pdrop", 0.0) or 0.0)
        provider.attention_dropout = float(getattr(cfg, "attention_dropout", 0.0) or 0.0)
        provider.share_embeddings_and_output_weights = bool(getattr(cfg, "tie_word_embeddings", False))
        provider.sliding_window = getattr(cfg, "sliding_window", None)
        provider.rope_scaling = False  # Llama-3.1's scaling: not Phi3's
        provider.seq_len_interpolation_factor = None
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("longrope", "su"):
            short, long_, original, af = longrope_parameters(rope, int(cfg.max_position_embeddings))
            provider.longrope_short_factor, provider.longrope_long_factor = short, long_
            provider.longrope_original_max_position_embeddings, provider.longrope_attention_factor = original, af
            provider.apply_rope_fusion = False
        elif rope_type not in (None, "default"):
            raise XTokenError(f"Phi3 rope_type {rope_type!r} is not supported (default or longrope)")
        return provider

    @classmethod
    def megatron_to_hf_config(cls, provider: Phi3ModelProvider) -> dict:
        """The Hugging Face Phi3 config of a provider (LongRoPE and partial rotary included)."""
        hf = super(Phi3Bridge, cls).megatron_to_hf_config(provider)
        hf.pop("rope_theta", None)
        hf.pop("partial_rotary_factor", None)
        hf.pop("head_dim", None)
        rope = {"rope_theta": provider.rotary_base, "partial_rotary_factor": provider.rotary_percent, "rope_type": "default"}
        if provider.longrope_short_factor is not None:
            rope.update(
                rope_type="longrope", short_factor=list(provider.longrope_short_factor), long_factor=list(provider.longrope_long_factor),
                original_max_position_embeddings=provider.longrope_original_max_position_embeddings,
                attention_factor=provider.longrope_attention_factor,
            )
            hf["original_max_position_embeddings"] = provider.longrope_original_max_position_embeddings
        hf["rope_parameters"] = rope
        hf["sliding_window"] = provider.sliding_window
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        """Megatron ↔ HF parameter names; fused QKV and gate-up handled by their mappings."""
        names = {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "output_layer.weight": "lm_head.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
            "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight": "model.layers.*.input_layernorm.weight",  # TE spec
            "decoder.layers.*.input_layernorm.weight": "model.layers.*.input_layernorm.weight",  # local spec
            "decoder.layers.*.mlp.linear_fc1.layer_norm_weight": "model.layers.*.post_attention_layernorm.weight",  # TE spec
            "decoder.layers.*.pre_mlp_layernorm.weight": "model.layers.*.post_attention_layernorm.weight",  # local spec
            "decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.self_attn.o_proj.weight",
            "decoder.layers.*.mlp.linear_fc2.weight": "model.layers.*.mlp.down_proj.weight",
        }
        mappings: list = [AutoMapping(megatron_param=m, hf_param=h) for m, h in names.items()]
        mappings += [
            ConcatenatedQKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.qkv_proj.weight"),
            FusedGatedMLPMapping("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_up_proj.weight"),
        ]
        return MegatronMappingRegistry(*mappings)
