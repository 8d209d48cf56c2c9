"""The teacher cache: a teacher's top-k next-token distribution at every teacher position of a corpus, on disk.

``xtoken cache-teacher`` (:func:`build_cache`) runs a Hugging Face causal LM over the *teacher side*
of a dual-tokenized corpus (an ``xtoken preprocess`` folder, or raw jsonl/parquet preprocessed on
the way into ``CACHE/corpus``) and stores, per teacher position ``j`` of every document, the
distribution of token ``j + 1``: its top-k ids and log-probabilities, the actual next token when it
is outside the top-k, and the exact log-mass of everything else (see
:mod:`nemo_xtoken.losses.sparse` for how losses use it).

Layout (numpy ``.npy``, memory-mappable, no pickle)::

    CACHE/params.json              teacher fingerprint, k, dtypes, window, corpus identity: a rerun must match
    CACHE/teacher_tokenizer/       the teacher's tokenizer as loaded (tokenizer.json): build W with it
    CACHE/corpus/                  the preprocessed corpus, when the input was raw text
    CACHE/shards/00000/            one folder per corpus shard (same documents), renamed into place
        ids.npy            uint16|int32 [T, k+1]   token ids (uint16 when the vocabulary fits)
        log_probs.npy      float32|float16 [T, k+1] log-probabilities, top-k by decreasing probability, then the extra entry
        rest_log_mass.npy  float32 [T]             log of the probability of all other tokens (-inf: none)
        DONE.json                                   statistics and the corpus shard's sha256 (written last)
    CACHE/manifest.json            shards, totals, bytes per token

Row ``j`` of a shard belongs to teacher token ``j`` of the corpus shard's concatenated teacher ids
(document ``d`` = rows ``teacher_offsets[d] … teacher_offsets[d+1]-1``).  A document longer than
the window (``max_length``) is run in consecutive windows, each from a fresh context.  The cached
teacher sees the document from its start (or its window's), so a live teacher run on a dataset
piece that starts inside a document conditions on less context; on pieces that start a document
and fit one window the two see the same tokens.

Resumable like ``xtoken preprocess``: a shard is written under a temporary name and renamed when
complete; a rerun skips shards whose ``DONE.json`` matches the corpus shard, refuses other settings
(``params.json``) and refuses a corpus shard that changed since it was cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["CacheOptions", "build_cache", "TeacherCache", "corpus_shard_sha256", "format_report", "FORMAT"]

FORMAT = "nemo_xtoken.teacher_cache/1"
_ARRAYS = ("ids", "log_probs", "rest_log_mass")
STORE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class CacheOptions:
    """How the cache is built; everything here is recorded in ``params.json``."""

    top_k: int = 32
    batch_size: int = 8  # sequences (windows) per forward
    device: str = "cpu"
    dtype: str = "fp32"  # the teacher's forward dtype: fp32 | bf16 | fp16
    store_dtype: str = "fp32"  # log-probabilities on disk: fp32 | fp16
    max_length: int | None = None  # window in teacher tokens (None: the model's maximum positions, at most 4096)
    keep_next_token: bool = True  # store the actual next token when outside the top-k (exact chain merge)
    shard_size: int = 1000  # documents per shard when raw text is preprocessed on the way


def corpus_shard_sha256(shard: dict[str, np.ndarray]) -> str:
    """sha256 of a preprocessed shard's teacher ids and document offsets (what the cache rows depend on)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(shard["teacher_offsets"], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(shard["teacher_ids"], dtype=np.int64).tobytes())
    return h.hexdigest()


# ---- building ---------------------------------------------------------------------------------------


def _windows(offsets: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` of the shard's concatenated teacher ids: each document cut into windows."""
    out = []
    for d in range(len(offsets) - 1):
        a, b = int(offsets[d]), int(offsets[d + 1])
        for s in range(a, b, max_length):
            out.append((s, min(s + max_length, b)))
    return out


def _next_tokens(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per token of the shard, the next token of its document (-1 at a document's last token)."""
    nxt = np.full(ids.shape[0], -1, dtype=np.int64)
    if ids.shape[0]:
        nxt[:-1] = ids[1:]
        ends = np.asarray(offsets[1:], dtype=np.int64) - 1
        nxt[ends[ends >= 0]] = -1
    return nxt


@torch.no_grad()
def _cache_shard(teacher: Any, ids: np.ndarray, offsets: np.ndarray, opts: CacheOptions, max_length: int, vocab: int, bar: Any = None) -> dict[str, np.ndarray]:
    """Run the teacher over one corpus shard; return the three arrays."""
    from nemo_xtoken.losses.sparse import sparse_from_logits

    n = int(ids.shape[0])
    k1 = min(opts.top_k + (1 if opts.keep_next_token else 0), vocab)
    id_dtype = np.uint16 if vocab <= 65536 else np.int32
    out_ids = np.zeros((n, k1), dtype=id_dtype)
    out_lp = np.zeros((n, k1), dtype=STORE_DTYPES[opts.store_dtype])
    out_rest = np.zeros(n, dtype=np.float32)
    nxt = _next_tokens(ids, offsets)
    wins = sorted(_windows(offsets, max_length), key=lambda w: (w[0] - w[1], w[0]))  # longest first: little padding
    model, dev = teacher.model, torch.device(teacher.device)
    for i in range(0, len(wins), opts.batch_size):
        batch = wins[i : i + opts.batch_size]
        width = max(b - a for a, b in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (a, b) in enumerate(batch):
            x[r, : b - a] = torch.from_numpy(np.asarray(ids[a:b], dtype=np.int64))
            mask[r, : b - a] = 1
        logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev)).logits
        if logits.shape[-1] < vocab:
            raise XTokenError(
                f"the teacher model has {logits.shape[-1]} output columns but its tokenizer has {vocab} ids: "
                "the model and the tokenizer do not belong together"
            )
        for r, (a, b) in enumerate(batch):
            tg = torch.from_numpy(nxt[a:b]) if opts.keep_next_token else None
            st = sparse_from_logits(logits[r, : b - a], opts.top_k, vocab_size=vocab, targets=tg)
            out_ids[a:b] = st.ids.cpu().numpy().astype(id_dtype)
            out_lp[a:b] = st.log_probs.float().cpu().numpy().astype(out_lp.dtype)
            out_rest[a:b] = st.rest_log_mass.float().cpu().numpy()
            if bar is not None:
                bar.update(b - a)
        del logits
    return {"ids": out_ids, "log_probs": out_lp, "rest_log_mass": out_rest}


def _write_shard(out: Path, shard: int, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
    final = out / "shards" / f"{shard:05d}"
    tmp = out / "shards" / f".{shard:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v, allow_pickle=False)
    (tmp / "DONE.json").write_text(json.dumps(stats))
    shutil.rmtree(final, ignore_errors=True)  # a stale folder without DONE.json
    os.rename(tmp, final)


def _resolve_corpus(input_path: Path, out: Path, teacher: Any, student_tokenizer: str | None, workers: int, progress: bool, shard_size: int):
    """The preprocessed corpus to cache: ``input_path`` itself, or raw text preprocessed into ``out/corpus``."""
    from nemo_xtoken.data.corpus import PreprocessedCorpus
    from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess
    from nemo_xtoken.vocab import load_tokenizer

    t_fp = teacher.tokenizer_info.fingerprint

    def check_teacher(corpus: Any, where: Path) -> None:
        have = corpus.params.get("teacher_fingerprint")
        if have != t_fp:
            raise XTokenError(
                f"{where} was preprocessed with teacher tokenizer {corpus.params.get('teacher_tokenizer')} "
                f"(fingerprint {str(have)[:12]}…), but the teacher {teacher.source} uses another tokenizer ({t_fp[:12]}…): "
                f"re-run `xtoken preprocess -t {out / 'teacher_tokenizer'}` on the text, or pass the raw jsonl as --input"
            )

    if input_path.is_dir():
        corpus = PreprocessedCorpus(input_path)
        check_teacher(corpus, input_path)
        if student_tokenizer is not None:
            s_fp = load_tokenizer(student_tokenizer).fingerprint
            if s_fp != corpus.params.get("student_fingerprint"):
                raise XTokenError(
                    f"{input_path} was preprocessed with student tokenizer {corpus.params.get('student_tokenizer')}, "
                    f"not {student_tokenizer} (fingerprints differ): pass the student tokenizer of the corpus, or re-run "
                    "`xtoken preprocess`"
                )
        return corpus, str(input_path.resolve())
    if not input_path.is_file():
        raise XTokenError(f"--input {input_path} does not exist: pass a .jsonl/.parquet file or an `xtoken preprocess` folder")
    if student_tokenizer is None:
        raise XTokenError(
            f"--input {input_path} is raw text: --student-tokenizer is needed to tokenize and align it "
            "(or pass an `xtoken preprocess` folder)"
        )
    opts = PreprocessOptions(
        student_tokenizer=str(student_tokenizer), teacher_tokenizer=str(out / "teacher_tokenizer" / "tokenizer.json"), shard_size=shard_size
    )
    preprocess(input_path, out / "corpus", opts, workers=workers, progress=progress)
    corpus = PreprocessedCorpus(out / "corpus")
    check_teacher(corpus, out / "corpus")
    return corpus, str((out / "corpus").resolve())


def _save_teacher_tokenizer(teacher: Any, out: Path) -> None:
    """Write the teacher's tokenizer into ``out/teacher_tokenizer`` (skipped when the same one is there)."""
    d = out / "teacher_tokenizer"
    fp = teacher.tokenizer_info.fingerprint
    if (d / "tokenizer.json").is_file() and (d / "FINGERPRINT").is_file() and (d / "FINGERPRINT").read_text().strip() == fp:
        return
    tmp = out / ".teacher_tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    teacher.tokenizer.save_pretrained(str(tmp))
    if not (tmp / "tokenizer.json").is_file():
        raise XTokenError(f"the tokenizer of {teacher.source} could not be saved as tokenizer.json (no fast tokenizer)")
    (tmp / "FINGERPRINT").write_text(fp + "\n")
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)


_W: dict[str, Any] = {}


def _init_worker(spec: dict[str, Any]) -> None:
    """Pool initializer: load the teacher once per worker (errors are raised from the first job)."""
    try:
        from nemo_xtoken.offline.hf import load_hf_teacher

        ident = spec["worker_index"].get()
        dev = spec["device"]
        if dev == "cuda":
            dev = f"cuda:{ident % max(torch.cuda.device_count(), 1)}"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec["workers"]))
        _W["teacher"] = load_hf_teacher(spec["model"], gguf_file=spec["gguf"], device=dev, dtype=spec["dtype"], trust_remote_code=spec["trust_remote_code"])
        _W.pop("error", None)
    except Exception as e:  # noqa: BLE001
        _W["error"] = f"{type(e).__name__}: {e}"


def _worker_job(job: tuple) -> tuple[int, dict[str, Any]]:
    shard, out, corpus_path, opts, max_length, vocab, stats = job
    if "error" in _W:
        raise XTokenError(f"cache-teacher worker could not load the teacher: {_W['error']}")
    from nemo_xtoken.data.corpus import PreprocessedCorpus

    corpus = PreprocessedCorpus(corpus_path)
    a = corpus._shards[shard]
    arrays = _cache_shard(_W["teacher"], a["teacher_ids"], a["teacher_offsets"], opts, max_length, vocab)
    _write_shard(Path(out), shard, arrays, stats)
    return shard, stats


def build_cache(
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    opts: CacheOptions,
    *,
    hf_model: str | None = None,
    gguf_file: str | None = None,
    teacher: Any = None,
    student_tokenizer: str | None = None,
    workers: int = 1,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Cache a teacher's top-k distributions over a corpus into ``output_dir``; return the report.

    The teacher is ``teacher`` (a :class:`~nemo_xtoken.offline.hf.LoadedTeacher`, already loaded)
    or loaded from ``hf_model`` (+ ``gguf_file``).  ``input_path``: an ``xtoken preprocess`` folder
    made with this teacher's tokenizer, or a jsonl/parquet file (then ``student_tokenizer`` is
    needed and the corpus is preprocessed into ``output_dir/corpus``).  ``workers > 1`` runs
    shards in parallel processes, each loading the teacher (one GPU each with ``device="cuda"``).
    """
    from tqdm import tqdm

    from nemo_xtoken.offline.hf import load_hf_teacher

    if opts.top_k < 1:
        raise XTokenError(f"--top-k must be ≥ 1, got {opts.top_k}")
    if opts.batch_size < 1 or workers < 1:
        raise XTokenError(f"--batch-size and --workers must be ≥ 1, got {opts.batch_size} and {workers}")
    if opts.store_dtype not in STORE_DTYPES:
        raise XTokenError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {opts.store_dtype!r}")
    if teacher is None:
        if hf_model is None:
            raise XTokenError("cache-teacher needs --hf-model (a Hugging Face folder or cached hub name)")
        teacher = load_hf_teacher(hf_model, gguf_file=gguf_file, device=opts.device, dtype=opts.dtype, trust_remote_code=trust_remote_code)
    elif teacher.dtype != opts.dtype or str(teacher.device) != str(opts.device):
        raise XTokenError(f"the loaded teacher runs in {teacher.dtype} on {teacher.device}, the options say {opts.dtype} on {opts.device}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = teacher.vocab_size
    if teacher.logits_width < vocab:
        raise XTokenError(
            f"{teacher.source}: the model has {teacher.logits_width} output columns but its tokenizer has {vocab} ids: "
            "the model and the tokenizer do not belong together"
        )
    max_pos = int(getattr(teacher.model.config, "max_position_embeddings", 0) or 4096)
    max_length = int(opts.max_length) if opts.max_length else min(max_pos, 4096)
    if max_length < 1 or max_length > max_pos:
        raise XTokenError(f"--max-length {max_length} must be in [1, {max_pos}] (the teacher's maximum positions)")
    _save_teacher_tokenizer(teacher, out)
    corpus, corpus_path = _resolve_corpus(Path(input_path), out, teacher, student_tokenizer, workers, progress, opts.shard_size)
    params = {
        "format": FORMAT,
        "teacher": teacher.source,
        **teacher.fingerprint(),
        "vocab_size": vocab,
        "logits_width": teacher.logits_width,
        **{k: v for k, v in asdict(opts).items() if k not in ("batch_size", "device", "shard_size")},
        "max_length": max_length,
        "entries": min(opts.top_k + (1 if opts.keep_next_token else 0), vocab),
        "corpus": corpus_path,
        "corpus_student_fingerprint": corpus.params.get("student_fingerprint"),
        "corpus_teacher_fingerprint": corpus.params.get("teacher_fingerprint"),
    }
    pfile = out / "params.json"
    if pfile.is_file():
        old = json.loads(pfile.read_text())
        diff = sorted(k for k in params if k not in ("teacher", "corpus") and old.get(k) != params[k])
        if diff:
            raise XTokenError(
                f"{out} holds a teacher cache with other settings ({', '.join(f'{k}: {old.get(k)!r} → {params[k]!r}' for k in diff[:4])}): "
                "use a new --output folder or delete this one"
            )
    else:
        pfile.write_text(json.dumps(params, indent=2))
    (out / "shards").mkdir(exist_ok=True)

    t0 = time.perf_counter()
    todo, results, skipped = [], {}, 0
    total_tokens = 0
    for s_meta, arrs in zip(corpus.manifest["shards"], corpus._shards):
        shard = int(s_meta["shard"])
        sha = corpus_shard_sha256(arrs)
        n_tok = int(arrs["teacher_ids"].shape[0])
        total_tokens += n_tok
        stats = {"shard": shard, "documents": int(s_meta["documents"]), "tokens": n_tok, "corpus_sha256": sha}
        done = out / "shards" / f"{shard:05d}" / "DONE.json"
        if done.is_file():
            old = json.loads(done.read_text())
            if old.get("corpus_sha256") != sha:
                raise XTokenError(
                    f"{out}: shard {shard} was cached from other text (the corpus {corpus_path} changed since): "
                    "use a new --output folder, or delete the cache and build it again"
                )
            results[shard] = old
            skipped += 1
            continue
        todo.append((shard, stats))
    if total_tokens == 0:
        raise XTokenError(f"the corpus {corpus_path} has no teacher tokens (no document was accepted): nothing to cache")
    bar = tqdm(total=total_tokens, desc="cache-teacher", unit="tok", disable=not progress, file=sys.stderr)
    bar.update(sum(results[s]["tokens"] for s in results))
    try:
        if workers == 1 or len(todo) <= 1:
            for shard, stats in todo:
                a = corpus._shards[shard]
                arrays = _cache_shard(teacher, a["teacher_ids"], a["teacher_offsets"], opts, max_length, vocab, bar)
                _write_shard(out, shard, arrays, stats)
                results[shard] = stats
        else:
            import multiprocessing as mp

            if hf_model is None:
                raise XTokenError("workers > 1 load the teacher in every worker: pass hf_model (and gguf_file), not a loaded teacher")
            ctx = mp.get_context("spawn")  # never fork a process whose torch threads already run
            with ctx.Manager() as manager:
                counter = manager.Queue()
                for i in range(workers):
                    counter.put(i)
                spec = {"model": hf_model, "gguf": gguf_file, "device": opts.device, "dtype": opts.dtype,
                        "trust_remote_code": trust_remote_code, "workers": workers, "worker_index": counter}
                jobs = [(shard, str(out), corpus_path, opts, max_length, vocab, stats) for shard, stats in todo]
                with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(spec,)) as pool:
                    for shard, stats in pool.imap_unordered(_worker_job, jobs):
                        results[shard] = stats
                        bar.update(stats["tokens"])
    finally:
        bar.close()
    shards = [results[k] for k in sorted(results)]
    entries = params["entries"]
    id_bytes = 2 if vocab <= 65536 else 4
    lp_bytes = np.dtype(STORE_DTYPES[opts.store_dtype]).itemsize
    bpt = entries * (id_bytes + lp_bytes) + 4
    totals = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    manifest = {"format": FORMAT, "params": params, "shards": shards, "totals": totals, "bytes_per_token": bpt}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    secs = time.perf_counter() - t0
    new_tokens = sum(s["tokens"] for _, s in todo)
    return {
        **totals,
        "shards": len(shards),
        "shards_skipped": skipped,
        "entries_per_token": entries,
        "bytes_per_token": bpt,
        "bytes": bpt * totals["tokens"],
        "seconds": round(secs, 3),
        "tokens_per_second": round(new_tokens / secs, 1) if secs > 0 and new_tokens else None,
        "workers": workers,
        "output": str(out),
    }


def format_report(r: dict[str, Any]) -> str:
    """The report of :func:`build_cache` as text."""
    tps = f", {r['tokens_per_second']} tokens/s" if r.get("tokens_per_second") else ""
    return (
        f"cached {r['tokens']} teacher positions of {r['documents']} documents in {r['shards']} shards "
        f"({r['shards_skipped']} already done), {r['seconds']:.2f} s{tps}, {r['workers']} worker(s)\n"
        f"{r['entries_per_token']} entries per position, {r['bytes_per_token']} bytes per position "
        f"({r['bytes'] / 1e6:.2f} MB) in {r['output']}"
    )


# ---- reading ----------------------------------------------------------------------------------------


class TeacherCache:
    """Read a folder written by :func:`build_cache` (memory-mapped).

    ``cache.rows(doc, a, b)`` gives the sparse rows of teacher positions ``a … b-1`` of document
    ``doc`` (numbered as in the cached corpus); :meth:`check_corpus` refuses a corpus other than
    the one cached.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from nemo_xtoken.data.corpus import load_shard, read_manifest

        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, "xtoken cache-teacher", "rebuild the cache")
        self.params = self.manifest["params"]
        self._shards: list[dict[str, np.ndarray]] = []
        counts = []
        for s in self.manifest["shards"]:
            d = self.path / "shards" / f"{s['shard']:05d}"
            arrs = load_shard(d, _ARRAYS, "cache shard", "xtoken cache-teacher")
            if arrs["ids"].shape != (s["tokens"], self.entries) or arrs["rest_log_mass"].shape != (s["tokens"],):
                raise XTokenError(f"cache shard {d} does not match manifest.json ({s['tokens']} positions × {self.entries}): rebuild it")
            self._shards.append(arrs)
            counts.append(s["documents"])
        self._doc_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets: list[np.ndarray] | None = None

    @property
    def vocab_size(self) -> int:
        """The teacher tokenizer's ids."""
        return int(self.params["vocab_size"])

    @property
    def entries(self) -> int:
        """Stored entries per position (top-k, plus one for the next token when kept)."""
        return int(self.params["entries"])

    @property
    def top_k(self) -> int:
        return int(self.params["top_k"])

    @property
    def tokenizer_path(self) -> Path:
        """The teacher tokenizer (``tokenizer.json``) the cache was built with."""
        return self.path / "teacher_tokenizer" / "tokenizer.json"

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.params["tokenizer_fingerprint"])

    @property
    def corpus_path(self) -> Path:
        """The preprocessed corpus the cache covers."""
        return Path(self.params["corpus"])

    @property
    def bytes_per_token(self) -> int:
        return int(self.manifest["bytes_per_token"])

    def __len__(self) -> int:
        """Documents."""
        return int(self._doc_starts[-1])

    def check_corpus(self, corpus: Any, *, verify_hash: bool = True) -> None:
        """Refuse a :class:`~nemo_xtoken.data.corpus.PreprocessedCorpus` other than the cached one."""
        shards = self.manifest["shards"]
        if len(corpus._shards) != len(shards):
            raise XTokenError(
                f"the teacher cache {self.path} covers {len(shards)} corpus shards, the corpus {corpus.path} has "
                f"{len(corpus._shards)}: it was built for another corpus; run `xtoken cache-teacher` on this one"
            )
        offsets = []
        for s, arrs in zip(shards, corpus._shards):
            n_tok = int(arrs["teacher_ids"].shape[0])
            docs = int(arrs["teacher_offsets"].shape[0] - 1)
            if n_tok != s["tokens"] or docs != s["documents"] or (verify_hash and corpus_shard_sha256(arrs) != s["corpus_sha256"]):
                raise XTokenError(
                    f"the teacher cache {self.path} was built from other text than {corpus.path} (shard {s['shard']}: "
                    f"{docs} documents / {n_tok} teacher tokens, cached {s['documents']} / {s['tokens']}): the corpus changed; "
                    "rebuild the cache with `xtoken cache-teacher`"
                )
            offsets.append(np.asarray(arrs["teacher_offsets"], dtype=np.int64))
        self._offsets = offsets

    def attach(self, corpus: Any) -> "TeacherCache":
        """Check ``corpus`` (:meth:`check_corpus`) and use its document offsets; returns ``self``."""
        self.check_corpus(corpus)
        return self

    def rows(self, doc: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [n, k+1] int64, log_probs [n, k+1] float32, rest_log_mass [n] float32)`` of teacher positions
        ``start … end-1`` of document ``doc`` (needs :meth:`attach`)."""
        if self._offsets is None:
            raise XTokenError("TeacherCache.rows needs the corpus's document offsets: call cache.attach(corpus) first")
        n = len(self)
        if not 0 <= doc < n:
            raise IndexError(f"document {doc} out of range (cache of {n} documents)")
        k = int(np.searchsorted(self._doc_starts, doc, "right") - 1)
        j = doc - int(self._doc_starts[k])
        base = int(self._offsets[k][j])
        length = int(self._offsets[k][j + 1]) - base
        if not 0 <= start <= end <= length:
            raise IndexError(f"teacher positions [{start}, {end}) outside document {doc} ({length} teacher tokens)")
        a = self._shards[k]
        return (
            np.array(a["ids"][base + start : base + end], dtype=np.int64),
            np.array(a["log_probs"][base + start : base + end], dtype=np.float32),
            np.array(a["rest_log_mass"][base + start : base + end], dtype=np.float32),
        )

    def views(self, doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document ``doc``'s rows as memory-mapped views (stored dtypes, nothing read): ids, log-probs, rest."""
        if self._offsets is None:
            raise XTokenError("TeacherCache.views needs the corpus's document offsets: call cache.attach(corpus) first")
        if not 0 <= doc < len(self):
            raise IndexError(f"document {doc} out of range (cache of {len(self)} documents)")
        k = int(np.searchsorted(self._doc_starts, doc, "right") - 1)
        j = doc - int(self._doc_starts[k])
        b0, b1 = int(self._offsets[k][j]), int(self._offsets[k][j + 1])
        a = self._shards[k]
        return a["ids"][b0:b1], a["log_probs"][b0:b1], a["rest_log_mass"][b0:b1]

    def sparse(self, doc: int, start: int, end: int) -> Any:
        """The rows of :meth:`rows` as a :class:`~nemo_xtoken.losses.sparse.SparseTeacher`."""
        from nemo_xtoken.losses.sparse import SparseTeacher

        ids, lp, rest = self.rows(doc, start, end)
        return SparseTeacher(torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(rest), self.vocab_size)

    def iter_documents(self) -> Iterator[int]:
        return iter(range(len(self)))
