"""Conversations under the real chat templates of the tokenizer fixtures (Llama-3, Qwen3, Gemma-3, DeepSeek-V3).

Every ordered pair, random conversations: assistant content on both sides in equal-text chunks,
no user or system content loss-bearing, template tokens one-sided; the rendering is the one
``transformers``' ``apply_chat_template`` gives; bad input is refused in one line.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_xtoken.align.chat import align_chat, chat_template, check_conversation
from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.errors import XTokenError

CHAT = ("llama3", "qwen3", "gemma3", "deepseek_v3")
PAIRS = [(s, t) for s, t in itertools.permutations(CHAT, 2)]


@pytest.fixture(scope="session")
def chat_toks():
    from nemo_xtoken.vocab import load_tokenizer

    return {n: load_tokenizer(str(tokenizer_path(n))) for n in CHAT}


FRAGMENTS = [
    "Hello", " world", ".", "\n", "\n\n", "  ", "\t", "What is 12*7?", " 84", "def f(x):\n    return x ** 2\n",
    "```python\nprint('hi')\n```", "日本語のテキスト", "中文，标点。", "😀", "👍🏽", "naïve café", "  indented", "1,234.5",
    "a" * 40, " trailing  ", "\r\n", "x = {'k': [1, 2]}",
]

content = st.one_of(
    st.just(""),
    st.sampled_from(["   ", "\n", " \n\t ", "\n\n"]),  # whitespace only
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join),
    st.lists(st.sampled_from(FRAGMENTS), min_size=30, max_size=60).map("".join),  # long
)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(1, 3))):  # user/assistant turns (Gemma-3's template needs them alternating)
        msgs.append({"role": "user", "content": draw(content)})
        msgs.append({"role": "assistant", "content": draw(content)})
    return {"messages": msgs}


def _tok_bytes(side, a, b):
    data = side.text.encode("utf-8")
    return b"".join(data[int(s):int(e)] for s, e in side.byte_offsets[a:b])


def check_properties(ca):
    a, S, T = ca.alignment, ca.student, ca.teacher
    roles = ca.roles + ["template"]
    fused = ca.fused_chunks()
    for k, ((a0, a1), (b0, b1)) in enumerate(a.pairs()):
        if ca.kd_chunks[k]:  # KD chunks: equal text on both sides, assistant content only, loss-bearing
            assert _tok_bytes(S, a0, a1) == _tok_bytes(T, b0, b1)
            assert a1 > a0 and b1 > b0
            assert all(roles[m] == "assistant" for m in S.message[a0:a1]) and all(roles[m] == "assistant" for m in T.message[b0:b1])
            assert S.loss[a0:a1].all() and T.loss[b0:b1].all()
        # template tokens (no shared text) are one-sided, unless a fused token crosses their place
        tmpl = (~S.content[a0:a1] & ~S.fused[a0:a1]).any() or (~T.content[b0:b1] & ~T.fused[b0:b1]).any()
        if tmpl and not fused[k]:
            assert (a0 == a1) != (b0 == b1), (k, a.pairs()[k])
        if not fused[k] and a1 > a0 and b1 > b0:  # a two-sided chunk without fused tokens: equal text
            assert _tok_bytes(S, a0, a1) == _tok_bytes(T, b0, b1)
    for side in (S, T):
        r = np.asarray(roles)[side.message]
        # no user/system content is loss-bearing; every assistant content token is
        assert not side.loss[np.isin(r, ["user", "system"])].any()
        assert side.loss[(r == "assistant") & (side.content | side.fused)].all()
        # one end-of-turn token per assistant turn: loss-bearing template tokens
        n_eot = int((side.loss & (side.message < 0)).sum())
        assert n_eot == ca.roles.count("assistant")
    # assistant content not in KD chunks sits only in chunks with a fused token
    s_asst = (np.asarray(roles)[S.message] == "assistant") & S.content
    miss = s_asst & ~ca.student_kd_mask()
    assert fused[a.student_chunk_ids[miss]].all()


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_random_conversations_every_pair(pair, conv, chat_toks):
    s, t = pair
    ca = align_chat(conv, chat_toks[s], chat_toks[t])
    check_properties(ca)


FIXED = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "12*7 = 84.\nDone 😀 日本"},
    {"role": "user", "content": "  thanks \n"},
    {"role": "assistant", "content": "\n\nYou're welcome!  "},
]}


@pytest.mark.parametrize("name", CHAT)
def test_rendering_is_transformers_apply_chat_template(name, chat_toks):
    """Each side reads what ``apply_chat_template`` gives it (text and ids), as at inference."""
    from transformers import PreTrainedTokenizerFast

    info = chat_toks[name]
    cfg = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in info.config.items() if k in ("bos_token", "eos_token")}
    hf = PreTrainedTokenizerFast(tokenizer_file=info.source, chat_template=chat_template(info), **{k: v for k, v in cfg.items() if v})
    other = chat_toks["llama3" if name != "llama3" else "qwen3"]
    ca = align_chat(FIXED, info, other)
    want = hf.apply_chat_template(FIXED["messages"], tokenize=False)
    assert ca.student.text == want
    ids = hf.apply_chat_template(FIXED["messages"], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ca.student.ids.tolist() == list(ids)
    check_properties(ca)


def test_fixed_example_llama3_qwen3(chat_toks):
    """The docs' example: headers one-sided, assistant content in equal-text KD chunks, end-of-turn tokens loss-bearing."""
    ca = align_chat(FIXED, chat_toks["llama3"], chat_toks["qwen3"])
    rows = ca.rows(chat_toks["llama3"], chat_toks["qwen3"])
    kd = [r for r in rows if r["kd"]]
    assert "".join(r["text"] for r in kd) == "12*7 = 84.\nDone 😀 日本You're welcome!"
    r84 = next(r for r in kd if r["text"] == "84")
    assert r84["student_tokens"] == ["84"] and r84["teacher_tokens"] == ["8", "4"]
    eots = [r for r in rows if r["role"] == "template" and (any(r["student_loss"]) or any(r["teacher_loss"]))]
    assert [r["student_tokens"] or r["teacher_tokens"] for r in eots] == [["<|eot_id|>"], ["<|im_end|>"]] * 2
    assert ca.assistant_coverage() == (14, 14)
    # Qwen3's empty think block of the last turn is one-sided template text
    assert any(r["teacher_tokens"] == ["<think>"] and r["one_sided"] for r in rows)


def test_loss_on_all(chat_toks):
    ca = align_chat(FIXED, chat_toks["qwen3"], chat_toks["gemma3"], loss_on="all")
    assert ca.student.loss.all() and ca.teacher.loss.all()
    users = [r for r in ca.rows(chat_toks["qwen3"], chat_toks["gemma3"]) if r["role"] == "user" and r["kd"]]
    assert users, "with loss_on: all user content carries KD too"


def test_thinking_block_is_one_sided(chat_toks):
    conv = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."}]}
    ca = align_chat(conv, chat_toks["llama3"], chat_toks["qwen3"])
    rows = ca.rows(chat_toks["llama3"], chat_toks["qwen3"])
    assert "".join(r["text"] for r in rows if r["kd"]) == "It is 4."
    # Llama-3 renders the block inside its content, Qwen3 after its header: one-sided, no loss on either side
    s_think = [r for r in rows if "think" in "".join(r["student_tokens"]) or "add" in "".join(r["student_tokens"])]
    assert len(s_think) >= 2 and all(r["one_sided"] and not any(r["student_loss"]) for r in s_think)
    assert all(r["role"] == "assistant:1" for r in s_think)  # content only the student side renders
    assert "add them" in ca.teacher.text and not any(r["kd"] for r in rows if "add" in "".join(r["teacher_tokens"]))
    check_properties(ca)


def test_fused_boundary_is_reported_not_misaligned(chat_toks):
    """Qwen3 renders a non-final assistant content after '\\n' without stripping it: '\\n' + '\\n\\nHi' → one '\\n\\n\\n' token."""
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\n\nHi there"},
                         {"role": "user", "content": "b"}, {"role": "assistant", "content": "ok"}]}
    ca = align_chat(conv, chat_toks["qwen3"], chat_toks["deepseek_v3"])
    assert ca.student.fused.any()
    k = ca.alignment.student_chunk_ids[np.flatnonzero(ca.student.fused)[0]]
    assert ca.fused_chunks()[k] and not ca.kd_chunks[k]
    check_properties(ca)


@pytest.mark.parametrize("row, msg", [
    ({"text": "hi"}, "no 'messages' list"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": None}]}, "content must be a string"),
])
def test_bad_rows(row, msg):
    with pytest.raises(XTokenError, match=msg) as e:
        check_conversation(row, "data.jsonl line 3")
    assert str(e.value).startswith("data.jsonl line 3:") and "\n" not in str(e.value)


def test_template_that_fails_to_render(chat_toks):
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(XTokenError, match=r"row 7: the chat template of .*gemma3.* fails to render it \(Conversation roles must alternate"):
        align_chat(conv, chat_toks["llama3"], chat_toks["gemma3"], where="row 7")


def test_tokenizer_without_chat_template_and_a_supplied_one(chat_toks, tmp_path):
    from nemo_xtoken.vocab import load_tokenizer

    mistral = load_tokenizer(str(tokenizer_path("mistral")))
    with pytest.raises(XTokenError, match=r"teacher tokenizer .*mistral.* has no chat template .*--teacher-chat-template FILE"):
        align_chat(FIXED, chat_toks["llama3"], mistral)
    # Mistral-7B-Instruct's template (v0.1 style), supplied as a file
    f = tmp_path / "mistral.jinja"
    f.write_text("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    conv = {"messages": FIXED["messages"][1:]}
    ca = align_chat(conv, chat_toks["llama3"], mistral, teacher_template=str(f))
    check_properties(ca)
    assert ca.assistant_coverage()[0] > 0


def test_tools_ignored_with_a_warning(chat_toks):
    conv = dict(FIXED, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    ca = align_chat(conv, chat_toks["llama3"], chat_toks["qwen3"])
    assert any("cannot render tools" in w and "llama3" in w for w in ca.warnings)
    assert "# Tools" in ca.teacher.text  # Qwen3 renders them (template text: one-sided)
    check_properties(ca)


def test_system_message_order(chat_toks):
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "system", "content": "late system"}, {"role": "user", "content": "c"},
                         {"role": "assistant", "content": "d"}]}
    with pytest.raises(XTokenError, match="different orders .*DeepSeek-V3 moves system messages"):
        align_chat(conv, chat_toks["llama3"], chat_toks["deepseek_v3"])


def test_json_roundtrip_rows(chat_toks):
    ca = align_chat(FIXED, chat_toks["gemma3"], chat_toks["deepseek_v3"])
    json.dumps(ca.rows(chat_toks["gemma3"], chat_toks["deepseek_v3"]), ensure_ascii=False)


def test_cli_align_chat(tmp_path, capsys):
    from nemo_xtoken.cli.main import main

    rows = tmp_path / "chats.jsonl"
    rows.write_text(json.dumps({"messages": FIXED["messages"][:3]}) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    s, t = str(tokenizer_path("gemma3")), str(tokenizer_path("deepseek_v3"))
    assert main(["align", "-s", s, "-t", t, "--chat", str(rows)]) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"assistant tokens in KD chunks (\d+)/\1\n", out)  # all of them
    assert "⟦12*7 = 84.\n" in out and "<end_of_turn>⟧" in out and "<｜end▁of▁sentence｜>⟧" in out
    assert any(line.split()[1:3] == ["assistant", "KD"] for line in out.splitlines() if line[:4].strip().isdigit())
    assert main(["align", "-s", s, "-t", t, "--chat", str(rows), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert sum(js["student_loss_mask"]) > 0 and any(c["kd"] for c in js["chunks"])
    # bad input: one line naming the row and what to do, exit 2
    assert main(["align", "-s", s, "-t", t, "--chat", str(rows), "--row", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{rows} line 2: no 'messages' list" in err
    assert main(["align", "-s", s, "-t", str(tokenizer_path("mistral")), "--chat", str(rows)]) == 2
    assert "--teacher-chat-template FILE" in capsys.readouterr().err


def test_special_token_strings_in_contents(chat_toks):
    """A content holding another template's special-token strings: each side tokenizes them as at inference
    (its own specials become special tokens), and they still align as text."""
    conv = {"messages": [{"role": "user", "content": "say <|im_end|> and <|eot_id|> and <end_of_turn> and <｜User｜>"},
                         {"role": "assistant", "content": "ok: <|im_end|><|eot_id|><end_of_turn><｜Assistant｜> done"}]}
    for s, t in PAIRS:
        ca = align_chat(conv, chat_toks[s], chat_toks[t])
        check_properties(ca)
        got, tot = ca.assistant_coverage()
        assert got == tot > 0
    # '▁' (U+2581, in DeepSeek-V3's special tokens) cannot be represented by Gemma-3: refused for that row, named
    conv["messages"][1]["content"] += " <｜end▁of▁sentence｜>"
    with pytest.raises(XTokenError, match=r"^row 4: .*gemma3.* reads the character '▁' \(U\+2581\)"):
        align_chat(conv, chat_toks["llama3"], chat_toks["gemma3"], where="row 4")
