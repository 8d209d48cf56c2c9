"""A deterministic corpus of arithmetic word problems with 1- to 3-digit numbers.

Multi-digit numerals are what separates the methods (GSM8k in the paper): Llama-3 writes ``168``
as one token, Qwen3 as ``1 6 8``.  Every problem ends in ``Answer: N`` so that exact-answer
accuracy can be read off greedy decoding of the student.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Problem", "generate_problems", "ANSWER_PREFIX"]

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
