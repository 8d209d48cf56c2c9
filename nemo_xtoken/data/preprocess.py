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

**Input.**  A ``.jsonl`` file (one JSON object per line; blank lines are skipped and not counted),
a ``.parquet`` file, or a folder of them (its ``*.jsonl`` and ``*.parquet`` files in name order, one
stream: ``source_index`` counts lines/rows across the files).

**Resume identity.**  ``params.json`` records the input's identity: per file its path, size,
modification time and the **SHA-256 of its whole content** (and its number of lines/rows).  A rerun
on the same output resumes only when the content is the same (sizes and hashes; a moved or touched
file with the same content is accepted) and the settings are the same; anything else is refused
with the difference named (``overwrite=True`` / ``--overwrite`` starts over).  The hash is one extra
read of the input, well under 1 % of the time preprocessing takes.  Stale shard folders (beyond this
run's shards, or left by a killed worker) are removed at the end of a run.

**Nothing aligned.**  When no document is aligned the run raises :class:`XTokenError` saying why
(the rejection reasons counted; a missing text field names the fields the input has).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nemo_xtoken.align.core import align_batch
from nemo_xtoken.data.corpus import (
    _FORMAT,
    MAX_DOCUMENT_BYTES,
    _identity_difference,
    input_files,
    input_identity,
    iter_chat_rows,
    iter_documents,
)
from nemo_xtoken.errors import XTokenError

__all__ = ["PreprocessOptions", "preprocess", "format_report"]


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
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    # conversations (`--chat`, docs/chat.md): rows with "messages", each side rendered with its own chat template
    chat: bool = False
    loss_on: str = "assistant"
    student_chat_template: str | None = None
    teacher_chat_template: str | None = None
    enable_thinking: bool = False


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
    if opts.chat:
        return _process_chat_shard(shard, out_dir, docs, opts)
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
    return _write_shard(shard, out_dir, arrays, rejected, _shard_stats(shard, len(docs), arrays, one_s, one_t, rejected))


def _shard_stats(shard: int, n_input: int, arrays: dict[str, np.ndarray], one_s: int, one_t: int, rejected: list,
                 **extra: Any) -> dict[str, Any]:
    """A shard's line of the report (text and ``--chat`` shards alike; ``extra``: the chat counts)."""
    return {
        "shard": shard,
        "input_documents": n_input,
        "documents": len(arrays["source_index"]),
        "student_tokens": int(arrays["student_ids"].size),
        "teacher_tokens": int(arrays["teacher_ids"].size),
        "chunks": int(arrays["n_chunks"].sum()),
        "one_sided_student_tokens": one_s,
        "one_sided_teacher_tokens": one_t,
        "rejected": len(rejected),
        **extra,
    }


def _process_chat_shard(shard: int, out_dir: str, docs: list, opts: PreprocessOptions) -> dict[str, Any]:
    """``--chat``: render, tokenize and align each conversation (:func:`nemo_xtoken.align.chat.align_chat`) into one shard."""
    from nemo_xtoken.align.chat import align_chat

    rejected = [{"index": i, "reason": reason} for i, raw, reason in docs if raw is None]
    keep, cas = [], []
    asst = [0, 0]
    for i, raw, _ in docs:
        if raw is None:
            continue
        try:
            ca = align_chat(json.loads(raw), _W["s"], _W["t"], loss_on=opts.loss_on, student_template=opts.student_chat_template,
                            teacher_template=opts.teacher_chat_template, template_kwargs={"enable_thinking": opts.enable_thinking},
                            where=f"row {i}")
        except XTokenError as e:
            rejected.append({"index": i, "reason": str(e)})
            continue
        keep.append(i)
        cas.append(ca)
        got, tot = ca.assistant_coverage()
        asst[0] += got
        asst[1] += tot
    rejected.sort(key=lambda r: r["index"])

    def cat(xs: list, dtype: Any) -> np.ndarray:
        return np.concatenate([np.asarray(x, dtype=dtype) for x in xs] + [np.zeros(0, dtype)])

    def offs(xs: list) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(x) for x in xs], dtype=np.int64)]).astype(np.int64)

    s_ids = [ca.student.ids for ca in cas]
    t_ids = [ca.teacher.ids for ca in cas]
    arrays = {
        "student_ids": cat(s_ids, np.int32),
        "teacher_ids": cat(t_ids, np.int32),
        "student_chunk_ids": cat([ca.alignment.student_chunk_ids for ca in cas], np.int32),
        "teacher_chunk_ids": cat([ca.alignment.teacher_chunk_ids for ca in cas], np.int32),
        "student_offsets": offs(s_ids),
        "teacher_offsets": offs(t_ids),
        "n_chunks": np.asarray([ca.alignment.n_chunks for ca in cas], dtype=np.int64),
        "source_index": np.asarray(keep, dtype=np.int64),
        "student_loss_mask": cat([ca.student.loss for ca in cas], np.uint8),
        "student_kd_mask": cat([ca.student_kd_mask() for ca in cas], np.uint8),
        "teacher_kd_mask": cat([ca.teacher_kd_mask() for ca in cas], np.uint8),
    }
    one_s = sum(int((np.diff(ca.alignment.student_chunks, axis=1)[:, 0] * ca.alignment.one_sided()).sum()) for ca in cas)
    one_t = sum(int((np.diff(ca.alignment.teacher_chunks, axis=1)[:, 0] * ca.alignment.one_sided()).sum()) for ca in cas)
    stats = _shard_stats(shard, len(docs), arrays, one_s, one_t, rejected, loss_tokens=int(arrays["student_loss_mask"].sum()),
                         assistant_tokens=asst[1], assistant_tokens_in_kd_chunks=asst[0])
    return _write_shard(shard, out_dir, arrays, rejected, stats)


def _write_shard(shard: int, out_dir: str, arrays: dict[str, np.ndarray], rejected: list, stats: dict[str, Any]) -> dict[str, Any]:
    """Write one shard's arrays, rejected list and DONE.json under a temporary name, then rename it into place."""
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
    chat = {}
    if opts.chat:  # only chat runs record these (earlier runs' params stay as they were)
        from nemo_xtoken.align.chat import chat_template

        chat = {
            "chat": True, "loss_on": opts.loss_on, "enable_thinking": opts.enable_thinking,
            "student_chat_template_sha256": hashlib.sha256(chat_template(s, opts.student_chat_template, side="student").encode()).hexdigest(),
            "teacher_chat_template_sha256": hashlib.sha256(chat_template(t, opts.teacher_chat_template, side="teacher").encode()).hexdigest(),
        }
    return {**chat, 
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
        "max_document_bytes": opts.max_document_bytes,
    }


def _read_shard_stats(out: Path, shard: int) -> dict[str, Any] | None:
    done = out / "shards" / f"{shard:05d}" / "DONE.json"
    if not done.is_file():
        return None
    stats = json.loads(done.read_text())
    rej = out / "shards" / f"{shard:05d}" / "rejected.jsonl"
    stats["rejected_list"] = [json.loads(x) for x in rej.read_text().splitlines() if x.strip()] if rej.is_file() else []
    return stats


def _clear_output(out: Path) -> None:
    """Remove what a preprocessing run wrote into ``out`` (and nothing else)."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in ("params.json", "manifest.json", "manifest.json.tmp"):
        (out / name).unlink(missing_ok=True)


def _remove_stale_shards(out: Path, n_shards: int) -> list[str]:
    """Delete shard folders beyond this run's ``n_shards`` and half-written ones of killed workers."""
    gone = []
    for d in (out / "shards").iterdir():
        stale = (d.name.startswith(".") and ".tmp-" in d.name) or (d.name.isdigit() and int(d.name) >= n_shards)
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


_WHERE = re.compile(r"^(?:\S+ )?(?:line|row) \d+:? ")


def _nothing_aligned(report: dict[str, Any], input_path: Any, opts: PreprocessOptions) -> str:
    """Why no document was aligned, in one message (the reasons counted, what to change)."""
    if report["input_documents"] == 0:
        return f"{input_path} holds no documents (it is empty or has only blank lines)"
    reasons = Counter(_WHERE.sub("", r["reason"]) for r in report["rejected_documents"])
    top = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(3))
    msg = f"no document was aligned: all {report['input_documents']} documents were rejected ({top})"
    if any("no string field" in r or "has no column" in r for r in reasons):
        keys = _first_fields(input_path)
        hint = f"; the first document has the fields {keys}" if keys else ""
        return f"{msg}{hint}: pass --field with the name of the text field (now --field {opts.field})"
    if any("not a string" in r for r in reasons):
        return f"{msg}: the field {opts.field!r} exists but is not a string; each document's {opts.field!r} must be a JSON string"
    if all("not JSON" in r or "not valid UTF-8" in r for r in reasons):
        return f"{msg}: the input is not JSON Lines (one JSON object per line, UTF-8)"
    return (
        f"{msg}: the tokenizers {opts.student_tokenizer} (student) and {opts.teacher_tokenizer} (teacher) could not "
        "align them (see the reasons in shards/*/rejected.jsonl)"
    )


def _first_fields(input_path: Any) -> list[str] | None:
    """The keys of the input's first JSON object (for the missing-field message)."""
    try:
        f = input_files(input_path)[0]
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(f).schema_arrow.names)
        with open(f, "rb") as fh:
            while line := fh.readline(1 << 20):  # bounded: a huge first line is no hint
                if line.strip():
                    obj = json.loads(line)
                    return sorted(obj) if isinstance(obj, dict) else None
    except Exception:  # noqa: BLE001 — only a hint
        return None
    return None


def preprocess(
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    opts: PreprocessOptions,
    *,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize and align every document of ``input_path`` into ``output_dir``; return the report.

    Resumes a run on the same output when the input's content and the settings are the same (see
    the module doc); ``overwrite=True`` deletes that run's files first.  Raises
    :class:`XTokenError` when no document is aligned.
    """
    if opts.shard_size < 1:
        raise XTokenError(f"shard_size must be >= 1, got {opts.shard_size}")
    if workers < 1:
        raise XTokenError(f"--workers must be >= 1, got {workers}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise XTokenError(f"--output {out} is a file: pass a folder (it is created if missing)")
    identity = input_identity(input_path)  # also: the input exists and holds .jsonl/.parquet files
    params = _params(opts, str(input_path))
    params["input_identity"] = identity
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear_output(out)
    pfile = out / "params.json"
    if pfile.is_file():
        old = json.loads(pfile.read_text())
        fixed = ("input", "input_identity", "student_tokenizer", "teacher_tokenizer")
        legacy = {"max_document_bytes": MAX_DOCUMENT_BYTES}  # settings added later: a run without them used the default
        diff = sorted(k for k in params if k not in fixed and old.get(k, legacy.get(k)) != params[k])
        if diff:
            raise XTokenError(
                f"{out} holds a preprocessing run with other settings ({', '.join(diff)} differ): "
                "use another --output folder, or --overwrite to start over (deletes its shards)"
            )
        why = _identity_difference(old.get("input_identity"), identity)
        if why is not None:
            raise XTokenError(
                f"{out} holds a preprocessing run of another input ({old.get('input')}): {why}. Its shards belong to "
                "that input: use another --output folder, or --overwrite to start over (deletes its shards)"
            )
    elif (out / "shards").is_dir() and any((out / "shards").iterdir()):
        raise XTokenError(
            f"{out} has shards but no params.json: it was not written by `xtoken preprocess` (or was damaged); "
            "use another --output folder, or --overwrite to start over (deletes its shards)"
        )
    pfile.write_text(json.dumps(params, indent=2))  # the same content: record where the input is now
    (out / "shards").mkdir(exist_ok=True)

    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    skipped = 0

    def jobs() -> Iterator[tuple[int, str, list]]:
        buf: list = []
        shard = 0
        rows = (iter_chat_rows(input_path, opts.max_document_bytes) if opts.chat
                else iter_documents(input_path, opts.field, opts.max_document_bytes))
        for doc in rows:
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
                ctx.set_forkserver_preload(["nemo_xtoken.data.preprocess"])
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
    if opts.chat:
        keys += ("loss_tokens", "assistant_tokens", "assistant_tokens_in_kd_chunks")
    totals = {k: sum(s[k] for s in shards) for k in keys}
    rejected = [r for s in shards for r in s["rejected_list"]]
    stale = _remove_stale_shards(out, len(shards))
    report = {
        **totals,
        "shards": len(shards),
        "shards_skipped": skipped,
        "stale_shards_removed": stale,
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
    if totals["documents"] == 0:
        raise XTokenError(_nothing_aligned(report, input_path, opts))
    return report


def format_report(r: dict[str, Any]) -> str:
    """The final report as text."""
    lines = [
        f"documents: {r['documents']} aligned of {r['input_documents']} read ({r['rejected']} rejected) "
        f"in {r['shards']} shards ({r['shards_skipped']} already done), {r['seconds']:.2f} s, {r['workers']} worker(s)",
        f"tokens: student {r['student_tokens']}, teacher {r['teacher_tokens']}; chunks {r['chunks']}",
        f"one-sided tokens: student {r['one_sided_student_tokens']}, teacher {r['one_sided_teacher_tokens']}",
    ]
    if "assistant_tokens" in r:
        frac = r["assistant_tokens_in_kd_chunks"] / r["assistant_tokens"] if r["assistant_tokens"] else 0.0
        lines.append(f"chat: {r['loss_tokens']} loss-bearing student tokens; assistant tokens in aligned (KD) chunks "
                     f"{r['assistant_tokens_in_kd_chunks']}/{r['assistant_tokens']} ({frac:.1%})")
    for x in r["rejected_documents"][:20]:
        lines.append(f"  rejected document {x['index']}: {x['reason']}")
    if r["rejected"] > 20:
        lines.append(f"  … {r['rejected'] - 20} more (see shards/*/rejected.jsonl)")
    return "\n".join(lines)
