"""Short real-English passages for small CPU runs: consecutive sentences of a corpus document, cut to a length."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["short_passages", "write_jsonl"]

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
