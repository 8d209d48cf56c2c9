"""A run config's ``data:`` section → the run's dataset, and ``xtoken distill --check``'s data check.

The data pipeline itself lives in :mod:`nemo_xtoken.data` (documents and corpus readers, lock-step
packing, collation); this module only reads the config: which paths, which format, which teachers
carry a side of their own, which of them are cached (:func:`cached_teacher_source`), and builds the
:class:`~nemo_xtoken.data.packing.DualTokenizedDataset` at the configured lengths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nemo_xtoken.data.documents import (
    ConcatDocuments,
    DocumentSource,
    MultiTeacherDocuments,
    PreprocessedDocuments,
    TextDocuments,
    as_document,
    document_lengths,
)
from nemo_xtoken.data.packing import DualTokenizedDataset, PackingStats
from nemo_xtoken.errors import XTokenError

__all__ = ["config_documents", "dataset_from_config", "check_data", "format_data_check", "cached_teacher_source"]



# ---- from a run config: the training data and its check ----------------------------------------------


def _resolve_path(path: str, base_dir: str | Path | None) -> Path:
    """A ``data.paths`` entry: relative to the config's folder only (:func:`~nemo_xtoken.integration.config.resolve_input`)."""
    from nemo_xtoken.integration.config import resolve_input

    return Path(resolve_input(path, base_dir, "data.paths"))


def _teacher_plan(cfg: Any) -> tuple[list[int], list[str]]:
    """Config indices of the teachers the documents carry (the cross-tokenizer ones) and their batch-key suffixes.

    Same-tokenizer teachers (loss ``kl``) read the student's ids and need no side of their own; with
    only such teachers the first one's tokenizer gives the (identity) alignment.
    """
    cross = [m for m, t in enumerate(cfg.teachers) if t.loss != "kl"] or [0]
    return cross, [""] + [f"@{m}" for m in cross[1:]]


class _Head:
    """The first ``n`` documents of a source (``xtoken distill --check``)."""

    def __init__(self, source: DocumentSource, n: int) -> None:
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        s, t = document_lengths(self.source)
        return s[: self.n], t[:, : self.n]


def config_documents(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, limit: int | None = None) -> DocumentSource:
    """The documents of a run config's ``data`` section, with one side per cross-tokenizer teacher.

    ``data.format: jsonl|parquet``: every path (a file or a folder of them) is read and aligned in
    memory with each teacher's tokenizer.  ``preprocessed``: every path is an ``xtoken preprocess``
    folder; each is matched to the teachers by its recorded teacher tokenizer (one folder per teacher
    tokenizer, or several folders of consecutive parts per teacher, in ``data.paths`` order), and its
    student tokenizer must be the run's.  A cached teacher (``teachers.N.cache``) reads its cache's
    corpus with the cached rows as fields (:func:`cached_teacher_source`:
    the folder of ``data.paths`` made with its tokenizer, or the input the cache was built from, must
    be the cached text).  ``limit``: the first documents only.
    """
    from nemo_xtoken.integration.config import ConfigError

    d = cfg.data
    if not d.paths:
        raise ConfigError("data.paths is empty: give .jsonl/.parquet files or folders, or `xtoken preprocess` output folders")
    paths = [_resolve_path(p, base_dir) for p in d.paths]
    for p in paths:
        if not p.exists():
            raise ConfigError(f"data.paths: {p} does not exist (relative paths resolve against the config's folder)")
    cross, _ = _teacher_plan(cfg)
    names = [cfg.teachers[m].name for m in cross]
    t_toks = [resources.teacher_tokenizers[n] for n in names]
    caches = {i: resources.caches[n] for i, n in enumerate(names) if n in (getattr(resources, "caches", None) or {})}
    if d.format == "chat":  # conversations: each side renders them with its own chat template (docs/chat.md)
        from nemo_xtoken.data.chat import ChatDocuments

        if caches:
            raise ConfigError(
                f"teachers {[names[i] for i in caches]}: a cached teacher reads `xtoken preprocess --chat` output: preprocess the "
                "conversations with --chat, cache the teacher on that folder, and set data.format: preprocessed"
            )
        for p in paths:
            if p.is_file() and p.suffix not in (".jsonl", ".parquet"):
                raise ConfigError(f"data.paths: {p} is not a .jsonl or .parquet file but data.format is 'chat'")

        def tpl(x: str | None) -> str | None:
            return None if x is None or "{%" in x or "{{" in x else str(_resolve_path(x, base_dir))

        parts, left = [], limit
        for p in paths:
            if left is not None and left <= 0:
                break
            part = ChatDocuments(
                p, resources.student_tokenizer, t_toks if len(t_toks) > 1 else t_toks[0], loss_on=d.chat.loss_on,
                student_template=tpl(cfg.student.chat_template) if cfg.student.chat_template else None,
                teacher_templates=[tpl(cfg.teachers[m].chat_template) if cfg.teachers[m].chat_template else None for m in cross],
                template_kwargs={"enable_thinking": d.chat.enable_thinking}, limit=left,
            )
            parts.append(part)
            left = None if left is None else left - part.rows_read
        docs = ConcatDocuments(parts)
    elif d.format in ("jsonl", "parquet"):
        for p in paths:
            if p.is_file() and p.suffix != f".{d.format}":
                raise ConfigError(f"data.paths: {p} is not a .{d.format} file but data.format is {d.format!r}")
        if caches:  # cached teachers (teachers.N.cache): one source per teacher, a cached one with its rows
            per = [
                cached_teacher_source(caches[i], names[i], data_format=d.format, paths=paths, folders=[], limit=limit) if i in caches
                else ConcatDocuments([TextDocuments(p, resources.student_tokenizer, t_toks[i], text_key=d.text_key, limit=limit) for p in paths])
                for i in range(len(cross))
            ]
            docs: DocumentSource = per[0] if len(per) == 1 else MultiTeacherDocuments(per)
        else:
            parts, left = [], limit
            for p in paths:
                if left is not None and left <= 0:
                    break
                part = TextDocuments(p, resources.student_tokenizer, t_toks if len(t_toks) > 1 else t_toks[0], text_key=d.text_key, limit=left)
                parts.append(part)
                left = None if left is None else left - len(part)
            docs = ConcatDocuments(parts)
    else:
        groups: dict[int, list[PreprocessedDocuments]] = {i: [] for i in range(len(cross))}
        s_fp = resources.student_tokenizer.fingerprint
        for p in paths:
            if not (p / "manifest.json").is_file():
                raise ConfigError(
                    f"data.paths: {p} is not a finished `xtoken preprocess` output (no manifest.json) but data.format is "
                    "'preprocessed': run `xtoken preprocess --output` into it, or set data.format: jsonl/parquet"
                )
            pre = PreprocessedDocuments(p)
            if pre.params.get("student_fingerprint") != s_fp:
                raise ConfigError(
                    f"data.paths: {p} was preprocessed with student tokenizer {pre.params.get('student_tokenizer')}, not the run's "
                    f"{cfg.student.tokenizer} (fingerprints differ): preprocess again with -s {cfg.student.tokenizer}"
                )
            owners = [i for i, tok in enumerate(t_toks) if tok.fingerprint == pre.params.get("teacher_fingerprint")]
            if not owners:
                raise ConfigError(
                    f"data.paths: {p} was preprocessed with teacher tokenizer {pre.params.get('teacher_tokenizer')}, which is "
                    f"none of the run's cross-tokenizer teachers' ({', '.join(f'{n}: {cfg.teachers[m].tokenizer}' for n, m in zip(names, cross))})"
                )
            for i in owners:
                groups[i].append(pre)
        missing = [names[i] for i, g in groups.items() if not g and i not in caches]  # a cached teacher: its cache's corpus
        if missing:
            raise ConfigError(
                f"data.paths has no `xtoken preprocess` folder for teacher(s) {missing}: preprocess the same input with "
                "each teacher's tokenizer (-t) and list every folder in data.paths"
            )
        sources = [g[0] if len(g) == 1 else ConcatDocuments(g) for i, g in groups.items() if i not in caches]
        if caches:  # cached teachers (teachers.N.cache): their corpus with the cached rows, in teacher order
            for i in sorted(caches):
                sources.insert(i, cached_teacher_source(caches[i], names[i], data_format=d.format, paths=paths, folders=groups[i]))
        docs = sources[0] if len(sources) == 1 else MultiTeacherDocuments(sources)
    if limit is not None:
        docs = _Head(docs, limit)
    if len(docs) == 0:
        raise XTokenError(f"data.paths {[str(p) for p in paths]} hold no documents")
    return docs


def dataset_from_config(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, limit: int | None = None) -> DualTokenizedDataset:
    """The :class:`DualTokenizedDataset` of a run config (lengths, packing, seed, teacher keys from ``cfg``)."""
    cross, keys = _teacher_plan(cfg)
    docs = config_documents(cfg, resources, base_dir=base_dir, limit=limit)
    return DualTokenizedDataset(
        docs, seq_length=cfg.student.seq_length, teacher_seq_length=[cfg.teacher_seq_length(cfg.teachers[m]) for m in cross],
        seed=cfg.data.seed, on_too_long=cfg.data.on_too_long, packing=cfg.data.packing, teacher_keys=keys,
    )


def check_data(cfg: Any, resources: Any, *, base_dir: str | Path | None = None, max_documents: int = 200) -> dict[str, Any]:
    """What ``xtoken distill --check`` says about the data: it reads, aligns and packs at the configured lengths.

    Reads the first ``max_documents`` documents of ``data.paths`` (every path must exist; the format
    must read), builds the run's dataset over them (raising as training would: a unit between cut
    points longer than a budget, a teacher side too long with ``on_too_long: error``) and reports
    tokens per side, the one-sided token fraction per teacher (tokens in chunks the other side lacks:
    they take no part in KD) and the packing: loss-bearing fraction, teacher fill, documents split.
    """
    from nemo_xtoken.integration.config import ConfigError

    for p in cfg.data.paths:
        if not _resolve_path(p, base_dir).exists():
            raise ConfigError(f"data.paths: {_resolve_path(p, base_dir)} does not exist")
    ds = dataset_from_config(cfg, resources, base_dir=base_dir, limit=max_documents)
    cross, _ = _teacher_plan(cfg)
    docs = ds.documents
    n = len(docs)
    s_tok = 0
    per = [{"teacher": cfg.teachers[m].name, "teacher_tokens": 0, "one_sided_student_tokens": 0, "one_sided_teacher_tokens": 0} for m in cross]
    for i in range(n):
        doc = as_document(docs[i], i)
        s_tok += int(doc.student_ids.shape[0])
        for r, tv in zip(per, doc.teachers):
            a = tv.alignment
            one = a.one_sided()
            r["teacher_tokens"] += int(tv.ids.shape[0])
            r["one_sided_student_tokens"] += int((a.student_chunks[one, 1] - a.student_chunks[one, 0]).sum())
            r["one_sided_teacher_tokens"] += int((a.teacher_chunks[one, 1] - a.teacher_chunks[one, 0]).sum())
    st = ds.packing_stats()
    warnings = []
    for m, (r, fill) in enumerate(zip(per, st.teacher_fill)):
        r["one_sided_fraction"] = (r["one_sided_student_tokens"] + r["one_sided_teacher_tokens"]) / max(s_tok + r["teacher_tokens"], 1)
        r["tokens_per_student_token"] = r["teacher_tokens"] / max(s_tok, 1)
        r["seq_length"] = ds.teacher_seq_lengths[m]
        r["fill"] = fill
        if ds.packing and st.samples > 1 and st.loss_fraction < 0.95 and fill > 0.97:
            need = int(np.ceil(r["tokens_per_student_token"] * ds.seq_length * 1.05 / 64) * 64)
            warnings.append(
                f"teacher {r['teacher']}: its seq_length {ds.teacher_seq_lengths[m]} is what limits the samples (it has "
                f"{r['tokens_per_student_token']:.3f} tokens per student token here; loss-bearing fraction {st.loss_fraction:.3f}): "
                f"raise teachers.{cross[m]}.seq_length to about {need}"
            )
    chat = _chat_check(docs, per, ds, st) if cfg.data.format in ("chat", "preprocessed") else None
    if chat is not None:
        warnings += chat.pop("warnings")
    if not ds.packing and st.loss_fraction < 0.5 and chat is None:
        warnings.append(f"without packing only {st.loss_fraction:.1%} of the student positions carry a loss: set data.packing: true")
    return {
        "documents_checked": n,
        "student_tokens": s_tok,
        "seq_length": ds.seq_length,
        "packing": ds.packing,
        "samples": st.samples,
        "loss_fraction": st.loss_fraction,
        "split_documents": st.split_documents,
        "teachers": per,
        "warnings": warnings,
        **({"chat": chat} if chat is not None else {}),
    }


def _chat_check(docs: Any, per: list[dict[str, Any]], ds: DualTokenizedDataset, st: PackingStats) -> dict[str, Any] | None:
    """The chat part of the data check: loss-bearing fraction, skipped rows, per teacher the assistant tokens in KD chunks
    and one rendered example per side with its loss mask (None: the documents are no conversations)."""
    from nemo_xtoken.align.chat import masked_text
    from nemo_xtoken.data.chat import chat_sources

    n = len(docs)
    loss = 0
    have_mask = False
    for i in range(n):
        d = as_document(docs[i], i)
        if d.student_loss_mask is not None:
            have_mask = True
            loss += int(np.asarray(d.student_loss_mask[1:]).sum())
    if not have_mask:
        return None
    srcs = chat_sources(docs)
    out: dict[str, Any] = {
        "loss_tokens": loss,
        "loss_fraction": loss / max(st.samples * ds.seq_length, 1),
        "rows_read": sum(s.rows_read for s in srcs),
        "rows_skipped": sum(len(s.skipped) for s in srcs),
        "skipped": [r for s in srcs for _, r in s.skipped][:5],
        "warnings": sorted(set(w for s in srcs for w in s.warnings))[:3],
    }
    for m, r in enumerate(per):
        got = sum(s.coverage[m][0] for s in srcs)
        tot = sum(s.coverage[m][1] for s in srcs)
        r["assistant_tokens_in_kd_chunks"] = got / tot if tot else None
        ex = next((s.examples[m] for s in srcs if s.examples[m] is not None), None)
        if ex is not None:
            r["example"] = {"student": masked_text(ex.student), "teacher": masked_text(ex.teacher)}
    return out


def format_data_check(r: dict[str, Any]) -> str:
    """:func:`check_data`'s report as lines of text."""
    lines = [
        f"data: {r['documents_checked']} documents checked, {r['student_tokens']} student tokens; "
        f"{'packed' if r['packing'] else 'unpacked'} at seq_length {r['seq_length']}: {r['samples']} samples, "
        + (f"positions filled {r['loss_fraction']:.3f} (loss-bearing: below)" if r.get("chat") else f"loss-bearing fraction {r['loss_fraction']:.3f}")
        + f", {r['split_documents']} documents split",
    ]
    for t in r["teachers"]:
        lines.append(
            f"data: teacher {t['teacher']}: {t['teacher_tokens']} tokens ({t['tokens_per_student_token']:.3f} per student token), "
            f"seq_length {t['seq_length']} filled {t['fill']:.3f}; one-sided tokens {t['one_sided_fraction']:.2%} "
            f"(student {t['one_sided_student_tokens']}, teacher {t['one_sided_teacher_tokens']})"
        )
    c = r.get("chat")
    if c is not None:
        lines.append(
            f"data: chat: {c['rows_read']} conversation rows read, {c['rows_skipped']} skipped; loss-bearing (assistant) "
            f"fraction of the student positions {c['loss_fraction']:.3f}"
        )
        lines += [f"data: chat: skipped {x}" for x in c["skipped"]]
        for t in r["teachers"]:
            if t.get("assistant_tokens_in_kd_chunks") is not None:
                lines.append(f"data: chat: teacher {t['teacher']}: {t['assistant_tokens_in_kd_chunks']:.1%} of the assistant tokens in aligned (KD) chunks")
            if "example" in t:
                lines.append(f"data: chat: teacher {t['teacher']}: first conversation, loss-bearing tokens between ⟦ ⟧:")
                lines.append("--- student ---\n" + t["example"]["student"])
                lines.append("--- teacher ---\n" + t["example"]["teacher"])
    lines += [f"data: warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def cached_teacher_source(
    cache: Any, name: str, *, data_format: str, paths: list[Any], folders: list[Any], limit: int | None = None
) -> Any:
    """A cached teacher's document source for a run config's data (``teachers.N.cache``).

    ``data_format: preprocessed``: ``folders`` are the ``data.paths`` folders made with this
    teacher's tokenizer; the one given must be the cached corpus (checked by content hash), none means
    the cache's own corpus.  ``jsonl``/``parquet``: ``data.paths`` must be the one input the cache's
    corpus was preprocessed from (same content), and the rows come with that corpus.  ``limit``: the
    first documents only (``xtoken distill --check``).
    """
    from nemo_xtoken.integration.config import ConfigError
    from nemo_xtoken.offline.teachers import CachedTeacherDocuments

    if data_format == "preprocessed":
        if len(folders) > 1:
            raise ConfigError(
                f"teachers ({name}) is cached: its cache covers one preprocessed corpus, but data.paths has {len(folders)} "
                f"folders with its tokenizer ({[str(getattr(f, 'corpus', f).path) for f in folders]}): list only the cached one"
            )
        try:
            src = CachedTeacherDocuments(cache, folders[0].corpus.path if folders else None)
        except XTokenError as e:
            raise ConfigError(f"teachers ({name}): {e}") from None
    else:
        from nemo_xtoken.data.corpus import _identity_difference, input_identity

        src = CachedTeacherDocuments(cache)  # the cache's own corpus (checked against the cache)
        corpus_params = src.params
        if len(paths) != 1:
            raise ConfigError(
                f"teachers ({name}) is cached: data.paths must be the one input its cache was built from "
                f"({corpus_params.get('input')}), got {len(paths)} paths"
            )
        old = corpus_params.get("input_identity")
        why = _identity_difference(old, input_identity(paths[0])) if old else (
            None if corpus_params.get("input") == str(Path(paths[0]).resolve()) else "another path"
        )
        if why is not None:
            raise ConfigError(
                f"teachers ({name}): the cache {cache.path} was built from {corpus_params.get('input')}, but data.paths is "
                f"{paths[0]} ({why}): train on the cached text (or its `xtoken preprocess` folder), or cache this input"
            )
    return _Head(src, limit) if limit is not None else src
