"""The data pipeline: corpus readers, documents, lock-step packing of student and teachers, batches.

Below ``offline`` and ``integration``, above ``align`` (docs/design.md#layers):

* :mod:`~nemo_xtoken.data.corpus`: input files (``.jsonl``/``.parquet``), their documents through a bounded
  reader, conversations, the ``xtoken preprocess`` output reader (:class:`~nemo_xtoken.data.corpus.PreprocessedCorpus`);
* :mod:`~nemo_xtoken.data.preprocess`: ``xtoken preprocess`` (both tokenizations and the alignment of every
  document, on disk, in shards);
* :mod:`~nemo_xtoken.data.documents`: documents and document sources (texts aligned in memory, preprocessed
  folders, several teachers, several sources); :mod:`~nemo_xtoken.data.chat`: conversations as documents;
* :mod:`~nemo_xtoken.data.packing`: cut points, lock-step packing, the dual-tokenized dataset;
* :mod:`~nemo_xtoken.data.batch`: collation, the flattened chunk positions, attention inputs of packed samples.

A run config's ``data:`` section becomes a dataset in :mod:`nemo_xtoken.integration.data`.
``PreprocessedCorpus`` and ``PreprocessOptions`` are importable from here (loaded on first use).
"""

from typing import Any

__all__ = ["PreprocessedCorpus", "PreprocessOptions"]


def __getattr__(name: str) -> Any:
    if name == "PreprocessedCorpus":
        from nemo_xtoken.data.corpus import PreprocessedCorpus

        return PreprocessedCorpus
    if name == "PreprocessOptions":
        from nemo_xtoken.data.preprocess import PreprocessOptions

        return PreprocessOptions
    raise AttributeError(f"module 'nemo_xtoken.data' has no attribute {name!r}")
