"""The demo's corpus: short stories of worked arithmetic and quantities in prose (deterministic).

Every story is plain text a language model is trained on, **every token** of it (continued
pre-training, the paper's regime), e.g.::

    At the market a kite costs 461 coins. Mei buys the kite for 461 coins. Omar has 17 shells and
    finds 5 more, so Omar has 22 shells.

Numerals matter: some are free (prices, the operands: drawn at random, unpredictable), and some
**follow from the text before them** (the price paid is the one listed; a sum; a product).  Those are the story's :class:`Answer` spans: the held-out evaluation decodes them greedily
from the text before them and compares the digits.  Prices are 1-, 2- and 3-digit equally often, so
the numeral categories of the coverage audit all occur: one token each for Llama-3 and o200k, one
token per digit for Qwen3.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Answer", "Story", "generate_stories", "story_splits", "ANSWER_KINDS"]

ANSWER_KINDS = ("copy", "add", "mul")

# "Yusuf" and "lilies" are among the few words Llama-3 and o200k segment differently (Llama-3's
# " Yus" and "ilies" have no exact o200k match): there GOLD's common set and H-KL's relaxed one differ.
_NAMES = ["Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Kofi", "Sara", "Ivan", "Yuki", "Noah", "Zara", "Yusuf"]
_GOODS = ["kite", "lamp", "book", "cup", "hat", "clock", "map", "bike", "pen", "chair", "bowl", "drum"]
_ITEMS = ["apples", "shells", "coins", "marbles", "stamps", "cards", "beads", "pencils", "stones", "plums", "lilies"]


@dataclass(frozen=True)
class Answer:
    """A numeral of a story that follows from the text before it: characters ``[start, end)``, its kind."""

    start: int
    end: int
    kind: str  # "copy" (a price listed before) | "add" (a sum) | "mul" (a product)


@dataclass(frozen=True)
class Story:
    """One training or evaluation text, its answer spans and its sentences."""

    text: str
    answers: tuple[Answer, ...]
    sentences: tuple[str, ...] = ()

    def prompt(self, a: Answer) -> str:
        """The text before answer ``a`` (ends with the space before the numeral)."""
        return self.text[: a.start]

    def value(self, a: Answer) -> str:
        """The answer's digits."""
        return self.text[a.start : a.end]


def _price(rng: random.Random) -> int:
    """1-, 2- and 3-digit prices equally often."""
    digits = rng.choice((1, 2, 3))
    return rng.randint(max(1, 10 ** (digits - 1)), 10**digits - 1)


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.answers: list[Answer] = []
        self.sentences: list[str] = []
        self._mark = 0

    def end_sentence(self) -> None:
        self.sentences.append("".join(self.parts)[self._mark :])
        self._mark = self.n

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.n += len(text)

    def answer(self, value: int, kind: str) -> None:
        s = str(value)
        self.answers.append(Answer(self.n, self.n + len(s), kind))
        self.add(s)


def _shop(b: _Builder, rng: random.Random) -> None:
    good, price, name = rng.choice(_GOODS), _price(rng), rng.choice(_NAMES)
    b.add(f"At the market a {good} costs {price} coins. {name} buys the {good} for ")
    b.answer(price, "copy")
    b.add(" coins.")


def _add(b: _Builder, rng: random.Random) -> None:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    x, y = rng.randint(1, 20), rng.randint(1, 9)
    b.add(f"{name} has {x} {item} and finds {y} more, so {name} has ")
    b.answer(x + y, "add")
    b.add(f" {item}.")


def _mul(b: _Builder, rng: random.Random) -> None:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    x, y = rng.randint(2, 9), rng.randint(2, 9)
    b.add(f"{name} packs {x} bags with {y} {item} each, ")
    b.answer(x * y, "mul")
    b.add(f" {item} in all.")


def _story(rng: random.Random) -> Story:
    b = _Builder()
    kinds = [_shop, rng.choice([_add, _mul])]
    rng.shuffle(kinds)
    for i, k in enumerate(kinds):
        if i:
            b.add(" ")
            b._mark = b.n
        k(b, rng)
        b.end_sentence()
    return Story("".join(b.parts), tuple(b.answers), tuple(b.sentences))


def generate_stories(n: int, seed: int) -> list[Story]:
    """``n`` stories, identical for equal ``(n, seed)`` on every machine."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def story_splits(n_teacher: int, n_student: int, n_eval: int, seed: int = 0) -> tuple[list[Story], list[Story], list[Story]]:
    """Disjoint teacher, student and held-out corpora (no text occurs twice across or within them).

    The teachers train on their own corpus, the students on another.  No held-out story shares a
    sentence with a training story of either corpus (checked verbatim), so every answer the
    evaluation asks for must be worked out, never recalled from a training text.
    """
    seen: set[str] = set()
    train_sentences: set[str] = set()
    out: list[list[Story]] = []
    for k, n in enumerate((n_teacher, n_student, n_eval)):
        rng = random.Random(seed * 1000 + k + 1)
        part: list[Story] = []
        while len(part) < n:
            s = _story(rng)
            if s.text in seen or (k == 2 and any(x in train_sentences for x in s.sentences)):
                continue
            seen.add(s.text)
            if k < 2:
                train_sentences.update(s.sentences)
            part.append(s)
        out.append(part)
    return out[0], out[1], out[2]
