"""Demo corpus and vocabulary reduction."""

from __future__ import annotations

import numpy as np

from nemo_xtoken.demo.corpus import ANSWER_PREFIX, generate_problems
from nemo_xtoken.demo.vocab_subset import VocabSubset, reduce_projection


def test_problems_are_deterministic_and_correct():
    a, b = generate_problems(300, seed=3), generate_problems(300, seed=3)
    assert a == b and a != generate_problems(300, seed=4)
    for p in a:
        assert p.text.startswith(p.question) and p.text.endswith(f"{ANSWER_PREFIX} {p.answer}")
        assert 1 <= p.answer <= 999
        nums = [int(w.strip(".,?")) for w in p.question.split() if w.strip(".,?").isdigit()]
        assert nums and all(1 <= x <= 999 for x in nums)
        if "gives away" in p.question:
            assert p.answer == nums[0] - nums[1]
        elif "boxes" in p.question:
            assert p.answer == nums[0] * nums[1]
        else:
            assert p.answer == sum(nums)
    assert {len(str(p.answer)) for p in a} == {1, 2, 3}  # 1- to 3-digit answers all occur


def test_reduced_projection_is_the_real_w_restricted(llama3, qwen3, w_llama3_qwen3):
    texts = [p.text for p in generate_problems(50, seed=0)]
    s_ids = [i for t in texts for i in llama3.tokenizer.encode(t, add_special_tokens=False).ids]
    t_ids = [i for t in texts for i in qwen3.tokenizer.encode(t, add_special_tokens=False).ids]
    ssub = VocabSubset.from_ids(s_ids)
    red, tsub = reduce_projection(w_llama3_qwen3, ssub, t_ids)
    assert red.shape == (ssub.size, tsub.size)
    assert set(np.asarray(t_ids)) <= set(tsub.kept.tolist())
    for new_s, old_s in enumerate(ssub.kept):
        got = [(int(tsub.kept[t]), w) for t, w in red.row(new_s)]
        assert got == w_llama3_qwen3.row(int(old_s))  # same weights, no mass lost
    np.testing.assert_array_equal(ssub.to_old(ssub.to_new(s_ids)), s_ids)
