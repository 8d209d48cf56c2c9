"""Short real-English passages for small CPU runs: consecutive sentences of a corpus document, cut to a length."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["short_passages", "write_jsonl", "random_conversations", "CHAT_WORDS"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def short_passages(path: str | Path, n: int, *, max_chars: int = 400, min_chars: int = 120) -> list[str]:
    """The first ``n`` passages of ``path`` (jsonl ``{"text"}``): whole sentences, in order, ``min_chars … max_chars`` long.

    Sentences longer than ``max_chars`` are skipped (never cut), so every passage is real,
    unmodified text.
    """
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cur = ""
            for sent in _SENTENCE_END.split(json.loads(line)["text"]):
                sent = sent.strip()
                if len(sent) > max_chars:
                    cur = ""
                    continue
                if cur and len(cur) + 1 + len(sent) > max_chars:
                    if len(cur) >= min_chars:
                        out.append(cur)
                        if len(out) == n:
                            return out
                    cur = ""
                cur = f"{cur} {sent}" if cur else sent
    return out


def write_jsonl(texts: list[str], path: str | Path) -> Path:
    """``{"text": …}`` per line."""
    p = Path(path)
    with open(p, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return p


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
