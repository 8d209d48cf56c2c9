"""Corpus readers: the input files of a run or of ``xtoken preprocess``, their documents, and the preprocessed format.

* text input (``.jsonl``, ``.parquet``, or a folder of them, :func:`input_files`): :func:`iter_documents`
  yields every document's text or the reason it is rejected, through a bounded line reader (memory
  follows ``max_bytes``, never the file); :func:`iter_chat_rows` and :func:`read_conversations` do the
  same for conversations (docs/chat.md); :func:`input_identity` is what makes a resumed
  ``xtoken preprocess`` the same input (content hashes);
* the ``xtoken preprocess`` output folder (written by :mod:`nemo_xtoken.data.preprocess`, layout there):
  :class:`PreprocessedCorpus` reads it memory-mapped; :func:`read_manifest` / :func:`load_shard` are
  shared with the teacher cache (:mod:`nemo_xtoken.offline.cache`);
* small real-English corpora for CPU runs: :func:`short_passages`, :func:`write_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nemo_xtoken.align.core import Alignment
from nemo_xtoken.errors import XTokenError

__all__ = ["MAX_DOCUMENT_BYTES", "input_files", "iter_chat_rows", "iter_documents", "input_identity", "read_manifest", "load_shard", "PreprocessedCorpus", "read_conversations", "short_passages", "write_jsonl"]

_FORMAT = "nemo_xtoken.preprocessed/1"
_ARRAYS = (
    "student_ids", "teacher_ids", "student_chunk_ids", "teacher_chunk_ids",
    "student_offsets", "teacher_offsets", "n_chunks", "source_index",
)


#: Documents larger than this (bytes of the JSON line / UTF-8 bytes of a parquet value) are rejected
#: and counted, never read whole: aligning a document takes about 180 bytes of memory per character
#: (a 33.8 M-character one needed 6.1 GB), so the cap bounds a worker's memory (~0.7 GB at 4 MiB).
#: ``--max-document-bytes`` changes it; split larger texts into documents first.
MAX_DOCUMENT_BYTES = 4 << 20


_CHAT_ARRAYS = ("student_loss_mask", "student_kd_mask", "teacher_kd_mask")


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of an input: the file itself, or a folder's ``*.jsonl`` / ``*.parquet`` files in name order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".jsonl", ".parquet"))
        if not files:
            found = sorted(f.name for f in p.iterdir())[:8]
            raise XTokenError(
                f"input {p} is a folder without .jsonl or .parquet files (it holds {found or 'nothing'}): "
                "pass a .jsonl or .parquet file, or a folder of them"
            )
        for f in files:
            _refuse_compressed(f)
        return files
    if not p.exists():
        raise XTokenError(f"input {p} does not exist: pass a .jsonl or .parquet file, or a folder of them")
    if not p.is_file():
        raise XTokenError(f"input {p} is not a regular file: pass a .jsonl or .parquet file, or a folder of them")
    _refuse_compressed(p)
    return [p]


_COMPRESSED = {b"\x1f\x8b": "gzip (gunzip it)", b"\x28\xb5": "zstd (zstd -d it)", b"BZ": "bzip2 (bunzip2 it)", b"\xfd7": "xz (unxz it)"}


def _refuse_compressed(p: Path) -> None:
    """A compressed .jsonl would be read as lines of binary: name the compression instead."""
    if p.suffix == ".parquet":
        return
    with open(p, "rb") as fh:
        head = fh.read(2)
    if head in _COMPRESSED:
        raise XTokenError(f"input {p} is {_COMPRESSED[head].split(' (')[0]}-compressed: decompress it first ({_COMPRESSED[head].split(' (')[1]}")


def iter_chat_rows(
    path: str | os.PathLike[str], max_bytes: int = MAX_DOCUMENT_BYTES
) -> Iterator[tuple[int, str | None, str | None]]:
    """``--chat``: ``(index, row as JSON text, None)`` or ``(index, None, reason)`` per row (indices as :func:`iter_documents`).

    Lines are read through the same bounded reader as raw text: a row over ``max_bytes`` is rejected and
    counted, and a row that is not UTF-8 or not JSON is rejected with its line number.
    """
    files = input_files(path)
    many = len(files) > 1 or Path(path).is_dir()
    base = 0
    for f in files:
        where = f"{f.name} " if many else ""
        if f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise XTokenError(f"reading {f} needs pyarrow: `pip install pyarrow`, or convert the input to jsonl") from None
            for i, row in enumerate(pq.read_table(f).to_pylist()):
                yield base + i, json.dumps(row, ensure_ascii=False, default=str), None
        else:
            with open(f, "rb") as fh:
                for i, line, reason in _bounded_lines(fh, where, max_bytes):
                    if reason is not None:
                        yield base + i, None, reason
                        continue
                    if not line.strip():
                        continue  # a blank line is no conversation
                    try:
                        text = line.decode("utf-8")
                        obj = json.loads(text)
                        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is not text
                    except UnicodeEncodeError:
                        yield base + i, None, f"{where}line {i + 1} holds a lone surrogate, which is not valid Unicode text: fix or drop the row"
                        continue
                    except UnicodeDecodeError as e:
                        yield base + i, None, f"{where}line {i + 1} is not valid UTF-8 (byte {line[e.start]:#04x} at offset {e.start}): re-encode the input as UTF-8"
                        continue
                    except json.JSONDecodeError as e:
                        yield base + i, None, f"{where}line {i + 1} is not JSON ({e.__class__.__name__})"
                        continue
                    yield base + i, text, None
        base += _count_records(f) if many else 0


def iter_documents(
    path: str | os.PathLike[str], field: str = "text", max_bytes: int = MAX_DOCUMENT_BYTES
) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield ``(index, text, None)`` or ``(index, None, reason)`` for each document of a jsonl/parquet file or folder.

    ``index`` counts lines (rows) from 0 over the whole input, blank lines included, so it points at
    the document's line; blank lines themselves yield nothing.  A line is read at most ``max_bytes``
    at a time: a longer one is rejected (and skipped in blocks), so memory never follows the file.
    Rejected with a reason: not JSON, no such field, a field that is not a string, text that is not
    valid Unicode (a lone surrogate such as ``"\\ud800"``), a document over ``max_bytes``.
    """
    if max_bytes < 1:
        raise XTokenError(f"the document size cap must be >= 1 byte, got {max_bytes}")
    files = input_files(path)
    many = len(files) > 1 or Path(path).is_dir()
    base = 0
    for f in files:
        where = f"{f.name} " if many else ""
        for n, text, reason in _iter_file(f, field, where, max_bytes):
            yield base + n, text, reason
        base += _count_records(f) if many else 0


def _count_records(f: Path) -> int:
    """Lines of a jsonl file (a last line without newline counts), rows of a parquet file."""
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(f).metadata.num_rows)
    n, last = 0, b"\n"
    with open(f, "rb") as fh:
        while block := fh.read(1 << 22):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _too_big(where: str, what: str, size: int | str, max_bytes: int) -> str:
    return (
        f"{where}{what} is {size} bytes, over the {max_bytes}-byte document cap: split it into smaller documents "
        "or raise --max-document-bytes"
    )


def _not_unicode(where: str, what: str, field: str, text: str) -> str | None:
    """The reason a text is not valid Unicode (a lone surrogate: tokenizers cannot take it), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"{where}{what}: {field!r} holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), which "
            "is not valid Unicode text: fix or drop the document"
        )
    return None


def _bounded_lines(fh: Any, where: str, max_bytes: int) -> Iterator[tuple[int, bytes, str | None]]:
    """``(index, line, None)`` per line of a binary file, or ``(index, b"", reason)`` for a line over ``max_bytes``.

    A line is read at most ``max_bytes`` at a time and a longer one is skipped in 1 MiB blocks, so memory
    follows the cap, never the file.  Blank lines are yielded (the callers skip them; indices count them).
    """
    i = -1
    while True:
        line = fh.readline(max_bytes + 1)
        if not line:
            return
        i += 1
        if len(line) > max_bytes and not (len(line) == max_bytes + 1 and line.endswith(b"\n")):
            size = len(line)
            while line and not line.endswith(b"\n"):  # skip the rest of the line, a block at a time
                line = fh.readline(1 << 20)
                size += len(line)
            yield i, b"", _too_big(where, f"line {i + 1}", size - line.endswith(b"\n"), max_bytes)
            continue
        yield i, line, None


def _iter_file(p: Path, field: str, where: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[tuple[int, str | None, str | None]]:
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise XTokenError(f"reading {p} needs pyarrow: `pip install pyarrow`, or convert the input to jsonl") from None
        f = pq.ParquetFile(p)
        if field not in f.schema_arrow.names:
            raise XTokenError(f"{p} has no column {field!r} (columns: {f.schema_arrow.names}); pass --field")
        i = 0
        for batch in f.iter_batches(columns=[field], batch_size=64):
            for v in batch.column(0).to_pylist():
                if not isinstance(v, str):
                    yield i, None, f"{where}row {i}: {field!r} is {type(v).__name__}, not a string"
                elif len(v) > max_bytes // 4 and len(v.encode("utf-8")) > max_bytes:
                    yield i, None, _too_big(where, f"row {i}", len(v.encode("utf-8")), max_bytes)
                else:
                    yield i, v, None
                i += 1
        return
    with open(p, "rb") as fh:
        for i, line, reason in _bounded_lines(fh, where, max_bytes):
            if reason is not None:
                yield i, None, reason
                continue
            if not line.strip():
                continue  # a blank line is no document
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                yield i, None, f"{where}line {i + 1} is not valid UTF-8 (byte {line[e.start]:#04x} at offset {e.start}): re-encode the input as UTF-8"
                continue
            except json.JSONDecodeError as e:
                yield i, None, f"{where}line {i + 1} is not JSON ({e.__class__.__name__})"
                continue
            if not isinstance(obj, dict) or field not in obj:
                yield i, None, f"{where}line {i + 1} has no string field {field!r}"
                continue
            v = obj[field]
            if not isinstance(v, str):
                yield i, None, f"{where}line {i + 1}: field {field!r} is {_json_type(v)}, not a string"
            elif (bad := _not_unicode(where, f"line {i + 1}", field, v)) is not None:
                yield i, None, bad
            else:
                yield i, v, None


def _json_type(v: Any) -> str:
    """The JSON name of a decoded value's type (for messages about the input)."""
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(type(v), "null" if v is None else type(v).__name__)


def input_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies an input: per file its path, size, modification time, SHA-256 of the whole content, records."""
    files = []
    for f in input_files(path):
        h = hashlib.sha256()
        n, last = 0, b"\n"
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
                n += block.count(b"\n")
                last = block[-1:]
        st = f.stat()
        files.append({
            "path": str(f.resolve()), "name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": h.hexdigest(), "lines": n + (last != b"\n") if f.suffix != ".parquet" else None,
        })
    return {"path": str(Path(path).resolve()), "folder": Path(path).is_dir(), "files": files}


def _identity_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """Why two input identities are different content (None: the same content, maybe moved or touched)."""
    if not old:
        return "the output records no input identity (made by an older version)"
    of, nf = old.get("files", []), new["files"]
    if len(of) != len(nf):
        return f"it had {len(of)} file(s) {[f['name'] for f in of][:5]}, the input has {len(nf)} {[f['name'] for f in nf][:5]}"
    for a, b in zip(of, nf):
        if a["size"] != b["size"]:
            return f"{b['name']}: {a['size']} bytes before, {b['size']} now"
        if a["sha256"] != b["sha256"]:
            return f"{b['name']}: same size, different content (sha256 {a['sha256'][:12]}… before, {b['sha256'][:12]}… now)"
    return None


def read_manifest(path: Path, fmt: str, tool: str, fix: str) -> dict:
    """The ``manifest.json`` of a finished ``tool`` output folder (``xtoken preprocess``, ``xtoken cache-teacher``), format checked."""
    mf = path / "manifest.json"
    if not mf.is_file():
        raise XTokenError(f"{path} has no manifest.json: it is not (or not yet completely) an `{tool}` output")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != fmt:
        raise XTokenError(f"{mf} has format {manifest.get('format')!r}, expected {fmt!r}; {fix}")
    return manifest


def load_shard(d: Path, names: Any, noun: str, tool: str) -> dict[str, np.ndarray]:
    """The arrays ``names`` of one shard folder, memory-mapped; an unreadable file names the shard and the repair."""
    try:
        return {k: np.load(d / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in names}
    except (OSError, ValueError) as e:
        raise XTokenError(f"cannot read {noun} {d} ({e}); re-run `{tool}` on the same output to repair it") from None


class PreprocessedCorpus:
    """Read a folder written by :func:`preprocess`: ``corpus[i]`` → (student ids, teacher ids, Alignment).

    Arrays are memory-mapped; documents are numbered in input order over the accepted ones
    (``source_index(i)`` gives the input line/row).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, _FORMAT, "xtoken preprocess", "re-run `xtoken preprocess`")
        self.params = self.manifest["params"]
        self._shards: list[dict[str, np.ndarray]] = []
        counts = []
        for s in self.manifest["shards"]:
            d = self.path / "shards" / f"{s['shard']:05d}"
            arrs = load_shard(d, _ARRAYS + (_CHAT_ARRAYS if self.params.get("chat") else ()), "shard", "xtoken preprocess")
            if arrs["n_chunks"].shape[0] != s["documents"] or arrs["student_offsets"][-1] != arrs["student_ids"].shape[0]:
                raise XTokenError(f"shard {d} does not match manifest.json ({s['documents']} documents): re-run `xtoken preprocess`")
            self._shards.append(arrs)
            counts.append(s["documents"])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range (corpus of {n} documents)")
        i %= n
        k = int(np.searchsorted(self._starts, i, "right") - 1)
        return self._shards[k], i - int(self._starts[k])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, Alignment]:
        s, t, sc, tc, n = self.arrays(i)
        return np.asarray(s), np.asarray(t), Alignment.from_chunk_ids(sc, tc, n)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Document ``i`` as stored: student ids, teacher ids, their per-token chunk ids (memory-mapped), chunk count."""
        a, j = self._locate(int(i))
        s0, s1 = int(a["student_offsets"][j]), int(a["student_offsets"][j + 1])
        t0, t1 = int(a["teacher_offsets"][j]), int(a["teacher_offsets"][j + 1])
        return a["student_ids"][s0:s1], a["teacher_ids"][t0:t1], a["student_chunk_ids"][s0:s1], a["teacher_chunk_ids"][t0:t1], int(a["n_chunks"][j])

    def source_index(self, i: int) -> int:
        """The input line/row of document ``i``."""
        a, j = self._locate(int(i))
        return int(a["source_index"][j])

    @property
    def chat(self) -> bool:
        """Written by ``xtoken preprocess --chat`` (documents carry loss and KD masks)."""
        return bool(self.params.get("chat"))

    def chat_masks(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``--chat`` output: document ``i``'s student loss mask, student and teacher KD masks (bool per token)."""
        if not self.chat:
            raise XTokenError(f"{self.path} was not preprocessed with --chat: it has no loss masks")
        a, j = self._locate(int(i))
        s0, s1 = int(a["student_offsets"][j]), int(a["student_offsets"][j + 1])
        t0, t1 = int(a["teacher_offsets"][j]), int(a["teacher_offsets"][j + 1])
        return (np.asarray(a["student_loss_mask"][s0:s1], dtype=bool), np.asarray(a["student_kd_mask"][s0:s1], dtype=bool),
                np.asarray(a["teacher_kd_mask"][t0:t1], dtype=bool))

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-document student and teacher token counts (for packing and sampling)."""
        s = np.concatenate([np.diff(a["student_offsets"]) for a in self._shards]) if self._shards else np.zeros(0, np.int64)
        t = np.concatenate([np.diff(a["teacher_offsets"]) for a in self._shards]) if self._shards else np.zeros(0, np.int64)
        return s, t




def read_conversations(path: str | os.PathLike[str], limit: int | None = None):
    """Rows of a ``.jsonl``/``.parquet`` file or a folder of them: ``(where, row or None, reason)`` per row."""
    n = 0
    for f in input_files(path):
        if f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise XTokenError(f"{f}: reading parquet needs pyarrow (pip install pyarrow), or convert it to .jsonl") from None
            rows = pq.read_table(f).to_pylist()
            it = ((f"{f} row {i}", r, None) for i, r in enumerate(rows))
        else:
            def lines(f=f):
                with open(f, encoding="utf-8") as fh:
                    for i, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            yield f"{f} line {i}", json.loads(line), None
                        except ValueError as e:
                            yield f"{f} line {i}", None, f"not JSON ({e})"
            it = lines()
        for item in it:
            if limit is not None and n >= limit:
                return
            n += 1
            yield item



_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def short_passages(path: str | Path, n: int, *, max_chars: int = 400, min_chars: int = 120) -> list[str]:
    """The first ``n`` passages of ``path`` (jsonl ``{"text"}``): whole sentences, in order, ``min_chars … max_chars`` long.

    Sentences longer than ``max_chars`` are skipped (never cut), so every passage is real,
    unmodified text.
    """
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cur = ""
            for sent in _SENTENCE_END.split(json.loads(line)["text"]):
                sent = sent.strip()
                if len(sent) > max_chars:
                    cur = ""
                    continue
                if cur and len(cur) + 1 + len(sent) > max_chars:
                    if len(cur) >= min_chars:
                        out.append(cur)
                        if len(out) == n:
                            return out
                    cur = ""
                cur = f"{cur} {sent}" if cur else sent
    return out


def write_jsonl(texts: list[str], path: str | Path) -> Path:
    """``{"text": …}`` per line."""
    p = Path(path)
    with open(p, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return p
