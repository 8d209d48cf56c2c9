"""A deterministic corpus of arithmetic word problems with 1- to 3-digit numbers.

Multi-digit numerals are what separates the methods (GSM8k in the paper): Llama-3 writes ``168``
as one token, Qwen3 as ``1 6 8``.  Every problem ends in ``Answer: N`` so that exact-answer
accuracy can be read off greedy decoding of the student.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Problem", "generate_problems", "price_problems", "ANSWER_PREFIX", "PRICE_END"]

ANSWER_PREFIX = " Answer:"

_NAMES = ["Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Kofi", "Sara", "Ivan", "Yuki", "Noah", "Zara"]
_ITEMS = ["apples", "books", "coins", "marbles", "stamps", "cards", "shells", "pencils", "stickers", "beads"]


@dataclass(frozen=True)
class Problem:
    """One word problem: ``question`` + ``ANSWER_PREFIX`` + ``" " + str(answer)``."""

    question: str
    answer: int

    @property
    def prompt(self) -> str:
        """The text the model sees before it must produce the answer."""
        return self.question + ANSWER_PREFIX

    @property
    def text(self) -> str:
        """The full training text."""
        return f"{self.prompt} {self.answer}"


def _one(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul", "add3"])
    if kind == "add":
        a = rng.randint(1, 899)
        b = rng.randint(1, 999 - a)
        q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
        return Problem(q, a + b)
    if kind == "sub":
        a = rng.randint(2, 999)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} are left?"
        return Problem(q, a - b)
    if kind == "mul":
        a = rng.randint(2, 9)
        b = rng.randint(2, 999 // a)
        q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        return Problem(q, a * b)
    a = rng.randint(1, 300)
    b = rng.randint(1, 300)
    c = rng.randint(1, 999 - a - b)
    q = f"{name} finds {a} {item}, then {b} {item}, then {c} {item}. How many {item} did {name} find?"
    return Problem(q, a + b + c)


def generate_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems, identical for equal ``(n, seed)`` on every machine (answers 1…999)."""
    rng = random.Random(seed)
    return [_one(rng) for _ in range(n)]


# ---- the demo's task: price look-up (learnable by a tiny transformer in a CPU budget) -----------

PRICE_END = "."

_GOODS = ["apples", "books", "pens", "shoes", "lamps", "chairs", "cups", "hats", "kites", "maps", "bikes", "clocks"]


def _price(rng: random.Random) -> int:
    """1-, 2- and 3-digit prices equally often (so every numeral category of the audit is exercised)."""
    digits = rng.choice((1, 2, 3))
    return rng.randint(max(1, 10 ** (digits - 1)), 10**digits - 1)


def price_problems(n: int, seed: int = 0, *, min_items: int = 2, max_items: int = 3) -> list[Problem]:
    """``n`` price look-ups: ``"At the shop apples cost 347, books cost 52 and pens cost 8. How much do books cost?"``.

    The answer is one of the question's numbers (1…999, distinct within a problem), selected by the
    goods asked about: a two-layer transformer can learn it (an associative recall), and the answer is
    a multi-digit numeral — one token for Llama-3 and o200k, one token per digit for Qwen3.  A model
    that copies a random number of the question scores about ``1/k`` (k = 2 or 3 goods).
    Identical for equal arguments on every machine.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_items, max_items)
        goods = rng.sample(_GOODS, k)
        prices: list[int] = []
        while len(prices) < k:
            p = _price(rng)
            if p not in prices:
                prices.append(p)
        facts = [f"{g} cost {p}" for g, p in zip(goods, prices)]
        listed = facts[0] if k == 1 else ", ".join(facts[:-1]) + " and " + facts[-1]
        j = rng.randrange(k)
        q = f"At the shop {listed}. How much do {goods[j]} cost?"
        out.append(Problem(q, prices[j]))
    return out
