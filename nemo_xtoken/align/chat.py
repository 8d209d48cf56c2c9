"""Conversations: each side renders them with its own chat template; message contents align, template text is one-sided.

**Rendering.**  A conversation is ``{"messages": [{"role", "content"}, ...]}`` (roles ``system``,
``user``, ``assistant``; an optional ``tools`` list is passed to templates that use it and ignored,
with a warning, by the others).  Each side renders it with **its own** chat template (the
``chat_template`` of its ``tokenizer_config.json``, or one supplied as a file or string) through
``transformers``' renderer (:func:`transformers.utils.chat_template_utils.render_jinja_template`,
with the tokenizer's special tokens as variables and ``add_generation_prompt=False``), and
tokenizes the rendering with ``add_special_tokens=False``: exactly what the model reads at
inference, as ``apply_chat_template`` does.

**Where each message's content is.**  The template is rendered a second time with every content
replaced by a unique marker; the text between markers is the template's own.  The real rendering
must be that template text with each content (or what the template made of it: trimmed
whitespace, Qwen3's ``</think>`` split) in place of its marker, which locates every content
exactly, or the conversation is refused naming the message.

**Shared text.**  Per message, the text both renderings contain (the content less whatever either
template stripped) is shared text; everything else (headers, special tokens, whitespace one
template strips and the other keeps, a reasoning block one template moves into its header) is
template text.  Each token gets offsets in the shared text (its bytes outside the shared text have
zero width), and :func:`~nemo_xtoken.align.align_offsets` aligns them: contents align exactly as
raw text does; a token of template text only is a one-sided chunk of its side.

**Fused tokens.**  A token whose bytes are partly shared text and partly template text (a
template's newline merged with a content's leading newline into one ``"\\n\\n\\n"`` token; a
leading space one side strips and the other keeps, merged into ``" Hello"``) keeps its content
part in the alignment, so nothing is misaligned, but its chunk covers more than equal text on
that side: **chunks with a fused or template token carry no KD** (they are counted and reported).

**Loss masks.**  ``loss_on="assistant"`` (default): a token is loss-bearing when it covers shared
text of an assistant message, or is the end-of-turn token of an assistant turn (the first token
after the content when it is a special token: ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``,
``<｜end▁of▁sentence｜>``).  ``loss_on="all"``: every token.  A chunk carries KD when it is
two-sided and every token in it, on both sides, is loss-bearing and shared text only.

**Thinking.**  Rendering is non-thinking by default (``enable_thinking=False`` for templates that
read it).  A ``<think>…</think>`` block inside an assistant message is rendered by each template as
at inference; Qwen3 moves it into ``<think>\\n…\\n</think>\\n\\n`` after its header, so it is not
shared text: a reasoning block is one-sided and carries no loss on either side (the answer after
it does).  Aligning reasoning on both sides is not done.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_xtoken.errors import XTokenError

__all__ = [
    "ROLES",
    "LOSS_ON",
    "ChatSide",
    "ChatAlignment",
    "chat_template",
    "check_conversation",
    "render_chat",
    "align_chat",
    "read_conversations",
    "masked_text",
]

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")
_MARK = "\ue000xtoken{}\ue001"
_MARK_RE = re.compile("\ue000xtoken(\\d+)\ue001")
DEFAULT_TEMPLATE_KWARGS: dict[str, Any] = {"enable_thinking": False}


def chat_template(tokenizer: Any, template: str | os.PathLike[str] | None = None, *, side: str = "") -> str:
    """The Jinja chat template of a side: ``template`` (a file or a template string) or the tokenizer's own.

    The tokenizer's own is the ``chat_template`` of its ``tokenizer_config.json`` (a list of named
    templates: the one named ``default``).  None → :class:`XTokenError` saying how to supply one.
    """
    from nemo_xtoken.vocab import load_tokenizer

    if template is not None:
        t = str(template)
        if "{%" in t or "{{" in t:
            return t
        p = Path(t).expanduser()
        if not p.is_file():
            raise XTokenError(f"chat template {t}: no such file (pass a Jinja file or a template string)")
        text = p.read_text("utf-8")
        if p.suffix == ".json":  # a tokenizer_config.json or chat_template.json
            try:
                text = json.loads(text).get("chat_template") or ""
            except (ValueError, AttributeError):
                raise XTokenError(f"chat template {p}: not a JSON object with a chat_template") from None
        if not text.strip():
            raise XTokenError(f"chat template {p} is empty")
        return text
    info = load_tokenizer(tokenizer)
    t = info.config.get("chat_template")
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if not isinstance(t, str) or not t.strip():
        who = f"{side} " if side else ""
        flag = f"--{side}-chat-template FILE" if side else "a chat template"
        raise XTokenError(
            f"{who}tokenizer {info.source} has no chat template (its tokenizer_config.json has no chat_template): "
            f"pass {flag} (a Jinja file, e.g. the instruct model's chat_template; in a run config: chat_template)"
        )
    return t


def _special_kwargs(info: Any) -> dict[str, str]:
    """The tokenizer's special tokens as template variables (as ``apply_chat_template`` passes them)."""
    out = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = info.config.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def check_conversation(row: Any, where: str = "row") -> tuple[list[dict[str, str]], list | None]:
    """The messages (and tools) of a row, checked: a ``messages`` list of ``{role, content}`` with known roles."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise XTokenError(f"{where}: no 'messages' list (has {have}): a chat row is {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
    msgs = row["messages"]
    if not msgs:
        raise XTokenError(f"{where}: 'messages' is empty: give at least one message")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise XTokenError(f"{where}: message {j} is a {type(m).__name__}, not a {{role, content}} object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise XTokenError(f"{where}: message {j} has role {role!r}: roles are {list(ROLES)} (convert or drop the others)")
        if not isinstance(content, str):
            raise XTokenError(f"{where}: message {j} ({role}) has no text content (got {type(content).__name__}): content must be a string")
        out.append({"role": role, "content": content})
    tools = row.get("tools")
    return out, (tools if isinstance(tools, list) and tools else None)


def _think_split(c: str) -> int:
    """Where Qwen3's template starts an assistant content containing ``</think>`` (after the block and newlines)."""
    k = c.rfind("</think>")
    if k < 0:
        return -1
    k += len("</think>")
    return k + (len(c[k:]) - len(c[k:].lstrip("\n")))


def _candidates(c: str, role: str) -> list[tuple[int, int]]:
    """(chars stripped at the start, at the end) of what a template may render of content ``c``, longest first."""
    n = len(c)
    lead = {0, n - len(c.lstrip()), n - len(c.lstrip("\n"))}
    trail = {0, n - len(c.rstrip()), n - len(c.rstrip("\n"))}
    if role == "assistant":
        k = _think_split(c)
        if k >= 0:
            lead |= {k, k + len(c[k:]) - len(c[k:].lstrip())}
    out = {(a, b) for a in lead for b in trail if a + b <= n}
    return sorted(out, key=lambda ab: (ab[0] + ab[1], ab))


def _render(template: str, messages: list[dict], tools: list | None, kwargs: dict[str, Any], where: str, source: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        out, _ = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=False, **kwargs)
    except Exception as e:  # jinja2 errors and the templates' raise_exception
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise XTokenError(f"{where}: the chat template of {source} fails to render it ({msg}): fix the conversation or pass another chat template") from None
    return out[0]


def _template_uses(template: str, name: str) -> bool:
    from transformers.utils.chat_template_utils import _get_template_variables

    try:
        return name in _get_template_variables(template)
    except Exception:
        return name in template


@dataclass
class _Rendered:
    text: str
    # per message: (char start of what the template rendered of the content, chars stripped at start, at end); None: not rendered
    spans: list[tuple[int, int, int] | None]
    warnings: list[str]


def render_chat(messages: list[dict[str, str]], tokenizer: Any, template: str | None = None, *, tools: list | None = None,
                template_kwargs: dict[str, Any] | None = None, where: str = "conversation", side: str = "") -> _Rendered:
    """Render ``messages`` with a side's chat template and locate every message's content in the rendering."""
    from nemo_xtoken.vocab import load_tokenizer

    info = load_tokenizer(tokenizer)
    tpl = chat_template(info, template, side=side)
    kwargs = {**_special_kwargs(info), **DEFAULT_TEMPLATE_KWARGS, **(template_kwargs or {})}
    warnings = []
    if tools is not None and not _template_uses(tpl, "tools"):
        warnings.append(f"{where}: the chat template of {info.source} cannot render tools: the row's tools are ignored on that side")
        tools = None
    text = _render(tpl, messages, tools, kwargs, where, info.source)
    marked = []
    for j, m in enumerate(messages):
        mm = dict(m, content=_MARK.format(j))
        if m["role"] == "assistant" and _think_split(m["content"]) >= 0:
            c = m["content"]
            mm["reasoning_content"] = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        marked.append(mm)
    mtext = _render(tpl, marked, tools, kwargs, where, info.source)
    pieces = _MARK_RE.split(mtext)  # template, index, template, index, ..., template
    order = [int(x) for x in pieces[1::2]]
    tmpl = pieces[0::2]
    if len(set(order)) != len(order):
        raise XTokenError(f"{where}: the chat template of {info.source} renders a message's content more than once: it cannot be aligned")
    spans: list[tuple[int, int, int] | None] = [None] * len(messages)
    pos = 0
    if not text.startswith(tmpl[0]):
        raise XTokenError(f"{where}: the chat template of {info.source} renders text that depends on the contents before the first one: it cannot be aligned")
    pos = len(tmpl[0])
    for k, j in enumerate(order):
        c, nxt, last = messages[j]["content"], tmpl[k + 1], k + 1 == len(order)
        for a, b in _candidates(c, messages[j]["role"]):
            r = c[a: len(c) - b]
            if text.startswith(r, pos) and (text[pos + len(r):] == nxt if last else text.startswith(nxt, pos + len(r))):
                spans[j] = (pos, a, b)
                pos += len(r) + len(nxt)
                break
        else:
            raise XTokenError(
                f"{where}: the chat template of {info.source} changes message {j} ({messages[j]['role']}) in a way the "
                "alignment cannot follow (only stripped whitespace and a </think> split are followed): fix the message or the template"
            )
    for j, s in enumerate(spans):
        if s is None and messages[j]["content"]:
            warnings.append(f"{where}: the chat template of {info.source} does not render message {j} ({messages[j]['role']})")
    return _Rendered(text, spans, warnings)


@dataclass
class ChatSide:
    """One side's rendering of a conversation, tokenized, with per-token masks.

    ``byte_offsets`` index ``text`` (UTF-8); ``shared_offsets`` index the shared text (the
    messages' common content, in order).  ``content[i]``: token ``i`` is shared text only;
    ``fused[i]``: partly shared text, partly template; ``loss[i]``: loss-bearing (see the module
    docstring); ``message[i]``: the message whose shared text the token covers (-1: template).
    """

    text: str
    ids: np.ndarray
    byte_offsets: np.ndarray
    shared_offsets: np.ndarray
    content: np.ndarray
    fused: np.ndarray
    loss: np.ndarray
    message: np.ndarray
    source: str = ""
    rendered_message: np.ndarray | None = None  # the message whose rendered content holds the token's first byte (-1: none)


@dataclass
class ChatAlignment:
    """Both sides of a conversation, their alignment (on the shared text) and the chunks that carry KD."""

    alignment: Any  # nemo_xtoken.align.Alignment (spans in shared-text bytes)
    student: ChatSide
    teacher: ChatSide
    shared_text: bytes
    roles: list[str]
    kd_chunks: np.ndarray  # bool [n_chunks]
    loss_on: str = "assistant"
    warnings: list[str] = field(default_factory=list)

    def student_kd_mask(self) -> np.ndarray:
        """bool [n_student]: the token is in a chunk that carries KD."""
        return self.kd_chunks[self.alignment.student_chunk_ids]

    def teacher_kd_mask(self) -> np.ndarray:
        """bool [n_teacher]: the token is in a chunk that carries KD."""
        return self.kd_chunks[self.alignment.teacher_chunk_ids]

    def fused_chunks(self) -> np.ndarray:
        """bool [n_chunks]: chunks holding a fused token (partly template text) on either side."""
        out = np.zeros(self.alignment.n_chunks, dtype=bool)
        out[self.alignment.student_chunk_ids[self.student.fused]] = True
        out[self.alignment.teacher_chunk_ids[self.teacher.fused]] = True
        return out

    def assistant_coverage(self) -> tuple[int, int]:
        """(student tokens of assistant content in KD chunks, student tokens of assistant content)."""
        s = self.student
        asst = np.asarray([r == "assistant" for r in self.roles] + [False], dtype=bool)[s.message]  # -1 → False
        asst &= s.content | s.fused
        return int((asst & self.student_kd_mask()).sum()), int(asst.sum())

    def rows(self, student: Any, teacher: Any) -> list[dict[str, Any]]:
        """Chunk pairs with token strings, text, loss masks and KD flags (for the CLI)."""
        from nemo_xtoken.vocab import canonical_vocab, load_tokenizer

        scv, tcv = canonical_vocab(load_tokenizer(student)), canonical_vocab(load_tokenizer(teacher))
        a, fused = self.alignment, self.fused_chunks()
        out = []
        for k, ((a0, a1), (b0, b1)) in enumerate(a.pairs()):
            sp = a.spans[k]
            one = (a0 == a1) != (b0 == b1)
            side = self.student if a1 > a0 else self.teacher
            i0 = a0 if a1 > a0 else b0
            msg = int(side.message[i0]) if (a1 > a0 or b1 > b0) else -1
            rmsg = int(side.rendered_message[i0]) if side.rendered_message is not None and (a1 > a0 or b1 > b0) else -1
            out.append({
                "chunk": k,
                "text": self.shared_text[int(sp[0]): int(sp[1])].decode("utf-8", "backslashreplace"),
                "student": [a0, a1], "teacher": [b0, b1],
                "student_tokens": [scv.display(int(i)) for i in self.student.ids[a0:a1]],
                "teacher_tokens": [tcv.display(int(i)) for i in self.teacher.ids[b0:b1]],
                "student_loss": [bool(x) for x in self.student.loss[a0:a1]],
                "teacher_loss": [bool(x) for x in self.teacher.loss[b0:b1]],
                # the message of the chunk's text; "<role>:1" = content only this side renders (stripped, a <think> block)
                "role": self.roles[msg] if msg >= 0 else (f"{self.roles[rmsg]}:1" if rmsg >= 0 else "template"),
                "one_sided": one, "fused": bool(fused[k]), "kd": bool(self.kd_chunks[k]),
            })
        return out


def _side(r: _Rendered, messages: list[dict], common: list[tuple[int, int] | None], info: Any, loss_on: str, where: str) -> ChatSide:
    """Tokenize one rendering and map its tokens onto the shared text."""
    from nemo_xtoken.align.core import _char_to_byte, encode_for_alignment, token_bytes

    try:
        ids, off = encode_for_alignment(r.text, info, special_tokens=False)
    except XTokenError as e:
        raise XTokenError(f"{where}: {e}") from None
    data = r.text.encode("utf-8", "surrogatepass")
    nb = len(data)
    shared = np.zeros(nb, dtype=np.int64)  # 1 where a byte is shared text
    msg_of = np.full(nb, -1, dtype=np.int64)
    rmsg_of = np.full(nb + 1, -1, dtype=np.int64)  # rendered content (shared or not) of each byte
    asst = np.zeros(nb, dtype=np.int64)
    eot: list[int] = []  # byte where each rendered assistant content ends
    c2b_arr = _char_to_byte(r.text, data)
    c2b = lambda ci: int(c2b_arr[ci])  # noqa: E731
    for j, (m, sp, cm) in enumerate(zip(messages, r.spans, common)):
        if sp is None:
            continue
        p, a, b = sp
        c = m["content"]
        rmsg_of[c2b(p): c2b(p + len(c) - a - b)] = j
        if cm is not None:
            lo, hi = cm  # chars of the content, common to both sides
            b0, b1 = c2b(p + lo - a), c2b(p + hi - a)
            shared[b0:b1] = 1
            msg_of[b0:b1] = j
            if m["role"] == "assistant":
                asst[b0:b1] = 1
        if m["role"] == "assistant":
            eot.append(c2b(p + len(c) - b - a))
    cum = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(shared, out=cum[1:])
    acum = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(asst, out=acum[1:])
    s, e = off[:, 0], off[:, 1]
    soff = np.stack([cum[s], cum[e]], 1)
    width = soff[:, 1] - soff[:, 0]
    content = (width > 0) & (width == e - s)
    fused = (width > 0) & (width < e - s)
    sb = np.flatnonzero(shared)  # the message of a token's first shared byte
    message = np.full(ids.size, -1, dtype=np.int64)
    if sb.size:
        has = width > 0
        message[has] = msg_of[sb[np.minimum(np.searchsorted(sb, s[has]), sb.size - 1)]]
    if loss_on == "all":
        loss = np.ones(ids.size, dtype=bool)
    else:
        loss = (acum[e] - acum[s]) > 0
        tb = token_bytes(info)
        for x in eot:
            k = int(np.searchsorted(s, x, "left"))
            if k < ids.size and (tb.special[ids[k]] or tb.added[ids[k]]) and width[k] == 0:
                loss[k] = True
    return ChatSide(r.text, ids, off, soff, content, fused, loss, message.astype(np.int64), info.source, rmsg_of[s])


def align_chat(
    conversation: Any,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    loss_on: str = "assistant",
    student_template: str | None = None,
    teacher_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    where: str = "conversation",
) -> ChatAlignment:
    """Render a conversation with each side's chat template, tokenize both and align them (see the module docstring).

    ``conversation``: ``{"messages": [...], "tools": [...]?}`` or a list of messages.
    """
    from nemo_xtoken.align.core import align_offsets
    from nemo_xtoken.vocab import load_tokenizer

    if loss_on not in LOSS_ON:
        raise XTokenError(f"loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
    row = {"messages": conversation} if isinstance(conversation, list) else conversation
    messages, tools = check_conversation(row, where)
    S, T = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
    rs = render_chat(messages, S, student_template, tools=tools, template_kwargs=template_kwargs, where=where, side="student")
    rt = render_chat(messages, T, teacher_template, tools=tools, template_kwargs=template_kwargs, where=where, side="teacher")
    # the shared text of each message: its content less what either template stripped
    common: list[tuple[int, int] | None] = []
    for m, ss, ts in zip(messages, rs.spans, rt.spans):
        if ss is None or ts is None:
            common.append(None)
            continue
        n = len(m["content"])
        lo, hi = max(ss[1], ts[1]), n - max(ss[2], ts[2])
        common.append((lo, hi) if hi > lo else None)
    # both renderings must hold the shared texts in the same order
    def order(r: _Rendered) -> list[int]:
        return [j for j in sorted(range(len(messages)), key=lambda j: r.spans[j][0] if r.spans[j] else -1) if common[j] is not None]

    if order(rs) != order(rt):
        raise XTokenError(
            f"{where}: the two chat templates render the messages in different orders (student {order(rs)}, teacher "
            f"{order(rt)}; e.g. DeepSeek-V3 moves system messages to the start): put system messages first"
        )
    st = _side(rs, messages, common, S, loss_on, where)
    tt = _side(rt, messages, common, T, loss_on, where)
    try:
        a = align_offsets(st.shared_offsets, tt.shared_offsets)
    except XTokenError as e:  # pragma: no cover - the shared texts are equal by construction
        raise XTokenError(f"{where}: the two renderings do not align ({e})") from None
    shared = b"".join(messages[j]["content"][common[j][0]: common[j][1]].encode("utf-8", "surrogatepass") for j in order(rs))
    ok_s = st.content & st.loss
    ok_t = tt.content & tt.loss
    n = a.n_chunks
    # a chunk carries KD when both sides have tokens in it and every one of them is loss-bearing shared text
    bad = np.zeros(n, dtype=bool)
    bad[a.student_chunk_ids[~ok_s]] = True
    bad[a.teacher_chunk_ids[~ok_t]] = True
    kd = ~bad & ~a.one_sided() & (a.student_chunks[:, 1] > a.student_chunks[:, 0])
    return ChatAlignment(a, st, tt, shared, [m["role"] for m in messages], kd, loss_on, rs.warnings + rt.warnings)


def masked_text(side: ChatSide) -> str:
    """A side's rendering with its loss-bearing tokens between ⟦ and ⟧."""
    data = side.text.encode("utf-8", "surrogatepass")
    out, on, pos = [], False, 0
    for (s, e), loss in zip(side.byte_offsets.tolist(), side.loss.tolist()):
        if s > pos:  # bytes no token covers (none in practice)
            out.append(data[pos:s].decode("utf-8", "backslashreplace"))
        if loss != on:
            out.append("⟦" if loss else "⟧")
            on = loss
        out.append(data[s:e].decode("utf-8", "backslashreplace"))
        pos = max(pos, e)
    if on:
        out.append("⟧")
    return "".join(out)
