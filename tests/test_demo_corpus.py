"""Demo corpus, data (every token in the loss, held-out answers never seen) and vocabulary reduction."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nemo_xtoken.demo.corpus import ANSWER_KINDS, generate_stories, story_splits
from nemo_xtoken.demo.vocab_subset import VocabSubset, reduce_projection


def _check_answer(story, a) -> None:
    """Recompute each answer from the text before it (the corpus' templates)."""
    before, value = story.prompt(a), int(story.value(a))
    sentence = before[before.rfind(". ") + 2 :] if a.kind != "copy" else before[before.rfind("At the market") :]
    nums = [int(x) for x in re.findall(r"\d+", sentence)]
    if a.kind == "add":
        assert value == nums[-2] + nums[-1], (sentence, value)
    elif a.kind == "mul":
        assert value == nums[-2] * nums[-1], (sentence, value)
    else:
        good = re.search(r"buys the (\w+) for $", sentence).group(1)
        assert value == int(re.search(rf"a {good} costs (\d+) coins", sentence).group(1)), (sentence, value)


def test_stories_are_deterministic_and_answers_follow_from_the_text():
    a, b = generate_stories(300, seed=3), generate_stories(300, seed=3)
    assert a == b and a != generate_stories(300, seed=4)
    kinds, digits = set(), set()
    for s in a:
        assert " ".join(s.sentences) == s.text
        for ans in s.answers:
            assert s.text[ans.start - 1] == " " and s.value(ans).isdigit() and not s.text[ans.end].isdigit()
            _check_answer(s, ans)
            kinds.add(ans.kind)
            digits.add(len(s.value(ans)))
    assert kinds == set(ANSWER_KINDS) and digits == {1, 2, 3}


def test_splits_are_disjoint_and_held_out_sentences_never_seen():
    t, s, e = story_splits(1500, 600, 200, seed=0)
    assert (len(t), len(s), len(e)) == (1500, 600, 200)
    texts = [x.text for x in t + s + e]
    assert len(set(texts)) == len(texts)
    seen = {x for st in t + s for x in st.sentences}
    assert not any(x in seen for st in e for x in st.sentences)
    assert story_splits(1500, 600, 200, seed=0) == (t, s, e)


def test_demo_data_every_token_is_in_the_loss(llama3, qwen3, w_llama3_qwen3):
    from nemo_xtoken.demo.data import build_demo_data

    t, s, e = story_splits(40, 30, 10, seed=0)
    data = build_demo_data(llama3, {"qwen3": (qwen3, w_llama3_qwen3), "llama3": (llama3, None)}, t, s, e, seq_length=80, teacher_seq_length=96)
    q, l3 = data.sides["qwen3"], data.sides["llama3"]
    assert l3.projection is None and np.array_equal(l3.subset.kept, data.student_subset.kept)
    for side in (q, l3):
        f = side.student_train.fields
        n_tok = [len(llama3.tokenizer.encode(x.text, add_special_tokens=False).ids) for x in s]
        assert f["loss_mask"].sum(1).tolist() == [n - 1 for n in n_tok]  # every token but the first has a loss
        n_t = side.student_train.t_len
        assert side.student_train.fields["teacher_loss_mask"].sum(1).tolist() == (n_t - 1).tolist()
        tok = qwen3 if side is q else llama3
        own = [len(tok.tokenizer.encode(x.text).ids) for x in t]  # the teachers train on every token of their corpus
        assert side.teacher_train.fields["teacher_loss_mask"].sum(1).tolist() == [n - 1 for n in own]
        row = side.teacher_train.rows([3])
        assert "".join(side.token_texts[i] for i in row["teacher_tokens"][0].tolist()) == t[3].text
    # the student side is the same for every teacher, and so is the order of a seed
    for k in ("tokens", "labels", "loss_mask"):
        assert np.array_equal(q.student_train.fields[k].numpy(), l3.student_train.fields[k].numpy())
    b1, b2 = q.student_train.batch(0, 8, seed=5), l3.student_train.batch(0, 8, seed=5)
    assert np.array_equal(b1["tokens"].numpy(), b2["tokens"].numpy())
    assert not np.array_equal(b1["tokens"].numpy(), q.student_train.batch(0, 8, seed=6)["tokens"].numpy())
    # the held-out prompts end right before the answer, in every tokenization
    n_ans = sum(len(x.answers) for x in e)
    assert len(data.student_prompts.ids) == len(q.prompts.ids) == n_ans
    for ids, ans in zip(q.prompts.ids, q.prompts.answers):
        assert "".join(q.token_texts[i] for i in ids).endswith(" ") and ans.isdigit()


def test_reduced_projection_is_the_real_w_restricted(llama3, qwen3, w_llama3_qwen3):
    texts = [p.text for p in generate_stories(50, seed=0)]
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


@pytest.mark.parametrize("text,cat", [("461", "numeral"), (" 7", "numeral"), (" apples", "word"), ("Ivan", "word"), (".", "other"), (" ", "other"), (".\n", "other")])
def test_token_category(text, cat):
    from nemo_xtoken.demo.data import token_category

    assert token_category(text) == cat
