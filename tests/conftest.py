"""Shared fixtures: the real tokenizers (fetched once into $XTOKEN_CACHE) and built projections.

Megatron-Bridge imports on this CPU machine (no transformer_engine) through a scoped import hook
installed here, before any test imports it (``nemo_xtoken/cpu/bridge_te_shim.py``; a no-op
where transformer_engine is installed).
"""

from __future__ import annotations

import pytest

from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.cpu import bridge_te_shim

bridge_te_shim.install()


@pytest.fixture(scope="session")
def llama3_path():
    return str(tokenizer_path("llama3"))


@pytest.fixture(scope="session")
def qwen3_path():
    return str(tokenizer_path("qwen3"))


@pytest.fixture(scope="session")
def o200k_path():
    return str(tokenizer_path("o200k"))


@pytest.fixture(scope="session")
def llama3(llama3_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(llama3_path)


@pytest.fixture(scope="session")
def qwen3(qwen3_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(qwen3_path)


@pytest.fixture(scope="session")
def o200k(o200k_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(o200k_path)


@pytest.fixture(scope="session")
def w_llama3_qwen3(llama3, qwen3):
    """W for Llama-3 (student) → Qwen3 (teacher): numerals split on the teacher side."""
    from nemo_xtoken.vocab import build_projection

    return build_projection(llama3, qwen3)


@pytest.fixture(scope="session")
def w_llama3_o200k(llama3, o200k):
    """W for Llama-3 (student) → o200k (Phi-4-mini's base): numerals whole on both sides."""
    from nemo_xtoken.vocab import build_projection

    return build_projection(llama3, o200k)
