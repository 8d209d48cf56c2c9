"""Random conversations for the chat tests and benchmarks (real-English passages for CPU runs: :mod:`nemo_xtoken.data.corpus`)."""

from __future__ import annotations

__all__ = ["random_conversations", "CHAT_WORDS"]


#: Word pieces of :func:`random_conversations`: numerals, code, CJK, emoji, whitespace runs, punctuation.
CHAT_WORDS = ["The", " answer", " is", " 42", ".", "\n", " Sure", ",", " here", " code", ":\n```py\nx = 1\n```", " 日本語", " 😀",
              " 1,024", " prime", "  ", " why?", " Paris"]


def random_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"messages": [...]}``: an optional system prompt, then 1–3 user/assistant turns of random pieces."""
    import random

    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice(CHAT_WORDS) for _ in range(k)).strip() or "ok"

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(6)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text(rng.randint(2, 12))}, {"role": "assistant", "content": text(rng.randint(2, 30))}]
        out.append({"messages": msgs})
    return out
