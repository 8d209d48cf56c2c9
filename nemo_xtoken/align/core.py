"""Span alignment: one text under two tokenizers → minimal chunk pairs of equal text.

**Rule.**  A chunk boundary is a text position where *both* sides may cut: every token before it
ends at or before it and every token after it starts at or after it.  The boundaries are exactly
the positions common to the two sides' cut sets, so each chunk pair covers the same text span and
no smaller pair does (the chunks are the minimal ones).  Tokens of zero width (a BOS/EOS the
tokenizer adds, a chat-template token) are gap moves of the dynamic programme: each becomes a
one-sided chunk of its own (start == end on the other side) where it stands between chunks, so one
disagreement never merges the rest of the sequence (the flaw of buffer-flush alignment).  A
zero-width token strictly inside a chunk adds no text and stays in that chunk.

**Offsets.**  :func:`align_offsets` is the hot path: vectorized numpy over ``[n, 2]`` (start, end)
offsets in the same unit on both sides.  :func:`align` tokenizes, turns character offsets into
byte offsets (byte-level tokens that split one multi-byte character share its character range in
Hugging Face ``tokenizers``; on bytes they are disjoint, so CJK and emoji align byte by byte), and
checks that every token's bytes equal the text under its offsets: a normalizer that changes the
text (lowercasing, NFC/NFKC) is reported with the span, never misaligned silently.

**Tokenizer families** (docs/tokenizers.md).  SentencePiece ``▁`` is a space and ``<0xHH>`` its
byte (the canonical strings of :mod:`nemo_xtoken.vocab.canonical`).  A dummy prefix (a space the
tokenizer inserts: ``Prepend("▁")``, ``Metaspace``, ``ByteLevel(add_prefix_space)``; probed, not
named) stands for no byte of the text: a token that is only that space has zero width and becomes
a one-sided chunk, a token that starts with it (``▁In``) covers the text after it.  A text with
the character ``▁`` (U+2581) is refused for a tokenizer that reads it as a space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from nemo_xtoken.errors import XTokenError

__all__ = ["Alignment", "AlignmentBatch", "align", "align_batch", "align_offsets", "align_offsets_batch", "encode_for_alignment", "TokenBytes", "token_bytes"]

_FORMAT = "nemo_xtoken.alignment/1"


@dataclass
class Alignment:
    """Chunk pairs of one text under two tokenizers.

    ``student_chunks[k] = (a, b)``: chunk ``k`` is student tokens ``a … b-1`` (``a == b``: the
    student has no token in it, a teacher-only chunk); likewise ``teacher_chunks``.  Chunks are in
    text order and cover every token of both sides.  ``*_chunk_ids[i]`` is the chunk of token ``i``.
    ``spans[k]`` is the chunk's (start, end) offset in the text (bytes for :func:`align`), width 0
    for a one-sided chunk.
    """

    student_chunks: np.ndarray  # int64 [n_chunks, 2]
    teacher_chunks: np.ndarray  # int64 [n_chunks, 2]
    student_chunk_ids: np.ndarray  # int64 [n_student]
    teacher_chunk_ids: np.ndarray  # int64 [n_teacher]
    spans: np.ndarray | None = None  # int64 [n_chunks, 2]

    @property
    def n_chunks(self) -> int:
        """Number of chunks (two-sided and one-sided)."""
        return int(self.student_chunks.shape[0])

    def one_sided(self) -> np.ndarray:
        """bool [n_chunks]: chunks with tokens on one side only."""
        s = self.student_chunks[:, 1] > self.student_chunks[:, 0]
        t = self.teacher_chunks[:, 1] > self.teacher_chunks[:, 0]
        return s != t

    def pairs(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The chunk pairs as Python tuples ``((s_start, s_end), (t_start, t_end))``."""
        return [((int(a), int(b)), (int(c), int(d))) for (a, b), (c, d) in zip(self.student_chunks, self.teacher_chunks)]

    @staticmethod
    def from_chunk_ids(student_chunk_ids: np.ndarray, teacher_chunk_ids: np.ndarray, n_chunks: int) -> "Alignment":
        """Rebuild an alignment from per-token chunk ids (non-decreasing, as stored on disk)."""
        s = np.asarray(student_chunk_ids, dtype=np.int64)
        t = np.asarray(teacher_chunk_ids, dtype=np.int64)
        for name, ids in (("student_chunk_ids", s), ("teacher_chunk_ids", t)):
            if ids.ndim != 1 or (ids.size and (ids[0] < 0 or ids[-1] >= n_chunks or np.any(np.diff(ids) < 0))):
                raise XTokenError(
                    f"{name} (shape {ids.shape}) must be 1-D, non-decreasing and within 0…{n_chunks - 1}: the file "
                    "is not an alignment written by nemo_xtoken; re-run `xtoken preprocess`"
                )

        def chunks(ids: np.ndarray) -> np.ndarray:
            end = np.cumsum(np.bincount(ids, minlength=n_chunks)[:n_chunks])
            cnt = np.diff(end, prepend=0)
            return np.stack([end - cnt, end], 1).astype(np.int64)

        return Alignment(chunks(s), chunks(t), s, t)

    def to_positions(self, student_ids: Any, teacher_ids: Any, student_loss_mask: Any = None):
        """Per-position chunk ids and targets for the losses (applies the next-token shift)."""
        import torch

        from nemo_xtoken.align.merge import positions_from_token_chunks

        sid = torch.as_tensor(np.asarray(student_ids), dtype=torch.long)
        tid = torch.as_tensor(np.asarray(teacher_ids), dtype=torch.long)
        if sid.shape != (self.student_chunk_ids.shape[0],) or tid.shape != (self.teacher_chunk_ids.shape[0],):
            raise XTokenError(
                f"to_positions: ids of shape student {tuple(sid.shape)} / teacher {tuple(tid.shape)} do not match the "
                f"alignment ({self.student_chunk_ids.shape[0]} student, {self.teacher_chunk_ids.shape[0]} teacher tokens): "
                "pass the ids the alignment was computed for"
            )
        mask = None if student_loss_mask is None else torch.as_tensor(np.asarray(student_loss_mask))
        return positions_from_token_chunks(
            torch.from_numpy(self.student_chunk_ids.astype(np.int64)),
            torch.from_numpy(self.teacher_chunk_ids.astype(np.int64)),
            sid,
            tid,
            self.n_chunks,
            student_loss_mask=mask,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.npz`` (numpy) or ``.safetensors`` file; never pickle."""
        arrays = {
            "student_chunk_ids": self.student_chunk_ids.astype(np.int64),
            "teacher_chunk_ids": self.teacher_chunk_ids.astype(np.int64),
            "n_chunks": np.array([self.n_chunks], dtype=np.int64),
        }
        if self.spans is not None:
            arrays["spans"] = self.spans.astype(np.int64)
        p = str(path)
        if p.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(arrays, p, metadata={"format": _FORMAT})
        else:
            arrays["format"] = np.frombuffer(_FORMAT.encode(), dtype=np.uint8)
            with open(p, "wb") as f:
                np.savez(f, **arrays)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "Alignment":
        """Read a file written by :meth:`save`."""
        p = str(path)
        try:
            if p.endswith(".safetensors"):
                from safetensors.numpy import load_file

                arrays = load_file(p)
            else:
                with np.load(p, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise XTokenError(f"alignment file {p} does not exist") from None
        except Exception as e:
            raise XTokenError(f"cannot read alignment file {p} ({type(e).__name__}: {e}); write it with Alignment.save") from None
        missing = {"student_chunk_ids", "teacher_chunk_ids", "n_chunks"} - set(arrays)
        if missing:
            raise XTokenError(f"{p} is not an alignment file (missing {sorted(missing)}); write it with Alignment.save")
        a = Alignment.from_chunk_ids(arrays["student_chunk_ids"], arrays["teacher_chunk_ids"], int(arrays["n_chunks"][0]))
        a.spans = arrays.get("spans")
        return a

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Alignment):
            return NotImplemented
        return (
            np.array_equal(self.student_chunks, other.student_chunks)
            and np.array_equal(self.teacher_chunks, other.teacher_chunks)
            and np.array_equal(self.student_chunk_ids, other.student_chunk_ids)
            and np.array_equal(self.teacher_chunk_ids, other.teacher_chunk_ids)
        )


def _check_offsets(name: str, off: Any) -> np.ndarray:
    a = np.asarray(off)
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 2 or not np.issubdtype(a.dtype, np.integer):
        raise XTokenError(f"{name} must be an integer array [n, 2] of (start, end) offsets; got dtype {a.dtype}, shape {a.shape}")
    a = a.astype(np.int64, copy=False)
    bad = np.flatnonzero((a[:, 1] < a[:, 0]) | (a[:, 0] < 0))
    if bad.size:
        i = int(bad[0])
        raise XTokenError(f"{name}[{i}] = {tuple(a[i].tolist())} is not a (start, end) offset with 0 <= start <= end")
    return a


def _cuts(off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Content-token indices, the cut value after each, and whether a cut there is allowed."""
    width = off[:, 1] > off[:, 0]
    if width.all():  # common case: no zero-width token
        content = np.arange(off.shape[0])
        st, en = off[:, 0], off[:, 1]
    else:
        content = np.flatnonzero(width)
        st = off[content, 0]
        en = off[content, 1]
    if st.size and bool((st[1:] >= en[:-1]).all()):  # common case: tokens in order, no overlap
        return content, en, np.ones(en.size, dtype=bool)
    reach = np.maximum.accumulate(en) if en.size else en
    nxt = np.empty_like(st)
    if st.size:
        nxt[:-1] = np.minimum.accumulate(st[::-1])[::-1][1:]
        nxt[-1] = np.iinfo(np.int64).max
    return content, reach, reach <= nxt


def align_offsets(student_offsets: Any, teacher_offsets: Any) -> Alignment:
    """Align two tokenizations of one text given their ``[n, 2]`` (start, end) offsets (same unit).

    Vectorized (no Python loop over tokens).  Raises :class:`XTokenError` when the two sides do
    not cover the same text (a token span on one side only, or different ends).
    """
    so = _check_offsets("student_offsets", student_offsets)
    to = _check_offsets("teacher_offsets", teacher_offsets)
    s_ids, t_ids, n_chunks, spans = _align_arrays(so, to)
    a = Alignment.from_chunk_ids(s_ids, t_ids, n_chunks)
    a.spans = spans
    return a


def _align_arrays(so: np.ndarray, to: np.ndarray, spans: bool = True) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Per-token chunk ids of both sides, the number of chunks and the chunk spans (None if not ``spans``)."""
    sc, sreach, sok = _cuts(so)
    tc, treach, tok = _cuts(to)
    svals = sreach if sok.all() else sreach[sok]
    tvals = treach if tok.all() else treach[tok]
    # Common cut values (both strictly increasing): mark the teacher's, look up the student's.
    if svals.size and tvals.size:
        marks = np.zeros(int(max(svals[-1], tvals[-1])) + 1, dtype=bool)
        marks[tvals] = True
        common = svals[marks[svals]]
        marks[:] = False
        marks[common] = True  # now: the common cuts
    else:
        common = svals[:0]
        marks = np.zeros(0, dtype=bool)
    k_content = int(common.size)
    if (sc.size == 0) != (tc.size == 0) or (
        sc.size and (k_content == 0 or sreach[-1] != common[-1] or treach[-1] != common[-1])
    ):
        _raise_mismatch(so, sc, sreach, to, tc, treach, common)

    def side(off: np.ndarray, content: np.ndarray, reach: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boundary = np.zeros(content.size, dtype=bool)
        if content.size and k_content:
            if ok.all():
                boundary = marks[reach]
            else:
                okidx = np.flatnonzero(ok)
                boundary[okidx] = marks[reach[okidx]]
        # content chunk of each content token
        cchunk = np.zeros(content.size, dtype=np.int64)
        if content.size > 1:
            cchunk[1:] = np.cumsum(boundary[:-1])
        # chunk starts at token positions: each content chunk's first chunk token
        zw = np.flatnonzero(off[:, 1] == off[:, 0])
        # number of content tokens before each zero-width token
        before = np.searchsorted(content, zw)
        prev_boundary = np.ones(zw.size, dtype=bool)
        has_prev = before > 0
        prev_boundary[has_prev] = boundary[before[has_prev] - 1]
        # gap index (content chunks before) for boundary zero-width tokens; chunk of others
        prev_chunk = np.where(has_prev, cchunk[np.maximum(before - 1, 0)] if content.size else 0, -1)
        gap = np.where(prev_boundary, prev_chunk + 1, -1)  # gap g: before content chunk g
        first = np.flatnonzero(boundary[:-1]) + 1  # first content token of each content chunk
        first = np.concatenate([np.zeros(min(content.size, 1), np.int64), first])
        return cchunk, zw, np.stack([gap, prev_chunk]), first

    s_cchunk, s_zw, s_info, s_first = side(so, sc, sreach, sok)
    t_cchunk, t_zw, t_info, t_first = side(to, tc, treach, tok)
    s_gap_tok = s_info[0] >= 0
    t_gap_tok = t_info[0] >= 0
    s_gz, t_gz = s_zw[s_gap_tok], t_zw[t_gap_tok]
    # One-sided chunks, in text order: by gap, then position, then student before teacher.
    g = np.concatenate([s_info[0][s_gap_tok], t_info[0][t_gap_tok]])
    gpos = np.concatenate([so[s_gz, 0], to[t_gz, 0]])
    gside = np.concatenate([np.zeros(s_gz.size, np.int64), np.ones(t_gz.size, np.int64)])
    order = np.lexsort((np.arange(g.size), gside, gpos, g))
    one_id = np.empty(g.size, dtype=np.int64)
    one_id[order] = np.arange(g.size) + g[order]  # r-th one-sided chunk, after g content chunks
    incl = np.cumsum(np.bincount(g, minlength=k_content + 1))
    n_chunks = k_content + int(incl[-1])
    content_id = np.arange(k_content) + incl[:k_content]  # final id of content chunk k

    def ids_for(n: int, content: np.ndarray, cchunk: np.ndarray, zw: np.ndarray, info: np.ndarray, gap_tok: np.ndarray,
                ids_one: np.ndarray) -> np.ndarray:
        if content.size == n:  # no zero-width token on this side
            return content_id[cchunk]
        out = np.empty(n, dtype=np.int64)
        out[content] = content_id[cchunk]
        inner = ~gap_tok  # interior zero-width tokens: the chunk of the previous content token
        out[zw[inner]] = content_id[info[1][inner]]
        out[zw[gap_tok]] = ids_one
        return out

    s_ids = ids_for(so.shape[0], sc, s_cchunk, s_zw, s_info, s_gap_tok, one_id[: s_gz.size])
    t_ids = ids_for(to.shape[0], tc, t_cchunk, t_zw, t_info, t_gap_tok, one_id[s_gz.size:])
    want_spans = spans
    spans = np.zeros((n_chunks, 2), dtype=np.int64) if want_spans else None
    if k_content:
        # each content chunk starts where its first token starts, alike on both sides
        s_lo = so[sc[s_first] if sc.size != so.shape[0] else s_first, 0]
        t_lo = to[tc[t_first] if tc.size != to.shape[0] else t_first, 0]
        if not np.array_equal(s_lo, t_lo):
            bad = int(np.flatnonzero(s_lo != t_lo)[0])
            raise XTokenError(
                f"the two tokenizations cover different text before offset {int(common[bad])}: the chunk ending there "
                f"starts at {int(s_lo[bad])} on the student side and at {int(t_lo[bad])} on the teacher side "
                "(one tokenizer skips text the other keeps); offsets must index the same text in the same unit"
            )
        if want_spans:
            spans[content_id, 0] = s_lo
            spans[content_id, 1] = common
    if want_spans:
        spans[one_id, 0] = gpos  # a one-sided chunk: its token's (zero-width) position
        spans[one_id, 1] = gpos
    return s_ids, t_ids, n_chunks, spans


def _raise_mismatch(so, sc, sreach, to, tc, treach, common) -> None:
    """Name the first text span that the two sides do not cover alike."""
    last = int(common[-1]) if common.size else (int(min(so[sc[0], 0], to[tc[0], 0])) if sc.size and tc.size else 0)
    s_next = so[sc[np.searchsorted(sreach, last, "right")]] if sc.size and sreach[-1] > last else None
    t_next = to[tc[np.searchsorted(treach, last, "right")]] if tc.size and treach[-1] > last else None
    raise XTokenError(
        "the two tokenizations do not cover the same text after offset "
        f"{last}: next student token span {None if s_next is None else tuple(s_next.tolist())}, next teacher token span "
        f"{None if t_next is None else tuple(t_next.tolist())} (student ends at {int(sreach[-1]) if sreach.size else 0}, "
        f"teacher at {int(treach[-1]) if treach.size else 0}); offsets must index the same text in the same unit"
    )


# ---------------------------------------------------------------------------------------------
# From text: tokenization, byte offsets, exactness check.


@dataclass
class TokenBytes:
    """Per-id token bytes of one tokenizer, flat (for vectorized byte checks)."""

    buf: np.ndarray  # uint8, all token byte strings concatenated
    start: np.ndarray  # int64 [V] offset of id i in buf
    length: np.ndarray  # int64 [V]
    special: np.ndarray  # bool [V]
    lead_space: np.ndarray | None = None  # bool [V]: a normal token whose bytes start with a space
    added: np.ndarray | None = None  # bool [V]: an added token (the tokenizer extracts it from text: a segment boundary)


def token_bytes(info: Any) -> TokenBytes:
    """The bytes each id stands for (special tokens: their literal content), cached on the info."""
    cached = getattr(info, "_align_token_bytes", None)
    if cached is not None:
        return cached
    from nemo_xtoken.vocab import canonical_vocab

    cv = canonical_vocab(info)
    pieces = []
    for i in range(cv.size):
        t = cv.text[i]
        if t is None:
            t = (cv.raw[i] or "").encode("utf-8") if cv.special[i] is not None else b""
        pieces.append(t)
    length = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    start = np.zeros(len(pieces), dtype=np.int64)
    if len(pieces) > 1:
        start[1:] = np.cumsum(length[:-1])
    buf = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    special = np.array([s is not None for s in cv.special], dtype=bool)
    lead_space = np.zeros(cv.size, dtype=bool)
    nonempty = (length > 0) & ~special
    lead_space[nonempty] = buf[start[nonempty]] == 0x20
    tb = TokenBytes(buf, start, length, special, lead_space, np.asarray(cv.added, dtype=bool).copy())
    info._align_token_bytes = tb  # type: ignore[attr-defined]
    return tb


@dataclass
class _Profile:
    """What alignment needs of one tokenizer, computed once and cached on its ``TokenizerInfo``."""

    tb: TokenBytes
    dummy: Any  # nemo_xtoken.vocab.canonical.DummyPrefix
    u2581_is_space: bool  # the tokenizer reads the character '▁' (U+2581) as a space: texts with it are refused
    template: bool  # its post-processor adds tokens (a BOS/EOS template)


def _profile(info: Any) -> _Profile:
    cached = getattr(info, "_align_profile", None)
    if cached is not None:
        return cached
    from nemo_xtoken.vocab.canonical import canonical_vocab, dummy_prefix

    tb = token_bytes(info)
    cv = canonical_vocab(info)
    dp = dummy_prefix(info)
    ids = info.tokenizer.encode("a\u2581b", add_special_tokens=False).ids
    spelled = b"".join(cv.text[i] or b"" for i in ids if i < cv.size)
    u2581 = b"\xe2\x96\x81" not in spelled and spelled.replace(b" ", b"") == b"ab"
    prof = _Profile(tb, dp, u2581, _adds_template_tokens(info))
    info._align_profile = prof  # type: ignore[attr-defined]
    return prof


def bos_token_id(tokenizer: Any) -> int | None:
    """The id of the BOS that ``tokenizer_config.json`` names (``None`` if it names none the tokenizer has)."""
    from nemo_xtoken.vocab import load_tokenizer

    info = load_tokenizer(tokenizer)
    bos = info.config.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    tid = info.tokenizer.token_to_id(bos) if isinstance(bos, str) else None
    return None if tid is None else int(tid)


def _bos_id(info: Any, side: str = "") -> int:
    tid = bos_token_id(info)
    if tid is None:
        flag = f"{side}_add_bos" if side else "add_bos"
        raise XTokenError(
            f"tokenizer {info.source} declares no BOS token (tokenizer_config.json bos_token); "
            f"pass {flag}=False or a tokenizer whose config names one"
        )
    return tid


def encode_for_alignment(text: str, tokenizer: Any, *, special_tokens: bool = True, add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text``: ids ``[n]`` and byte offsets ``[n, 2]`` (checked against the text's bytes).

    ``special_tokens`` runs the tokenizer's post-processor (its BOS/EOS template);
    ``add_bos`` prepends the BOS named by its ``tokenizer_config.json`` unless already there
    (the npm Llama-3 ``tokenizer.json`` has no BOS template).  A dummy prefix (a space the
    tokenizer inserts, SentencePiece's ``▁``) is no text: a token that is only that space gets a
    zero-width offset, a token that starts with it covers the text after it.
    """
    from nemo_xtoken.vocab import load_tokenizer

    return _encode_one(text, load_tokenizer(tokenizer), special_tokens, add_bos, "")


def _encode_one(text: str, info: Any, special_tokens: bool, add_bos: bool, side: str) -> tuple[np.ndarray, np.ndarray]:
    enc = _encode_many(info, [text], special_tokens, add_bos, side)
    try:
        return enc.ids[0], _side_byte_offsets(info, enc, [text], [text.encode("utf-8", "surrogatepass")])
    except _DocError as e:
        raise XTokenError(e.msg) from None


def _dummy_skips(prof: _Profile, data: np.ndarray, ids: np.ndarray, zero: np.ndarray, doc: np.ndarray,
                 byte_base: np.ndarray, doc_nbytes: np.ndarray) -> np.ndarray | None:
    """Per token, how many of its leading bytes are a dummy prefix (0 or 1); ``None`` if none is.

    Candidates, by the tokenizer's probed behaviour: the first content token of a document and,
    where the tokenizer prefixes every segment, the first one after an added token of the text.
    A candidate skips its leading space when the tokenizer inserts one there: always
    (``Prepend``), or only where the text itself does not start with a space (``Metaspace``).
    """
    dp, tb = prof.dummy, prof.tb
    if not dp.any or ids.size == 0 or tb.lead_space is None:
        return None
    cidx = np.flatnonzero(~zero)
    if cidx.size == 0:
        return None
    cids = ids[cidx]
    cdoc = doc[cidx]
    first = np.ones(cidx.size, dtype=bool)
    first[1:] = cdoc[1:] != cdoc[:-1]
    is_added = tb.added[cids]
    cand = np.zeros(cidx.size, dtype=bool)
    if dp.at_start:
        cand |= first
    if dp.after_added:
        after = np.zeros(cidx.size, dtype=bool)
        after[1:] = is_added[:-1] & ~first[1:]
        cand |= after
    cand &= ~is_added & tb.lead_space[cids]
    if not cand.any():
        return None
    skip = np.zeros(ids.size, dtype=np.int64)
    if dp.before_space:
        skip[cidx[cand]] = 1
        return skip
    # Only where the segment's text does not already start with a space: its position depends
    # on the earlier skips of the same document (few candidates: a loop over them).
    L = np.where(zero, 0, tb.length[ids])
    cum = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(L, out=cum[1:])
    doc_first = np.searchsorted(doc, np.arange(byte_base.size))
    cur, skipped = -1, 0
    for c in cidx[cand].tolist():
        d = int(doc[c])
        if d != cur:
            cur, skipped = d, 0
        pos = int(cum[c] - cum[doc_first[d]]) - skipped
        if pos < int(doc_nbytes[d]) and data[int(byte_base[d]) + pos] == 0x20:
            continue  # the text starts this segment with a space: the tokenizer inserted none
        skip[c] = 1
        skipped += 1
    return skip


def _side_byte_offsets(info: Any, enc: "_Encoded", docs: list[str], datas: list[bytes],
                       errors: dict[int, str] | None = None) -> np.ndarray:
    """Byte offsets of every token of ``enc`` (documents laid end to end, one byte between them).

    Fast path: the tokens' bytes (less dummy prefixes) spell each document exactly.  Otherwise
    the tokenizer's own offsets decide, to accept the tokenization or raise naming the document
    (:class:`_DocError`) and the token whose bytes differ from the text under it.  With ``errors``
    given, every failing document is recorded there (index -> reason) instead, and its offsets left out.
    """
    prof = _profile(info)
    nbytes = np.asarray([len(d) for d in datas], dtype=np.int64)
    byte_base = _doc_offsets((nbytes + 1).tolist())[:-1]
    arr = np.frombuffer(b"\x00".join(datas), dtype=np.uint8)
    n = [x.size for x in enc.ids]
    doc = np.repeat(np.arange(len(docs)), n)
    cat_ids = np.concatenate(enc.ids + [np.zeros(0, np.int64)])
    cat_zero = np.concatenate(enc.zero + [np.zeros(0, bool)])
    skip = _dummy_skips(prof, arr, cat_ids, cat_zero, doc, byte_base, nbytes)
    boff = _fast_byte_offsets(arr, cat_ids, cat_zero, doc, byte_base, nbytes, prof.tb, skip)
    if boff is not None:
        return boff
    # Some document's tokens do not spell it: find it, and accept or explain it with the offsets.
    tok_off = _doc_offsets(n)
    out = []
    for k, (d, data) in enumerate(zip(docs, datas)):
        a, b = int(tok_off[k]), int(tok_off[k + 1])
        sk = None if skip is None else skip[a:b]
        one = _fast_byte_offsets(np.frombuffer(data, np.uint8), cat_ids[a:b], cat_zero[a:b], np.zeros(b - a, np.int64),
                                 np.zeros(1, np.int64), nbytes[k:k + 1], prof.tb, sk)
        if one is None:
            if prof.u2581_is_space and "\u2581" in d:
                i = d.index("\u2581")
                err = _DocError(k, (
                    f"{info.source} cannot represent this text: it reads the character '\u2581' (U+2581) at text[{i}] as a "
                    "space (its normalizer writes spaces as '\u2581'), so its tokens do not spell the text. Replace U+2581 "
                    "in the corpus (e.g. with a space), or use another tokenizer"
                ))
                if errors is None:
                    raise err
                errors[k] = err.msg
                continue
            try:
                one = _byte_offsets(d, data, enc.ids[k], enc.offsets(k), prof.tb, info.source, sk)
            except XTokenError as e:
                if errors is None:
                    raise _DocError(k, str(e)) from None
                errors[k] = str(e)
                continue
        out.append(one + byte_base[k])
    return np.concatenate(out + [np.zeros((0, 2), np.int64)])


def _fast_byte_offsets(data: np.ndarray, ids: np.ndarray, zero: np.ndarray, doc: np.ndarray, byte_base: np.ndarray,
                       doc_nbytes: np.ndarray, tb: "TokenBytes", skip: np.ndarray | None = None) -> np.ndarray | None:
    """Byte offsets from the ids alone: each document's token bytes, laid end to end, must be its text.

    ``skip[i]`` leading bytes of token ``i`` are a dummy prefix, not text.  Exact by construction
    when it returns (every byte is compared); ``None`` when the tokens do not spell the text (a
    normalizer changed it, or the tokenizer drops text): the caller then uses the tokenizer's
    own offsets to accept the tokenization or name the offending span.
    """
    if ids.size and (ids.max() >= tb.length.size or ids.min() < 0):
        return None
    L = tb.length[ids] if skip is None else tb.length[ids] - skip
    L = np.where(zero, 0, L)
    src = tb.start[ids] if skip is None else tb.start[ids] + skip
    cum = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(L, out=cum[1:])
    tok_off = np.zeros(byte_base.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=byte_base.size), out=tok_off[1:])
    if not np.array_equal(cum[tok_off[1:]] - cum[tok_off[:-1]], doc_nbytes):
        return None
    start = byte_base[doc] + cum[:-1] - cum[tok_off[:-1]][doc]
    tot = int(cum[-1])
    if tot:
        nz = L > 0
        ln = L[nz]
        within = np.arange(tot, dtype=np.int64) - np.repeat(cum[:-1][nz], ln)
        if not np.array_equal(tb.buf[np.repeat(src[nz], ln) + within], data[np.repeat(start[nz], ln) + within]):
            return None
    return np.stack([start, start + L], 1)


def _char_to_byte(text: str, data: bytes) -> np.ndarray:
    """c2b[i] = byte offset of character i (length len(text)+1)."""
    if len(data) == len(text):
        return np.arange(len(text) + 1, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    ln = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    c2b = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(ln, out=c2b[1:])
    return c2b


def _byte_offsets(text: str, data: bytes, ids: np.ndarray, off: np.ndarray, tb: TokenBytes, source: str,
                  skip: np.ndarray | None = None) -> np.ndarray:
    n = ids.size
    if n == 0:
        return off
    if ids.max() >= tb.length.size or ids.min() < 0:
        raise XTokenError(f"{source} produced ids outside its vocabulary (max {int(ids.max())}, vocab {tb.length.size})")
    c2b = _char_to_byte(text, data)
    if off.max() > len(text):
        raise XTokenError(f"{source} returned offsets beyond the text ({int(off.max())} > {len(text)} characters)")
    sk = np.zeros(n, dtype=np.int64) if skip is None else skip
    L = tb.length[ids] - sk
    zero = (off[:, 1] == off[:, 0]) | (L == 0)  # a template token, or only a dummy prefix
    L = np.where(zero, 0, L)
    src = tb.start[ids] + sk
    # Tokens that share a character with an earlier one (a split multi-byte char) continue in
    # bytes where the previous token stopped; group heads start at their character's byte.
    prev_reach = np.empty(n, dtype=np.int64)
    prev_reach[0] = -1
    if n > 1:
        prev_reach[1:] = np.maximum.accumulate(np.where(zero, -1, off[:, 1]))[:-1]
    head = zero | (off[:, 0] >= prev_reach)
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(L, out=cum[1:])
    head_idx = np.maximum.accumulate(np.where(head, np.arange(n), 0))
    bstart = c2b[off[head_idx, 0]] + (cum[:-1] - cum[head_idx])
    bend = bstart + L
    # Exactness: the last token of every group must end at its character end, and the token
    # bytes must equal the text bytes under them.
    last = np.ones(n, dtype=bool)
    last[:-1] = head[1:]
    bad = np.flatnonzero(last & ~zero & (bend != c2b[off[:, 1]]))
    if bad.size == 0:
        nz = np.flatnonzero(~zero)
        tot = int(L[nz].sum())
        if tot:
            ln = L[nz]
            rep_excl = np.repeat(np.cumsum(ln) - ln, ln)
            within = np.arange(tot, dtype=np.int64) - rep_excl
            tok_b = tb.buf[np.repeat(src[nz], ln) + within]
            txt_b = np.frombuffer(data, dtype=np.uint8)[np.repeat(bstart[nz], ln) + within]
            diff = np.flatnonzero(tok_b != txt_b)
            if diff.size:
                bad = nz[np.searchsorted(np.cumsum(ln), diff[:1], "right")]
    if bad.size:
        i = int(bad[0])
        s, e = int(off[i, 0]), int(off[i, 1])
        tok = tb.buf[tb.start[ids[i]]: tb.start[ids[i]] + tb.length[ids[i]]].tobytes().decode("utf-8", "backslashreplace")
        raise XTokenError(
            f"{source} changes the text: token {i} (id {int(ids[i])}, {tok!r}) stands for text[{s}:{e}] = "
            f"{text[s:e]!r}; its normalizer (e.g. lowercasing, NFC/NFKC) or decoder does not preserve the input. "
            "Normalize the corpus first (the same way), or use a tokenizer without a text-changing normalizer"
        )
    return np.stack([bstart, bend], 1)


def align(
    text: str,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_special_tokens: bool = True,
    teacher_special_tokens: bool = True,
    student_add_bos: bool = False,
    teacher_add_bos: bool = False,
    return_ids: bool = False,
) -> Any:
    """Tokenize ``text`` with both tokenizers and align the two sequences (byte offsets).

    ``*_special_tokens`` apply each tokenizer's template (BOS/EOS); ``*_add_bos`` prepend the
    BOS of ``tokenizer_config.json``.  Returns the :class:`Alignment`, or
    ``(alignment, student_ids, teacher_ids)`` with ``return_ids=True``.
    """
    from nemo_xtoken.vocab import load_tokenizer

    if not isinstance(text, str):
        raise XTokenError(f"align needs a str text, got {type(text).__name__}")
    s_ids, s_off = _encode_one(text, load_tokenizer(student_tokenizer), student_special_tokens, student_add_bos, "student")
    t_ids, t_off = _encode_one(text, load_tokenizer(teacher_tokenizer), teacher_special_tokens, teacher_add_bos, "teacher")
    a = align_offsets(s_off, t_off)
    return (a, s_ids, t_ids) if return_ids else a


@dataclass
class AlignmentBatch:
    """Alignments of many documents in flat arrays (what `xtoken preprocess` stores).

    Document ``d`` has student tokens ``student_ids[student_offsets[d]:student_offsets[d+1]]``
    whose chunk ids (local to the document) are the same slice of ``student_chunk_ids``;
    likewise for the teacher.  ``index[d]`` is the document's position in the input list.
    """

    student_ids: np.ndarray  # int64 [S]
    teacher_ids: np.ndarray  # int64 [T]
    student_offsets: np.ndarray  # int64 [n+1]
    teacher_offsets: np.ndarray  # int64 [n+1]
    student_chunk_ids: np.ndarray  # int64 [S]
    teacher_chunk_ids: np.ndarray  # int64 [T]
    n_chunks: np.ndarray  # int64 [n]
    index: np.ndarray  # int64 [n]
    rejected: list[tuple[int, str]]

    def __len__(self) -> int:
        return int(self.n_chunks.shape[0])

    def __getitem__(self, d: int) -> tuple[np.ndarray, np.ndarray, Alignment]:
        """(student ids, teacher ids, Alignment) of document ``d``."""
        s0, s1 = int(self.student_offsets[d]), int(self.student_offsets[d + 1])
        t0, t1 = int(self.teacher_offsets[d]), int(self.teacher_offsets[d + 1])
        a = Alignment.from_chunk_ids(self.student_chunk_ids[s0:s1], self.teacher_chunk_ids[t0:t1], int(self.n_chunks[d]))
        return self.student_ids[s0:s1], self.teacher_ids[t0:t1], a

    def one_sided_token_counts(self) -> tuple[int, int]:
        """Tokens in one-sided chunks (student, teacher) over the whole batch."""
        base = _doc_offsets(self.n_chunks.tolist())
        total = int(base[-1])
        gs = self.student_chunk_ids + np.repeat(base[:-1], np.diff(self.student_offsets))
        gt = self.teacher_chunk_ids + np.repeat(base[:-1], np.diff(self.teacher_offsets))
        cs, ct = np.bincount(gs, minlength=total), np.bincount(gt, minlength=total)
        return int(cs[ct == 0].sum()), int(ct[cs == 0].sum())


def _doc_offsets(lengths: list[int]) -> np.ndarray:
    o = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=o[1:])
    return o


def _localize(so: np.ndarray, to: np.ndarray, ns: Any, nt: Any, doc_base: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align concatenated documents in one call; chunk ids made local to each document.

    ``ns`` / ``nt``: tokens per document on each side (documents laid end to end).
    """
    s_ids, t_ids, n_chunks, _ = _align_arrays(so, to, spans=False)
    n = doc_base.size
    # Documents are consecutive in chunk order: document d's chunks run from the smaller first
    # chunk id of its two sides to the larger last one (none if it has no token).
    big = np.iinfo(np.int64).max
    first = np.full(n, big, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    counts = []
    for ids, cnt in ((s_ids, ns), (t_ids, nt)):
        cnt = np.asarray(cnt, dtype=np.int64)
        counts.append(cnt)
        d = np.flatnonzero(cnt)
        if d.size:
            ends = np.cumsum(cnt)
            first[d] = np.minimum(first[d], ids[(ends - cnt)[d]])
            last[d] = np.maximum(last[d], ids[ends[d] - 1])
    has = last >= 0
    per_doc = np.where(has, last - first + 1, 0)
    base = np.zeros(n, dtype=np.int64)
    if n > 1:
        base[1:] = np.cumsum(per_doc)[:-1]
    return s_ids - np.repeat(base, counts[0]), t_ids - np.repeat(base, counts[1]), per_doc.astype(np.int64)


def align_offsets_batch(student_offsets: list[Any], teacher_offsets: list[Any]) -> AlignmentBatch:
    """Align many documents at once (one vectorized pass): per-document ``[n, 2]`` offsets.

    Equal to :func:`align_offsets` document by document; much faster on short documents.
    A document whose two sides do not cover the same text raises, naming the document.
    """
    if len(student_offsets) != len(teacher_offsets):
        raise XTokenError(f"align_offsets_batch: {len(student_offsets)} student and {len(teacher_offsets)} teacher documents")
    def cat(side: str, offs: list[Any]) -> tuple[np.ndarray, list[int]]:
        try:  # fast path: a list of int [n_i, 2] arrays
            n = [o.shape[0] for o in offs]
            return _check_offsets(f"{side}_offsets", np.concatenate(offs + [np.zeros((0, 2), np.int64)])), n
        except (AttributeError, ValueError, XTokenError):
            pass
        arrs = [np.asarray(o).reshape(-1, 2) if np.size(o) else np.zeros((0, 2), np.int64) for o in offs]
        n = [a.shape[0] for a in arrs]
        try:
            return _check_offsets(f"{side}_offsets", np.concatenate(arrs + [np.zeros((0, 2), np.int64)])), n
        except XTokenError:
            for i, a in enumerate(arrs):
                _check_offsets(f"{side}_offsets[{i}]", a)
            raise

    so, ns = cat("student", student_offsets)
    to, nt = cat("teacher", teacher_offsets)

    def doc_max(ends: np.ndarray, n: list[int]) -> np.ndarray:
        out = np.zeros(len(n), dtype=np.int64)
        cnt = np.asarray(n, dtype=np.int64)
        ne = np.flatnonzero(cnt > 0)
        if ne.size:
            out[ne] = np.maximum.reduceat(ends, (np.cumsum(cnt) - cnt)[ne])
        return out

    extent = np.maximum(doc_max(so[:, 1], ns), doc_max(to[:, 1], nt))  # per document: its largest offset
    doc_base = _doc_offsets((extent + 1).tolist())[:-1]
    s_raw, t_raw = so, to
    so = so + np.repeat(doc_base, ns)[:, None]
    to = to + np.repeat(doc_base, nt)[:, None]
    try:
        sc, tc, nc = _localize(so, to, ns, nt, doc_base)
    except XTokenError:
        so_l = np.split(s_raw, np.cumsum(ns)[:-1]) if ns else []
        to_l = np.split(t_raw, np.cumsum(nt)[:-1]) if nt else []
        for i, (a, b) in enumerate(zip(so_l, to_l)):
            try:
                align_offsets(a, b)
            except XTokenError as e:
                raise XTokenError(f"document {i}: {e}") from None
        raise
    z = np.zeros(0, np.int64)
    return AlignmentBatch(z, z, _doc_offsets(ns), _doc_offsets(nt), sc, tc, nc, np.arange(len(ns)), [])


def align_batch(
    texts: list[str],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_special_tokens: bool = True,
    teacher_special_tokens: bool = True,
    student_add_bos: bool = False,
    teacher_add_bos: bool = False,
    on_error: str = "raise",
) -> AlignmentBatch:
    """Tokenize and align many texts with one vectorized pass (the data-pipeline path).

    Equal to :func:`align` text by text.  ``on_error="skip"`` leaves out texts that cannot be
    aligned (a text-changing normalizer, a non-string) and lists them in ``rejected`` with the
    reason; ``"raise"`` raises for the first, naming it.
    """
    from nemo_xtoken.vocab import load_tokenizer

    if on_error not in ("raise", "skip"):
        raise XTokenError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    S, T = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
    sides = [(S, student_special_tokens, student_add_bos), (T, teacher_special_tokens, teacher_add_bos)]
    good = [i for i, t in enumerate(texts) if isinstance(t, str)]
    rejected = [(i, f"not a string ({type(t).__name__})") for i, t in enumerate(texts) if not isinstance(t, str)]
    if rejected and on_error == "raise":
        raise XTokenError(f"document {rejected[0][0]}: {rejected[0][1]}")
    enc = [_encode_many(info, [texts[i] for i in good], special, bos, side)
           for (info, special, bos), side in zip(sides, ("student", "teacher"))]
    _screen(texts, good, enc, (S, T), rejected, on_error)
    while True:
        try:
            return _align_encoded(texts, good, enc, (S, T), rejected)
        except _DocError as e:
            if on_error == "raise":
                raise XTokenError(f"document {good[e.k]}: {e.msg}") from None
            rejected.append((good[e.k], e.msg))
            del good[e.k]
            for side in enc:
                side.remove(e.k)


def _screen(texts: list, good: list[int], enc: list["_Encoded"], infos: tuple, rejected: list, on_error: str) -> None:
    """Find, in one pass per side, the documents that cannot be aligned because a tokenizer changes their text.

    Failures are removed from ``good``/``enc`` into ``rejected`` (or the first is raised).  Without
    this, every rejected document re-ran the alignment of the whole batch, so a batch with
    rejections cost several times more.
    """
    docs = [texts[i] for i in good]
    if not docs:
        return
    datas = [d.encode("utf-8", "surrogatepass") for d in docs]
    drop: dict[int, str] = {}
    for side, info in zip(enc, infos):
        errors: dict[int, str] = {}
        _side_byte_offsets(info, side, docs, datas, errors=errors)
        for k, msg in errors.items():
            drop.setdefault(k, msg)
    if drop and on_error == "raise":
        k = min(drop)
        raise XTokenError(f"document {good[k]}: {drop[k]}")
    if drop:
        rejected += [(good[k], drop[k]) for k in sorted(drop)]
        good[:] = [g for k, g in enumerate(good) if k not in drop]
        for side in enc:
            for lst in (side.encs, side.ids, side.zero, side.bos_added):
                lst[:] = [x for k, x in enumerate(lst) if k not in drop]


class _Encoded:
    """Ids of each text, which tokens are zero-width (template/BOS), and the encodings (for offsets)."""

    def __init__(self, encs: list[Any], bos: int | None, template: bool = True) -> None:
        self.encs = encs
        self.ids, self.zero, self.bos_added = [], [], []
        for e in encs:
            ids = np.asarray(e.ids, dtype=np.int64)
            # special_tokens_mask marks the tokens the post-processor added (not specials in the text)
            zero = np.asarray(e.special_tokens_mask, dtype=bool) if template else np.zeros(ids.size, dtype=bool)
            added = bos is not None and (ids.size == 0 or ids[0] != bos)
            if added:
                ids = np.concatenate([[bos], ids])
                zero = np.concatenate([[True], zero])
            self.ids.append(ids)
            self.zero.append(zero)
            self.bos_added.append(added)

    def offsets(self, k: int) -> np.ndarray:
        """The tokenizer's character offsets of text ``k`` ([n, 2])."""
        off = np.asarray(self.encs[k].offsets, dtype=np.int64).reshape(-1, 2)
        return np.concatenate([np.zeros((1, 2), np.int64), off]) if self.bos_added[k] else off

    def remove(self, k: int) -> None:
        for lst in (self.encs, self.ids, self.zero, self.bos_added):
            del lst[k]


def _encode_many(info: Any, texts: list[str], special: bool, bos: bool, side: str = "") -> _Encoded:
    """Tokenize each text (BOS prepended when asked and missing)."""
    bos_id = _bos_id(info, side) if bos else None
    encs = [info.tokenizer.encode(t, add_special_tokens=special) for t in texts]
    return _Encoded(encs, bos_id, special and _adds_template_tokens(info))


def _adds_template_tokens(info: Any) -> bool:
    """Whether the tokenizer's post-processor adds tokens (a BOS/EOS template); cached."""
    cached = getattr(info, "_align_template", None)
    if cached is None:
        cached = any(info.tokenizer.encode("a", add_special_tokens=True).special_tokens_mask)
        info._align_template = cached
    return cached


class _DocError(Exception):
    def __init__(self, k: int, msg: str) -> None:
        self.k, self.msg = k, msg


def _align_encoded(texts, good, enc, infos, rejected) -> AlignmentBatch:
    """Byte offsets of all documents at once (laid end to end, one byte between documents), then align."""
    docs = [texts[i] for i in good]
    datas = [d.encode("utf-8", "surrogatepass") for d in docs]
    byte_base = _doc_offsets([len(d) + 1 for d in datas])[:-1]
    out = []
    for side, info in zip(enc, infos):
        n = [x.size for x in side.ids]
        doc = np.repeat(np.arange(len(docs)), n)
        cat_ids = np.concatenate(side.ids + [np.zeros(0, np.int64)])
        out.append((cat_ids, _side_byte_offsets(info, side, docs, datas), doc, n))
    (s_ids, s_off, s_doc, ns), (t_ids, t_off, t_doc, nt) = out
    try:
        sc, tc, nc = _localize(s_off, t_off, ns, nt, byte_base)
    except XTokenError:
        for k in range(len(docs)):
            try:
                align_offsets(s_off[s_doc == k] - byte_base[k], t_off[t_doc == k] - byte_base[k])
            except XTokenError as e:
                raise _DocError(k, str(e)) from None
        raise
    return AlignmentBatch(s_ids, t_ids, _doc_offsets(ns), _doc_offsets(nt), sc, tc, nc,
                          np.asarray(good, dtype=np.int64), sorted(rejected))


def alignment_to_json(a: Alignment, text: str, student_ids: np.ndarray, teacher_ids: np.ndarray, student: Any, teacher: Any) -> list[dict]:
    """Chunk pairs with their token ids and texts (for the CLI and debugging)."""
    from nemo_xtoken.vocab import canonical_vocab, load_tokenizer

    scv, tcv = canonical_vocab(load_tokenizer(student)), canonical_vocab(load_tokenizer(teacher))
    data = text.encode("utf-8", "surrogatepass")
    out = []
    for k, ((a0, a1), (b0, b1)) in enumerate(a.pairs()):
        span = a.spans[k] if a.spans is not None else (0, 0)
        out.append(
            {
                "chunk": k,
                "text": data[int(span[0]): int(span[1])].decode("utf-8", "backslashreplace"),
                "student": [a0, a1],
                "teacher": [b0, b1],
                "student_tokens": [scv.display(int(i)) for i in student_ids[a0:a1]],
                "teacher_tokens": [tcv.display(int(i)) for i in teacher_ids[b0:b1]],
                "one_sided": (a0 == a1) != (b0 == b1),
            }
        )
        if out[-1]["one_sided"]:  # what the token of no text is: a BOS/template token, or a dummy-prefix space
            cv, ids = (scv, student_ids[a0:a1]) if a1 > a0 else (tcv, teacher_ids[b0:b1])
            out[-1]["why"] = "special token" if all(cv.special[int(i)] is not None for i in ids) else "dummy prefix"
    return out
