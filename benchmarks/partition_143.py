"""The worked `143` example of docs/losses.md: partition-KL level by level against P-KL, real Llama-3 → Qwen3.

    XTOKEN_CACHE=.cache python benchmarks/partition_143.py

One chunk: the student (Llama-3) writes `143` as one token, the teacher (Qwen3) as `1 4 3`.  The
teacher's three positions put 0.9 on `1`, then 0.8 on `4`, then 0.7 on `3` (the rest spread evenly);
three students put 0.9 on `143`, on `1` or on `111` (the rest spread evenly); a fourth spreads its
0.9 as the teacher's string probabilities say: 0.9·0.8·0.7 on `143`, 0.9·0.8·0.3 on `14`, 0.9·0.2 on `1`.  Prints each
student's partition-KL per level and in total, and its P-KL with the built W (chain merge).
"""

from __future__ import annotations

import numpy as np
import torch


def _peaked(v: int, idx: int, p: float) -> torch.Tensor:
    x = torch.full((v,), (1 - p) / (v - 1), dtype=torch.float64)
    x[idx] = p
    return x.log()


def main() -> None:
    from nemo_xtoken.align.merge import AlignedPositions
    from nemo_xtoken.assets import tokenizer_path
    from nemo_xtoken.losses import p_kl, partition_kl
    from nemo_xtoken.losses.partition import build_partition_plan
    from nemo_xtoken.vocab import cached_projection, load_tokenizer
    from nemo_xtoken.vocab.spellings import cached_spellings

    s_tok, t_tok = load_tokenizer(tokenizer_path("llama3")), load_tokenizer(tokenizer_path("qwen3"))
    sp, W = cached_spellings(s_tok, t_tok), cached_projection(s_tok, t_tok)
    v_s, v_t = sp.shape
    sid = {x: s_tok.tokenizer.encode(x, add_special_tokens=False).ids[0] for x in ("143", "1", "111", "14")}
    tid = [t_tok.tokenizer.encode(x, add_special_tokens=False).ids[0] for x in ("1", "4", "3")]
    teacher = torch.stack([_peaked(v_t, tid[0], 0.9), _peaked(v_t, tid[1], 0.8), _peaked(v_t, tid[2], 0.7)])
    al = AlignedPositions(torch.tensor([0]), torch.tensor([0, 0, 0]), torch.tensor([sid["143"]]), torch.tensor(tid), 1)
    plan = build_partition_plan(al, sp)
    rep_s, rep_t, n_s, n_t = sp.level1()
    print(f"spelling of Llama-3 `143` in Qwen3 ids: {sp.spelling('student', sid['143'])} (= `1`, `4`, `3`: {tid})")
    print(f"level-1 bucket of Qwen3 `1`: {int(n_s[rep_t[tid[0]]])} Llama-3 tokens, {int(n_t[rep_t[tid[0]]])} Qwen3 token(s)")
    for r, lvl in enumerate(range(plan.lvl_chunk.size), start=2):
        cells = plan.cell_tok[plan.cell_level == lvl]
        print(f"level {r}: {cells.size - 1} buckets + rest, {int((plan.ent_cell[np.isin(plan.ent_cell, np.flatnonzero(plan.cell_level == lvl))]).size)} Llama-3 tokens extend the prefix")
    print()
    consistent = torch.full((v_s,), 0.1 / (v_s - 3), dtype=torch.float64)
    consistent[[sid["143"], sid["14"], sid["1"]]] = torch.tensor([0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.3, 0.9 * 0.2], dtype=torch.float64)
    print(f"{'student':<36} partition-KL  level 1  level 2  level 3   P-KL (W, chain)")
    for name in ("143", "1", "111", "143/14/1 as the teacher's strings"):
        s = consistent.log()[None] if "/" in name else _peaked(v_s, sid[name], 0.9)[None]
        total = float(partition_kl(s, teacher, sp, alignment=al))
        # level by level: truncate the teacher's chunk to its first r positions (a plan with r levels)
        parts = []
        for r in (1, 2, 3):
            a_r = AlignedPositions(torch.tensor([0]), torch.zeros(r, dtype=torch.long), torch.tensor([sid["143"]]), torch.tensor(tid[:r]), 1)
            parts.append(float(partition_kl(s, teacher[:r], sp, alignment=a_r)))
        lv = [parts[0], parts[1] - parts[0], parts[2] - parts[1]]
        pk = float(p_kl(s, teacher, W, alignment=al))
        label = name if "/" in name else f"0.9 on `{name}`"
        print(f"{label:<36} {total:12.3f}  {lv[0]:7.3f}  {lv[1]:7.3f}  {lv[2]:7.3f}   {pk:8.3f}")


if __name__ == "__main__":
    main()
