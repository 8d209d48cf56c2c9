"""partition_kl with a cached (top-k) teacher against the full teacher, on the real Llama-3 → Qwen3 vocabularies.

    XTOKEN_CACHE=.cache python benchmarks/partition_cached.py [--seed 0]

The text below is aligned by the real tokenizers; the teacher's logits are synthetic but shaped
like a language model's (Zipf-like: log-probability ∝ −1.1·log rank over a random order, the
observed next token on top), the student's random (an untrained student).  Prints the relative error of the loss value for k = 8, 32, 128 (and P-KL's, for
comparison), the mean rest mass ``r`` the cache drops.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

TEXT = ("Tom had 143 apples and gave 27 of them to Anna. Then he bought 1,250 more for $3.75 each; "
        "how many apples does Tom have now? Answer: 1366.")


def main() -> None:
    from nemo_xtoken.align import align
    from nemo_xtoken.assets import tokenizer_path
    from nemo_xtoken.losses import p_kl, partition_kl
    from nemo_xtoken.losses.sparse import SparseTeacher, sparse_from_logits
    from nemo_xtoken.vocab import cached_projection, load_tokenizer
    from nemo_xtoken.vocab.spellings import cached_spellings

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    s_tok, t_tok = load_tokenizer(tokenizer_path("llama3")), load_tokenizer(tokenizer_path("qwen3"))
    sp = cached_spellings(s_tok, t_tok)
    W = cached_projection(s_tok, t_tok)
    al, s_ids, t_ids = align(TEXT, s_tok, t_tok, student_add_bos=True, return_ids=True)
    aligned = al.to_positions(s_ids, t_ids)
    g = torch.Generator().manual_seed(a.seed)
    v_s, v_t = sp.shape
    n_t = len(t_ids)
    rank = torch.empty(n_t, v_t)
    for i in range(n_t):
        rank[i] = torch.randperm(v_t, generator=g).float() + 1.0
    teacher = -1.1 * torch.log(rank)
    nxt = torch.tensor(list(t_ids[1:]) + [t_ids[-1]])
    teacher[torch.arange(n_t), nxt] = teacher.max(dim=1).values + 1.0
    students = {"untrained (random logits)": torch.randn(len(s_ids), v_s, generator=g)}
    rows = []
    full = {name: (float(partition_kl(s, teacher, sp, alignment=aligned)), float(p_kl(s, teacher, W, alignment=aligned)))
            for name, s in students.items()}
    for k in (8, 32, 128):
        sparse = sparse_from_logits(teacher, k, vocab_size=v_t, targets=torch.tensor(list(t_ids[1:]) + [-1]))
        sparse = SparseTeacher(sparse.ids, sparse.log_probs, sparse.rest_log_mass, v_t)
        rest = float(sparse.rest_log_mass.exp().mean())
        for name, s in students.items():
            part = float(partition_kl(s, sparse, sp, alignment=aligned))
            pk = float(p_kl(s, sparse, W, alignment=aligned))
            f_part, f_pk = full[name]
            rows.append({"k": k, "student": name, "rest_mass": rest, "partition_kl": part, "partition_kl_full": f_part,
                         "partition_kl_rel_err": abs(part - f_part) / abs(f_part), "p_kl_rel_err": abs(pk - f_pk) / abs(f_pk)})
    print(f"{len(s_ids)} student / {n_t} teacher positions, {int(aligned.chunk_mask().sum())} chunks; seed {a.seed}")
    print("k     mean rest mass   partition-KL rel. error   P-KL rel. error   (student)")
    for r in rows:
        print(f"{r['k']:<5} {r['rest_mass']:14.3f}   {100 * r['partition_kl_rel_err']:21.2f} %   {100 * r['p_kl_rel_err']:13.2f} %   ({r['student']})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
