"""Conversations under every ordered pair of the fixtures' chat templates: how many assistant tokens carry KD, and the time.

Synthetic multi-turn conversations (system prompts, code, CJK, emoji, numerals; seeded), rendered by
each side with its own chat template and aligned (``nemo_xtoken.align.chat.align_chat``, what
``data.format: chat`` and ``xtoken preprocess --chat`` run per conversation).  Prints one row per
pair: assistant tokens of the student in KD chunks / all of them, fused chunks, CPU ms per conversation.

    XTOKEN_CACHE=.cache python benchmarks/chat_alignment.py [--n 500]
"""

from __future__ import annotations

import argparse
import itertools
import time


def main() -> None:
    from nemo_xtoken.align.chat import align_chat
    from nemo_xtoken.assets import tokenizer_path
    from nemo_xtoken.testing.text import random_conversations
    from nemo_xtoken.vocab import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    names = ("llama3", "qwen3", "gemma3", "deepseek_v3")
    toks = {n: load_tokenizer(str(tokenizer_path(n))) for n in names}
    convs = random_conversations(args.n, seed=1)
    for n in names:  # warm the per-tokenizer caches (canonical vocabularies, byte tables)
        align_chat(convs[0], toks[n], toks[names[0] if n != names[0] else names[1]])
    print("| student | teacher | assistant tokens in KD chunks | fused chunks | CPU ms / conversation |")
    print("|---|---|---|---|---|")
    for s, t in itertools.permutations(names, 2):
        got = tot = fused = 0
        t0 = time.process_time()
        for c in convs:
            ca = align_chat(c, toks[s], toks[t])
            g, a = ca.assistant_coverage()
            got, tot, fused = got + g, tot + a, fused + int(ca.fused_chunks().sum())
        ms = 1000 * (time.process_time() - t0) / len(convs)
        print(f"| {s} | {t} | {got}/{tot} ({got / tot:.2%}) | {fused} | {ms:.2f} |")


if __name__ == "__main__":
    main()
