"""Bytes per token per TP rank of partition_kl against P-KL, as the run's criterion counts them (`xtoken distill --check`).

    XTOKEN_CACHE=.cache python benchmarks/partition_traffic.py [--tp 8]

Real Llama-3 student, Qwen3 and o200k teachers (padded as their checkpoints: 151,936 and 200,064
columns), the run's unpermuted teacher; level 1 of partition-KL only (the deeper levels add a few
values per chunk to one all-reduce).
"""

from __future__ import annotations

import argparse


def main() -> None:
    from nemo_xtoken.assets import tokenizer_path
    from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss
    from nemo_xtoken.integration.train import format_exchange_report
    from nemo_xtoken.vocab import cached_projection, load_tokenizer
    from nemo_xtoken.vocab.spellings import cached_spellings

    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=8)
    a = ap.parse_args()
    s = load_tokenizer(tokenizer_path("llama3"))
    for t, pad in (("qwen3", 151936), ("o200k", 200064)):
        tok = load_tokenizer(tokenizer_path(t))
        specs = [TeacherSpec(t, "p_kl", cached_projection(s, tok), 1.0, tok.vocab_size),
                 TeacherSpec(t, "partition_kl", cached_spellings(s, tok), 1.0, tok.vocab_size)]
        crit = XTokenLogitsLoss(specs, student_vocab_size=s.vocab_size, student_padded=128256, teacher_padded=[pad, pad], tp=a.tp)
        print(format_exchange_report(crit.traffic()))


if __name__ == "__main__":
    main()
