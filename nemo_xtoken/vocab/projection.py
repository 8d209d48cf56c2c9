"""The sparse vocabulary projection W (``|V_S| × |V_T|``, rows sum to 1), built from two tokenizers.

Pass 1 (exact match): a student token whose canonical string equals a teacher token's maps to it
with weight 1.  Pass 2 (multi-token rule): an unmatched student token's text is re-tokenized by
the teacher; a result of length ``L ≤ max_len`` gets weights ``β·γ^i`` on its i-th token, rows
truncated to ``top_k`` and normalized.  Rows with no mapping stay empty and are counted.

W is stored as CSR in a safetensors file with the fingerprints of both tokenizers, so that it is
never used with tokenizers it was not built for.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nemo_xtoken.errors import ProjectionFileError, XTokenError
from nemo_xtoken.vocab.canonical import CanonicalVocab, bytes_to_unicode, canonical_vocab
from nemo_xtoken.vocab.tokenizer_io import TokenizerInfo, load_tokenizer

__all__ = [
    "Projection",
    "build_projection",
    "cached_projection",
    "load_projection",
    "FORMAT_VERSION",
    "ROW_EMPTY",
    "ROW_EXACT",
    "ROW_MULTI",
    "ROW_NO_TOKEN",
]

FORMAT_VERSION = 1
_META_KEY = "nemo_xtoken.projection"

ROW_EMPTY = 0  # a real student token with no teacher mapping (re-tokenization longer than max_len)
ROW_EXACT = 1  # pass 1: canonical strings equal
ROW_MULTI = 2  # pass 2: teacher re-tokenization of length ≤ max_len
ROW_NO_TOKEN = 3  # an id in a gap of the student's id space: stands for no string
ROW_KIND_NAMES = {ROW_EMPTY: "empty", ROW_EXACT: "exact", ROW_MULTI: "multi_token", ROW_NO_TOKEN: "no_token"}


@dataclass
class Projection:
    """W as CSR arrays plus the provenance needed to refuse misuse.

    ``indptr[s]:indptr[s+1]`` index the non-zeros of student row ``s`` in ``indices`` (teacher ids)
    and ``data`` (weights, summing to 1 on every non-empty row), sorted by decreasing weight.
    """

    indptr: np.ndarray  # int64 [V_S + 1]
    indices: np.ndarray  # int32 [nnz]
    data: np.ndarray  # float32 [nnz]
    row_kind: np.ndarray  # uint8 [V_S]
    student_vocab_size: int
    teacher_vocab_size: int
    student_fingerprint: str
    teacher_fingerprint: str
    beta: float = 0.9  # the paper's β: recorded, cancels in the row normalization (see PAPER_BETA)
    gamma: float = 0.1
    max_len: int = 4
    top_k: int = 4
    meta: dict[str, Any] = field(default_factory=dict)  # informative: tokenizer sources, counts

    # ---- queries -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.student_vocab_size, self.teacher_vocab_size)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def row(self, s: int) -> list[tuple[int, float]]:
        """Non-zeros of student row ``s`` as ``(teacher_id, weight)``, by decreasing weight."""
        a, b = int(self.indptr[s]), int(self.indptr[s + 1])
        return [(int(t), float(w)) for t, w in zip(self.indices[a:b], self.data[a:b])]

    def top1(self) -> np.ndarray:
        """Each student row's highest-weight teacher id, ``-1`` for empty rows (int64 [V_S])."""
        out = np.full(self.student_vocab_size, -1, dtype=np.int64)
        nonempty = self.indptr[1:] > self.indptr[:-1]
        out[nonempty] = self.indices[self.indptr[:-1][nonempty]]
        return out

    def empty_rows(self) -> np.ndarray:
        """Student ids that are real tokens but have no teacher mapping."""
        return np.nonzero(self.row_kind == ROW_EMPTY)[0]

    def counts(self) -> dict[str, int]:
        return {name: int((self.row_kind == k).sum()) for k, name in ROW_KIND_NAMES.items()}

    def check_tokenizers(self, student: TokenizerInfo | None, teacher: TokenizerInfo | None, path: str = "W") -> None:
        """Refuse a pair of tokenizers other than the ones W was built from (names the side)."""
        for side, info, want in (("student", student, self.student_fingerprint), ("teacher", teacher, self.teacher_fingerprint)):
            if info is not None and info.fingerprint != want:
                raise ProjectionFileError(
                    f"{path} was built for another {side} tokenizer (fingerprint {want[:12]}…), "
                    f"but {info.source} has {info.fingerprint[:12]}…: rebuild W with "
                    "`xtoken build-projection` for this pair"
                )

    # ---- conversion ----------------------------------------------------------------------------
    def to_torch(self, *, student_padded: int | None = None, teacher_padded: int | None = None, dtype=None, device=None):
        """W as a ``torch.sparse_csr_tensor`` of shape ``[student_padded, teacher_padded]``.

        Padded student ids (a model's vocabulary rounded up) get empty rows; padded teacher ids
        get no column weight.  Sizes smaller than the tokenizers' are refused.
        """
        import torch

        rows = self.student_vocab_size if student_padded is None else int(student_padded)
        cols = self.teacher_vocab_size if teacher_padded is None else int(teacher_padded)
        if rows < self.student_vocab_size or cols < self.teacher_vocab_size:
            raise XTokenError(
                f"W has shape {self.shape} but the padded sizes asked for are ({rows}, {cols}): "
                "the model's vocabulary must be at least the tokenizer's"
            )
        import warnings

        indptr = np.concatenate([self.indptr, np.full(rows - self.student_vocab_size, self.indptr[-1], dtype=np.int64)])
        with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                torch.from_numpy(indptr),
                torch.from_numpy(self.indices.astype(np.int64)),
                torch.from_numpy(self.data).to(dtype or torch.float32),
                size=(rows, cols),
                device=device,
                check_invariants=False,  # validated on load (_validate)
            )

    # ---- storage -------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        meta = {
            "format": "nemo_xtoken.projection",
            "format_version": FORMAT_VERSION,
            "student_vocab_size": self.student_vocab_size,
            "teacher_vocab_size": self.teacher_vocab_size,
            "student_fingerprint": self.student_fingerprint,
            "teacher_fingerprint": self.teacher_fingerprint,
            "beta": self.beta,
            "gamma": self.gamma,
            "max_len": self.max_len,
            "top_k": self.top_k,
            "info": self.meta,
        }
        # One key only: safetensors writes its metadata map in hash order, one key keeps bytes stable.
        return {_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write W atomically (temporary file, then rename); equal W give identical bytes.

        The file gets the mode of any new file (``0666`` less the process umask), not the private
        ``0600`` of a temporary file: teammates on a shared file system read it as their umask allows.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        check_output_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "indptr": np.ascontiguousarray(self.indptr, dtype=np.int64),
            "indices": np.ascontiguousarray(self.indices, dtype=np.int32),
            "data": np.ascontiguousarray(self.data, dtype=np.float32),
            "row_kind": np.ascontiguousarray(self.row_kind, dtype=np.uint8),
        }
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self._metadata())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | os.PathLike[str], option: str = "--output") -> None:
    """Refuse an output path that is an existing folder (W is one file), before any work is done."""
    p = Path(path)
    if p.is_dir():
        raise XTokenError(
            f"{option} {p} is an existing folder, but W is written to one file: pass a file name, e.g. "
            f"{p / 'W.safetensors'}"
        )


def load_projection(
    path: str | os.PathLike[str],
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> Projection:
    """Read W from ``path``; with tokenizers given, refuse it unless their fingerprints match."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ProjectionFileError(f"projection file {p} does not exist: build it with `xtoken build-projection`")
    try:
        with safe_open(str(p), framework="np") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ProjectionFileError(
            f"{p} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "it may be truncated: rebuild it with `xtoken build-projection`"
        ) from None
    if _META_KEY not in header:
        raise ProjectionFileError(
            f"{p} is a safetensors file but not an nemo_xtoken projection (no '{_META_KEY}' metadata): "
            "pass a file written by `xtoken build-projection`"
        )
    try:
        meta = json.loads(header[_META_KEY])
        version = int(meta["format_version"])
    except (ValueError, KeyError, TypeError):
        raise ProjectionFileError(f"{p} has unreadable projection metadata: rebuild it with `xtoken build-projection`") from None
    if version != FORMAT_VERSION:
        raise ProjectionFileError(
            f"{p} has projection format version {version}, this nemo_xtoken reads {FORMAT_VERSION}: rebuild it"
        )
    missing = {"indptr", "indices", "data", "row_kind"} - set(arrays)
    if missing:
        raise ProjectionFileError(f"{p} lacks tensors {sorted(missing)}: rebuild it with `xtoken build-projection`")
    proj = Projection(
        indptr=arrays["indptr"].astype(np.int64, copy=False),
        indices=arrays["indices"].astype(np.int32, copy=False),
        data=arrays["data"].astype(np.float32, copy=False),
        row_kind=arrays["row_kind"].astype(np.uint8, copy=False),
        student_vocab_size=int(meta["student_vocab_size"]),
        teacher_vocab_size=int(meta["teacher_vocab_size"]),
        student_fingerprint=str(meta["student_fingerprint"]),
        teacher_fingerprint=str(meta["teacher_fingerprint"]),
        beta=float(meta["beta"]),
        gamma=float(meta["gamma"]),
        max_len=int(meta["max_len"]),
        top_k=int(meta["top_k"]),
        meta=dict(meta.get("info") or {}),
    )
    _validate(proj, str(p))
    student = load_tokenizer(student_tokenizer) if student_tokenizer is not None else None
    teacher = load_tokenizer(teacher_tokenizer) if teacher_tokenizer is not None else None
    proj.check_tokenizers(student, teacher, str(p))
    return proj


def _validate(proj: Projection, where: str) -> None:
    v_s, v_t = proj.shape
    ok = (
        proj.indptr.shape == (v_s + 1,)
        and proj.row_kind.shape == (v_s,)
        and proj.indptr[0] == 0
        and proj.indptr[-1] == proj.nnz
        and proj.data.shape == proj.indices.shape
        and bool(np.all(np.diff(proj.indptr) >= 0))
        and (proj.nnz == 0 or (int(proj.indices.min()) >= 0 and int(proj.indices.max()) < v_t))
        and bool(np.all(np.isfinite(proj.data)))
    )
    if not ok:
        raise ProjectionFileError(f"{where} holds an inconsistent CSR matrix for shape {proj.shape}: rebuild it")


# ---- building ----------------------------------------------------------------------------------

#: The paper's β.  It multiplies every weight of a row and cancels in the row normalization
#: (W[s, τ_i] = β·γ^i / Σ_j β·γ^j = γ^i / Σ_j γ^j), so it is no parameter; W files record it.
PAPER_BETA = 0.9


def _multi_weights(ids: list[int], gamma: float, top_k: int) -> list[tuple[int, float]]:
    """γ^i on the i-th teacher token (repeated ids accumulate), top-k, normalized, by weight."""
    acc: dict[int, float] = {}
    for i, t in enumerate(ids):
        acc[t] = acc.get(t, 0.0) + gamma**i
    items = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    total = sum(w for _, w in items)
    return [(t, w / total) for t, w in items]


def _teacher_key_index(cv: CanonicalVocab) -> tuple[dict[bytes, int], dict[str, int]]:
    """Canonical string → the teacher id that stands for it.

    Where several ids share a string, the one the teacher's tokenizer produces for that text
    wins: a model token before an added one, and both before a ``<0xHH>`` byte-fallback token
    (Mistral's ``<0x41>`` is ``A`` too, but the tokenizer writes ``A``); then the lowest id.
    """
    text_to_id: dict[bytes, int] = {}
    special_to_id: dict[str, int] = {}
    text, special = cv.text, cv.special
    rank = cv.added.astype(np.int8) + 2 * cv.byte_fallback.astype(np.int8)
    for r in range(4):
        for i in np.flatnonzero(rank == r).tolist():
            t = text[i]
            if t is not None:
                text_to_id.setdefault(t, i)
            elif special[i] is not None:
                special_to_id.setdefault(special[i], i)
    return text_to_id, special_to_id


def _model_alphabet_pieces(b: bytes, family: str, vocab: dict[str, int]) -> list[str | int] | None:
    """``b`` in the teacher model's own alphabet: strings for the model, ids for byte-fallback bytes."""
    if family == "byte_level":
        b2u = bytes_to_unicode()
        return ["".join(b2u[x] for x in b)]
    if family == "sentencepiece":
        s = b.decode("utf-8", "surrogateescape")  # partial UTF-8 bytes → lone surrogates
        out: list[str | int] = []
        run: list[str] = []
        for ch in s:
            if "\udc80" <= ch <= "\udcff":
                if run:
                    out.append("".join(run).replace(" ", "\u2581"))
                    run = []
                fb = vocab.get(f"<0x{ord(ch) - 0xDC00:02X}>")
                if fb is None:
                    return None
                out.append(fb)
            else:
                run.append(ch)
        if run:
            out.append("".join(run).replace(" ", "\u2581"))
        return out
    return None


def _retokenize(
    texts: list[bytes], teacher: TokenizerInfo, tcv: CanonicalVocab, progress: bool,
    while_waiting: Callable[[], Any] | None = None,
) -> list[list[int] | None]:
    """The teacher's tokenization of each student text, exact in bytes, or ``None`` if impossible.

    The teacher's full pipeline is tried first (its normal view of the text); where that changes
    the bytes (a normalizer, a dummy prefix) or the text is not valid UTF-8 (partial
    characters), the teacher's model is run on its own alphabet instead (SentencePiece: ``▁`` for
    spaces, ``<0xHH>`` for partial characters).  A teacher that inserts a dummy prefix before
    every text (a ``Prepend("▁")`` normalizer) never spells a text exactly through its pipeline,
    so it goes to its model directly: a student token is a piece of running text, not the start
    of a document.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from nemo_xtoken.vocab.canonical import dummy_prefix

    out: list[list[int] | None] = [None] * len(texts)
    tbytes = tcv.text
    size = tcv.size

    def spells(ids: list[int], want: bytes) -> bool:
        return bool(ids) and b"".join((tbytes[i] or b"\x00\xff") if i < size else b"\x00\xff" for i in ids) == want

    bar = tqdm(total=2 * len(texts), desc="re-tokenize", unit="tok", disable=not progress, leave=False)
    dp = dummy_prefix(teacher)
    if not (dp.at_start and dp.before_space):
        decodable: list[int] = []
        strs: list[str] = []
        for k, b in enumerate(texts):
            try:
                strs.append(b.decode("utf-8"))
                decodable.append(k)
            except UnicodeDecodeError:
                pass
        tok = teacher.tokenizer
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        batch = 8192
        # The Rust tokenizer releases the GIL while it encodes: one thread encodes batch after
        # batch while this one does ``while_waiting`` (the fingerprints) and checks the results.
        with ThreadPoolExecutor(1) as pool:
            futures = [(a, pool.submit(encode, strs[a : a + batch], add_special_tokens=False))
                       for a in range(0, len(strs), batch)]
            if while_waiting is not None:
                while_waiting()
            for a, fut in futures:
                encs = fut.result()
                for k, enc in zip(decodable[a : a + batch], encs):
                    ids = enc.ids
                    if spells(ids, texts[k]):
                        out[k] = ids
                bar.update(len(encs))
    elif while_waiting is not None:
        while_waiting()
    bar.update(len(texts) - bar.n)  # pass 1 done (texts it skipped included)
    # The rest: the teacher's model on its own alphabet, no normalizer or pre-tokenizer.
    model = teacher.tokenizer.model
    vocab = teacher.vocab
    for k, b in enumerate(texts):
        if out[k] is not None:
            continue
        ids: list[int] | None = []
        try:
            for piece in _model_alphabet_pieces(b, tcv.family, vocab) or [None]:
                if piece is None:
                    ids = None
                    break
                if isinstance(piece, int):
                    ids.append(piece)  # type: ignore[union-attr]
                else:
                    ids.extend(t.id for t in model.tokenize(piece))  # type: ignore[union-attr]
        except Exception:  # the model cannot tokenize it (an unknown character without byte fallback)
            ids = None
        if ids and spells(ids, b):
            out[k] = ids
    bar.update(len(texts))
    bar.close()
    return out


def _assemble_rows(
    v_s: int, exact_rows: np.ndarray, exact_cols: np.ndarray, multi: list[tuple[int, list[int]]], gamma: float, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, data) from the exact matches and the multi-token rows."""
    max_len = max((len(ids) for _, ids in multi), default=0)
    # Common case, vectorized: distinct teacher ids, γ < 1 (weights already decreasing), L ≤ top_k.
    table = {n: [gamma**i / sum(gamma**j for j in range(n)) for i in range(n)] for n in range(1, max_len + 1)}
    r_rows: list[int] = []
    r_cols: list[int] = []
    r_data: list[float] = []
    simple = gamma < 1.0
    for s, ids in multi:
        n = len(ids)
        if simple and n <= top_k and len(set(ids)) == n:
            r_rows.extend([s] * n)
            r_cols.extend(ids)
            r_data.extend(table[n])
        else:
            for t, w in _multi_weights(ids, gamma, top_k):
                r_rows.append(s)
                r_cols.append(t)
                r_data.append(w)
    rows = np.concatenate([exact_rows.astype(np.int64), np.asarray(r_rows, dtype=np.int64)])
    cols = np.concatenate([exact_cols.astype(np.int64), np.asarray(r_cols, dtype=np.int64)])
    data = np.concatenate([np.ones(exact_rows.size), np.asarray(r_data, dtype=np.float64)])
    order = np.argsort(rows, kind="stable")  # within a row: the order given (decreasing weight)
    indptr = np.zeros(v_s + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=v_s), out=indptr[1:])
    return indptr, cols[order].astype(np.int32), data[order].astype(np.float32)


def build_projection(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    gamma: float = 0.1,
    max_len: int = 4,
    top_k: int = 4,
    progress: bool = False,
) -> Projection:
    """Build W for a student/teacher tokenizer pair (exact match, then the multi-token rule).

    ``student_tokenizer``/``teacher_tokenizer``: a ``tokenizer.json`` path, Hugging Face folder,
    cached hub name, or a loaded tokenizer.  A re-tokenization of length L ≤ ``max_len`` gets the
    weights γ^i / Σ_j γ^j (the paper's β·γ^i, row-normalized: β cancels), top ``top_k`` kept.
    Deterministic: equal inputs give equal W.
    """
    if not (0 < gamma and max_len >= 1 and top_k >= 1):
        raise XTokenError(f"build_projection needs gamma > 0, max_len >= 1, top_k >= 1 (got {gamma}, {max_len}, {top_k})")
    student = load_tokenizer(student_tokenizer)
    teacher = load_tokenizer(teacher_tokenizer)
    scv, tcv = canonical_vocab(student), canonical_vocab(teacher)
    text_to_id, special_to_id = _teacher_key_index(tcv)

    v_s = scv.size
    kind = np.full(v_s, ROW_NO_TOKEN, dtype=np.uint8)
    exact_rows: list[int] = []
    exact_cols: list[int] = []
    pending: list[int] = []
    stext, sspecial = scv.text, scv.special
    for s in range(v_s):
        t = stext[s]
        if t is not None:
            hit = text_to_id.get(t)
            if hit is not None:
                exact_rows.append(s)
                exact_cols.append(hit)
            else:
                pending.append(s)
        elif sspecial[s] is not None:
            hit = special_to_id.get(sspecial[s])  # type: ignore[arg-type]
            if hit is not None:
                exact_rows.append(s)
                exact_cols.append(hit)
            else:
                kind[s] = ROW_EMPTY  # special tokens are never re-tokenized as text
    kind[exact_rows] = ROW_EXACT
    kind[pending] = ROW_EMPTY

    def fingerprints() -> None:  # computed while the teacher's tokenizer works (it releases the GIL)
        student.fingerprint, teacher.fingerprint

    retok = _retokenize([stext[s] for s in pending], teacher, tcv, progress, fingerprints)  # type: ignore[misc]
    multi = [(s, ids) for s, ids in zip(pending, retok) if ids is not None and 1 <= len(ids) <= max_len]
    kind[[s for s, _ in multi]] = ROW_MULTI
    indptr, indices, data = _assemble_rows(
        v_s, np.asarray(exact_rows, dtype=np.int64), np.asarray(exact_cols, dtype=np.int64), multi, float(gamma), int(top_k)
    )
    proj = Projection(
        indptr=indptr,
        indices=indices,
        data=data,
        row_kind=kind,
        student_vocab_size=v_s,
        teacher_vocab_size=tcv.size,
        student_fingerprint=student.fingerprint,
        teacher_fingerprint=teacher.fingerprint,
        beta=PAPER_BETA,
        gamma=float(gamma),
        max_len=int(max_len),
        top_k=int(top_k),
    )
    proj.meta["rows"] = proj.counts()
    return proj


def cached_projection(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    **params: Any,
) -> Projection:
    """``build_projection`` cached by content: the key hashes both fingerprints and the parameters.

    The file lives under ``<cache_dir>/projections/`` (default ``$XTOKEN_CACHE``); a damaged
    cache file is rebuilt, never trusted.
    """
    import hashlib

    from nemo_xtoken.assets import cache_dir as default_cache_dir

    student = load_tokenizer(student_tokenizer)
    teacher = load_tokenizer(teacher_tokenizer)
    full = {"gamma": 0.1, "max_len": 4, "top_k": 4, **params}
    key = json.dumps({"s": student.fingerprint, "t": teacher.fingerprint, "v": FORMAT_VERSION, **full}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / "projections" / f"{digest}.safetensors"
    if path.is_file():
        try:
            return load_projection(path, student, teacher)
        except ProjectionFileError:
            pass
    proj = build_projection(student, teacher, **full)
    proj.save(path)
    return proj
