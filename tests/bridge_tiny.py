"""Tiny random Hugging Face checkpoints (written by the tests) and run configs for the real Megatron-Bridge tests.

The architectures are the paper's: a Llama-3 student (tied embeddings, like Llama-3.2-1B), a Qwen3
teacher (QK-norm, untied) and a Phi3 teacher (Phi-4-mini's fused QKV and gate-up, partial rotary
0.75, LongRoPE, tied), plus a second Llama as a same-tokenizer teacher.  Vocabulary sizes are the
real checkpoints' (128,256 / 151,936 / 200,064) so the real tokenizers and W files apply; the rest
is tiny (hidden 32, 2 layers).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
VOCAB = {"llama": 128256, "qwen3": 151936, "phi3": 200064}
PHI3_ORIGINAL_MAX = 16  # LongRoPE switches to the long factors above this length

TEXTS = [
    "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it.",
    "Hundreds of numbers: 201, 307, 999 and 12 more.",
    "The quick brown fox jumps over the lazy dog, 3 times in 10 seconds.",
    "Phi-4-mini and Qwen3 split 2048 differently: one token or four digits.",
]


def phi3_config(*, tied: bool = True, vocab: int = VOCAB["phi3"], original: int = PHI3_ORIGINAL_MAX, max_pos: int = 256,
                partial: float = 0.75):
    """A tiny Phi3 config with partial rotary and LongRoPE factors far from 1 (so a wrong rotary shows)."""
    from transformers import Phi3Config

    head_dim = HIDDEN // HEADS
    n = int(head_dim * partial) // 2
    return Phi3Config(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=max_pos, original_max_position_embeddings=original,
        partial_rotary_factor=partial, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.7 * i for i in range(n)],
                      "long_factor": [3.0 + 2.5 * i for i in range(n)]},
    )


#: The real tokenizer each architecture's checkpoint ships with (Phi-4-mini's is o200k-based).
TOKENIZER = {"llama": "llama3", "qwen3": "qwen3", "phi3": "o200k"}


def write_tiny(kind: str, path: Path, *, seed: int, tied: bool | None = None, dtype: torch.dtype = torch.float32,
               with_tokenizer: bool = True, **kw) -> Path:
    """Write a random tiny ``kind`` ("llama", "qwen3", "phi3") checkpoint with ``save_pretrained``; returns ``path``.

    Like a real Hugging Face model folder it also holds the architecture's real tokenizer (copied from
    the asset cache), which Bridge's export copies along.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=kw.get("vocab", VOCAB["llama"]), hidden_size=HIDDEN, intermediate_size=FFN,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          max_position_embeddings=256, tie_word_embeddings=True if tied is None else tied,
                          bos_token_id=128000, eos_token_id=128001)
    elif kind == "qwen3":
        cfg = Qwen3Config(vocab_size=kw.get("vocab", VOCAB["qwen3"]), hidden_size=HIDDEN, intermediate_size=FFN,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          head_dim=HIDDEN // HEADS, max_position_embeddings=256, tie_word_embeddings=bool(tied))
    elif kind == "phi3":
        cfg = phi3_config(tied=True if tied is None else tied, **kw)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        import shutil

        from nemo_xtoken.assets import tokenizer_path

        src = tokenizer_path(TOKENIZER[kind]).parent
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, path / name)
    return path


def write_config(folder: Path, data: dict) -> Path:
    """Write a run config YAML into ``folder`` (relative paths in it resolve against ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "run.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def run_config(*, student: Path, llama_tok: str, teachers: list[dict], tp: int = 1, s: int = 24, steps: int = 4) -> dict:
    """A run config (as a dict) for tiny models: the paper's recipe shortened, data = ``docs.jsonl`` beside it."""
    return {
        "student": {"name": "llama_s", "tokenizer": llama_tok, "model": str(student), "seq_length": s},
        "teachers": teachers,
        # one document per row (packing off): a teacher's logits on a row must equal a plain Hugging Face forward of
        # that row, which does not keep packed documents apart (packing: tests/test_packing_equivalence.py)
        "data": {"paths": ["docs.jsonl"], "on_too_long": "split", "seed": 0, "packing": False},
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_fraction": 0.0},
        "train": {"train_iters": steps, "global_batch_size": 2, "micro_batch_size": 2, "bf16": False, "seed": 1},
        "parallel": {"tensor_model_parallel_size": tp},
        "checkpoint": {"save": "checkpoints/run", "save_interval": 2},
        "logging": {"tensorboard_dir": "tb/run"},
    }


def write_docs(folder: Path) -> Path:
    """``docs.jsonl`` with :data:`TEXTS`."""
    import json

    p = folder / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return p
