"""H-KL's common set on the real tokenizers: ours (``common_set: top1``) against NeMo-RL's (``reference``).

    python benchmarks/common_sets.py

Prints, per teacher of a Llama-3 student, the student rows and teacher tokens of each common set,
GOLD's strict exact set, and how many (student row, teacher token) pairs one set has that the
other lacks (docs/losses.md, "Options that follow the reference code").
"""

from __future__ import annotations

from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.losses import reference as ref
from nemo_xtoken.vocab import build_projection, load_tokenizer


def pairs(c: ref.CommonSet) -> set[tuple[int, int]]:
    return set(zip(c.student_ids.tolist(), c.teacher_ids[c.group].tolist()))


def main() -> None:
    student = load_tokenizer(str(tokenizer_path("llama3")))
    print("| student → teacher | top1: student rows | top1: teacher tokens | reference: rows = teacher tokens "
          "| GOLD exact | top1 pairs not in reference | reference pairs not in top1 |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("qwen3", "Qwen3"), ("o200k", "o200k")):
        w = ref.resolve_projection(build_projection(student, load_tokenizer(str(tokenizer_path(name)))))
        top1, rc, ex = ref.top1_common_set(w), ref.reference_common_set(w), ref.exact_common_set(w)
        a, b = pairs(top1), pairs(rc)
        print(f"| Llama-3 → {label} | {top1.student_ids.numel():,} | {top1.teacher_ids.numel():,} | {rc.student_ids.numel():,} "
              f"| {ex.student_ids.numel():,} | {len(a - b):,} | {len(b - a):,} |")


if __name__ == "__main__":
    main()
