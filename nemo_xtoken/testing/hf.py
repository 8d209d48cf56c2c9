"""Tiny random Hugging Face causal LMs written on the spot, with a real tokenizer (tests and benchmarks)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["write_tiny_llama"]


def write_tiny_llama(
    out: str | Path,
    tokenizer_json: str | Path,
    *,
    vocab_size: int,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 2,
    max_positions: int = 256,
    scale: float = 1.0,
) -> Path:
    """A random ``LlamaForCausalLM`` (``vocab_size`` output columns, may exceed the tokenizer's ids) saved with
    ``save_pretrained`` next to a copy of ``tokenizer_json`` (and its ``tokenizer_config.json``).

    ``scale`` multiplies the tied embedding/output weights: larger gives more peaked distributions.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer_json)
    shutil.copy(src, d / "tokenizer.json")
    if (src.parent / "tokenizer_config.json").is_file():
        shutil.copy(src.parent / "tokenizer_config.json", d / "tokenizer_config.json")
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    if scale != 1.0:
        with torch.no_grad():
            m.get_input_embeddings().weight.mul_(scale)
    m.save_pretrained(d)
    return d
