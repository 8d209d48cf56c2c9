"""Preprocessing at scale: both tokenizations and the alignment of every document, on disk.

Layout of the output folder (everything numpy ``.npy``, memory-mappable; no pickle)::

    DIR/params.json                 tokenizers (fingerprints), options: a rerun must match them
    DIR/shards/00000/               one folder per ``shard_size`` input documents, renamed into place
        student_ids.npy  int32 [S]  concatenated student ids of the shard's accepted documents
        teacher_ids.npy  int32 [T]
        student_chunk_ids.npy int32 [S]   per-token chunk id, local to its document
        teacher_chunk_ids.npy int32 [T]
        student_offsets.npy int64 [n+1]   document d = student_ids[student_offsets[d]:student_offsets[d+1]]
        teacher_offsets.npy int64 [n+1]
        n_chunks.npy int64 [n]
        source_index.npy int64 [n]        line / row of the document in the input
        rejected.jsonl                    {"index": i, "reason": "..."} per rejected document
        DONE.json                         shard statistics: written last, before the atomic rename
    DIR/manifest.json               shards, totals, and the final report

A shard is written under a temporary name and renamed when complete, so an interrupted run leaves
no half shard; a rerun skips the shards that have ``DONE.json``.  The output does not depend on
the number of workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nemo_xtoken.align.core import Alignment, align_batch
from nemo_xtoken.errors import XTokenError

__all__ = ["PreprocessOptions", "preprocess", "PreprocessedCorpus", "iter_documents"]

_FORMAT = "nemo_xtoken.preprocessed/1"
_ARRAYS = (
    "student_ids", "teacher_ids", "student_chunk_ids", "teacher_chunk_ids",
    "student_offsets", "teacher_offsets", "n_chunks", "source_index",
)


@dataclass
class PreprocessOptions:
    """What `xtoken preprocess` does; recorded in ``params.json``."""

    student_tokenizer: str
    teacher_tokenizer: str
    field: str = "text"
    shard_size: int = 1000
    student_special_tokens: bool = True
    teacher_special_tokens: bool = True
    student_add_bos: bool = False
    teacher_add_bos: bool = False


def iter_documents(path: str | os.PathLike[str], field: str = "text") -> Iterator[tuple[int, str | None, str | None]]:
    """Yield ``(index, text, None)`` or ``(index, None, reason)`` for each document of a jsonl or parquet file."""
    p = Path(path)
    if not p.is_file():
        raise XTokenError(f"input {p} does not exist: pass a .jsonl or .parquet file")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise XTokenError(f"reading {p} needs pyarrow: `pip install pyarrow`, or convert the input to jsonl") from None
        f = pq.ParquetFile(p)
        if field not in f.schema_arrow.names:
            raise XTokenError(f"{p} has no column {field!r} (columns: {f.schema_arrow.names}); pass --field")
        i = 0
        for batch in f.iter_batches(columns=[field]):
            for v in batch.column(0).to_pylist():
                yield (i, v, None) if isinstance(v, str) else (i, None, f"{field!r} is {type(v).__name__}, not a string")
                i += 1
        return
    with open(p, "rb") as fh:
        for i, line in enumerate(fh):
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield i, None, f"line {i + 1} is not JSON ({e.__class__.__name__})"
                continue
            v = obj.get(field) if isinstance(obj, dict) else None
            if isinstance(v, str):
                yield i, v, None
            else:
                yield i, None, f"line {i + 1} has no string field {field!r}"


# ---- workers ---------------------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _init_worker(opts: PreprocessOptions) -> None:
    # A pool whose initializer raises respawns workers forever (the run would hang): keep the
    # error and raise it from the first job instead, where the parent sees it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from nemo_xtoken.vocab import load_tokenizer

        _W["opts"] = opts
        _W["s"] = load_tokenizer(opts.student_tokenizer)
        _W["t"] = load_tokenizer(opts.teacher_tokenizer)
        _W.pop("init_error", None)
    except Exception as e:  # noqa: BLE001 — re-raised in _process_shard
        _W["init_error"] = f"{type(e).__name__}: {e}"


def _process_shard(job: tuple[int, str, list[tuple[int, str | None, str | None]]]) -> dict[str, Any]:
    """Tokenize, align and write one shard (atomically); return its statistics."""
    shard, out_dir, docs = job
    if "init_error" in _W:
        raise XTokenError(f"preprocess worker could not start: {_W['init_error']}")
    opts: PreprocessOptions = _W["opts"]
    rejected = [{"index": i, "reason": reason} for i, text, reason in docs if text is None]
    rejected += [{"index": i, "reason": "empty text"} for i, text, _ in docs if text == ""]
    keep = [(i, text) for i, text, _ in docs if text]
    batch = align_batch(
        [t for _, t in keep], _W["s"], _W["t"],
        student_special_tokens=opts.student_special_tokens, teacher_special_tokens=opts.teacher_special_tokens,
        student_add_bos=opts.student_add_bos, teacher_add_bos=opts.teacher_add_bos, on_error="skip",
    )
    rejected += [{"index": keep[k][0], "reason": r} for k, r in batch.rejected]
    rejected.sort(key=lambda r: r["index"])
    one_s, one_t = batch.one_sided_token_counts()
    arrays = {
        "student_ids": batch.student_ids.astype(np.int32),
        "teacher_ids": batch.teacher_ids.astype(np.int32),
        "student_chunk_ids": batch.student_chunk_ids.astype(np.int32),
        "teacher_chunk_ids": batch.teacher_chunk_ids.astype(np.int32),
        "student_offsets": batch.student_offsets,
        "teacher_offsets": batch.teacher_offsets,
        "n_chunks": batch.n_chunks,
        "source_index": np.asarray([keep[k][0] for k in batch.index.tolist()], dtype=np.int64),
    }
    src = arrays["source_index"]
    stats = {
        "shard": shard,
        "input_documents": len(docs),
        "documents": len(src),
        "student_tokens": int(arrays["student_ids"].size),
        "teacher_tokens": int(arrays["teacher_ids"].size),
        "chunks": int(arrays["n_chunks"].sum()),
        "one_sided_student_tokens": one_s,
        "one_sided_teacher_tokens": one_t,
        "rejected": len(rejected),
    }
    final = Path(out_dir) / "shards" / f"{shard:05d}"
    tmp = Path(out_dir) / "shards" / f".{shard:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v, allow_pickle=False)
    with open(tmp / "rejected.jsonl", "w") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(tmp / "DONE.json", "w") as f:
        json.dump(stats, f)
    shutil.rmtree(final, ignore_errors=True)  # a stale folder without DONE.json
    os.rename(tmp, final)
    stats["rejected_list"] = rejected
    return stats


def _params(opts: PreprocessOptions, input_path: str) -> dict[str, Any]:
    from nemo_xtoken.vocab import load_tokenizer

    s, t = load_tokenizer(opts.student_tokenizer), load_tokenizer(opts.teacher_tokenizer)
    return {
        "format": _FORMAT,
        "input": os.path.abspath(input_path),
        "student_tokenizer": opts.student_tokenizer,
        "teacher_tokenizer": opts.teacher_tokenizer,
        "student_fingerprint": s.fingerprint,
        "teacher_fingerprint": t.fingerprint,
        "field": opts.field,
        "shard_size": opts.shard_size,
        "student_special_tokens": opts.student_special_tokens,
        "teacher_special_tokens": opts.teacher_special_tokens,
        "student_add_bos": opts.student_add_bos,
        "teacher_add_bos": opts.teacher_add_bos,
    }


def _read_shard_stats(out: Path, shard: int) -> dict[str, Any] | None:
    done = out / "shards" / f"{shard:05d}" / "DONE.json"
    if not done.is_file():
        return None
    stats = json.loads(done.read_text())
    rej = out / "shards" / f"{shard:05d}" / "rejected.jsonl"
    stats["rejected_list"] = [json.loads(x) for x in rej.read_text().splitlines() if x.strip()] if rej.is_file() else []
    return stats


def preprocess(
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    opts: PreprocessOptions,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize and align every document of ``input_path`` into ``output_dir``; return the report."""
    if opts.shard_size < 1:
        raise XTokenError(f"shard_size must be >= 1, got {opts.shard_size}")
    if workers < 1:
        raise XTokenError(f"--workers must be >= 1, got {workers}")
    out = Path(output_dir)
    params = _params(opts, str(input_path))
    out.mkdir(parents=True, exist_ok=True)
    pfile = out / "params.json"
    if pfile.is_file():
        old = json.loads(pfile.read_text())
        diff = sorted(k for k in params if k not in ("input", "student_tokenizer", "teacher_tokenizer") and old.get(k) != params[k])
        if diff:
            raise XTokenError(
                f"{out} holds a preprocessing run with other settings ({', '.join(diff)} differ): "
                "use a new --output folder or delete this one"
            )
    else:
        pfile.write_text(json.dumps(params, indent=2))
    (out / "shards").mkdir(exist_ok=True)

    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    skipped = 0

    def jobs() -> Iterator[tuple[int, str, list]]:
        buf: list = []
        shard = 0
        for doc in iter_documents(input_path, opts.field):
            buf.append(doc)
            if len(buf) == opts.shard_size:
                yield from emit(shard, buf)
                shard += 1
                buf = []
        if buf:
            yield from emit(shard, buf)

    def emit(shard: int, buf: list) -> Iterator[tuple[int, str, list]]:
        nonlocal skipped
        st = _read_shard_stats(out, shard)
        if st is not None and st["input_documents"] == len(buf):
            results[shard] = st
            skipped += 1
            bar.update(len(buf))
            return
        yield shard, str(out), buf

    from tqdm import tqdm

    bar = tqdm(desc="preprocess", unit="doc", disable=not progress, file=sys.stderr)
    try:
        if workers == 1:
            _init_worker(opts)
            for job in jobs():
                st = _process_shard(job)
                results[st["shard"]] = st
                bar.update(st["input_documents"])
        else:
            import multiprocessing as mp

            # forkserver: workers fork from a clean single-threaded server (never from this process,
            # whose tokenizer thread pools make fork unsafe), with the package preloaded.
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["nemo_xtoken.align.preprocess"])
            else:
                ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
                for st in pool.imap(_process_shard, jobs()):
                    results[st["shard"]] = st
                    bar.update(st["input_documents"])
    finally:
        bar.close()
    shards = [results[k] for k in sorted(results)]
    keys = ("input_documents", "documents", "student_tokens", "teacher_tokens", "chunks",
            "one_sided_student_tokens", "one_sided_teacher_tokens", "rejected")
    totals = {k: sum(s[k] for s in shards) for k in keys}
    rejected = [r for s in shards for r in s["rejected_list"]]
    report = {
        **totals,
        "shards": len(shards),
        "shards_skipped": skipped,
        "rejected_documents": rejected[:1000],
        "seconds": round(time.perf_counter() - t0, 3),
        "workers": workers,
    }
    manifest = {
        "format": _FORMAT,
        "params": params,
        "shards": [{k: s[k] for k in ("shard", *keys)} for s in shards],
        "totals": totals,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return report


def format_report(r: dict[str, Any]) -> str:
    """The final report as text."""
    lines = [
        f"documents: {r['documents']} aligned of {r['input_documents']} read ({r['rejected']} rejected) "
        f"in {r['shards']} shards ({r['shards_skipped']} already done), {r['seconds']:.2f} s, {r['workers']} worker(s)",
        f"tokens: student {r['student_tokens']}, teacher {r['teacher_tokens']}; chunks {r['chunks']}",
        f"one-sided tokens: student {r['one_sided_student_tokens']}, teacher {r['one_sided_teacher_tokens']}",
    ]
    for x in r["rejected_documents"][:20]:
        lines.append(f"  rejected document {x['index']}: {x['reason']}")
    if r["rejected"] > 20:
        lines.append(f"  … {r['rejected'] - 20} more (see shards/*/rejected.jsonl)")
    return "\n".join(lines)


class PreprocessedCorpus:
    """Read a folder written by :func:`preprocess`: ``corpus[i]`` → (student ids, teacher ids, Alignment).

    Arrays are memory-mapped; documents are numbered in input order over the accepted ones
    (``source_index(i)`` gives the input line/row).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise XTokenError(f"{self.path} has no manifest.json: it is not (or not yet completely) an `xtoken preprocess` output")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != _FORMAT:
            raise XTokenError(f"{mf} has format {self.manifest.get('format')!r}, expected {_FORMAT!r}; re-run `xtoken preprocess`")
        self.params = self.manifest["params"]
        self._shards: list[dict[str, np.ndarray]] = []
        counts = []
        for s in self.manifest["shards"]:
            d = self.path / "shards" / f"{s['shard']:05d}"
            try:
                arrs = {k: np.load(d / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in _ARRAYS}
            except (OSError, ValueError) as e:
                raise XTokenError(f"cannot read shard {d} ({e}); re-run `xtoken preprocess` on the same output to repair it") from None
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
        a, j = self._locate(int(i))
        s0, s1 = int(a["student_offsets"][j]), int(a["student_offsets"][j + 1])
        t0, t1 = int(a["teacher_offsets"][j]), int(a["teacher_offsets"][j + 1])
        al = Alignment.from_chunk_ids(a["student_chunk_ids"][s0:s1], a["teacher_chunk_ids"][t0:t1], int(a["n_chunks"][j]))
        return np.asarray(a["student_ids"][s0:s1]), np.asarray(a["teacher_ids"][t0:t1]), al

    def source_index(self, i: int) -> int:
        """The input line/row of document ``i``."""
        a, j = self._locate(int(i))
        return int(a["source_index"][j])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-document student and teacher token counts (for packing and sampling)."""
        s = np.concatenate([np.diff(a["student_offsets"]) for a in self._shards]) if self._shards else np.zeros(0, np.int64)
        t = np.concatenate([np.diff(a["teacher_offsets"]) for a in self._shards]) if self._shards else np.zeros(0, np.int64)
        return s, t
