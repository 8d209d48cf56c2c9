"""Load a tokenizer from a ``tokenizer.json`` file, a local Hugging Face folder or a cached hub name.

Everything downstream works on a :class:`TokenizerInfo`: the Rust ``tokenizers.Tokenizer``, where it
came from, its parsed JSON (for the decoder family and special tokens) and a content fingerprint.
Loading never reaches the network: hub names resolve from the local Hugging Face cache only.

Loading is cached, so that per-document calls (``align(text, "tokenizer.json", …)``) do the work
that belongs to a tokenizer once: a file by its resolved path, size and modification time (a
rewritten file is loaded again); a ``tokenizers.Tokenizer`` or ``transformers`` tokenizer object by
identity, checked on every call against its current normalizer, pre-tokenizer, decoder,
post-processor, truncation, padding and vocabulary size (an object changed in place is loaded
again).  The caches hold the last few tokenizers (:data:`CACHE_SIZE`); ``clear_cache()`` empties them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nemo_xtoken.errors import TokenizerLoadError

__all__ = ["TokenizerInfo", "load_tokenizer", "TokenizerLike", "clear_cache", "CACHE_SIZE"]


class TokenizerInfo:
    """A tokenizer with its provenance and content fingerprint.

    Built from a file, it keeps the parsed JSON (``spec``) and builds the Rust ``tokenizers.Tokenizer``
    only when something needs to tokenize: computing W's exact-match pass and fingerprints reads the
    vocabulary from the JSON alone, which is what makes a cold build fast.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        source: str = "<tokenizer>",
        config: dict[str, Any] | None = None,
        *,
        spec: dict[str, Any] | None = None,
        raw_json: str | None = None,
    ) -> None:
        if tokenizer is None and raw_json is None:
            raise ValueError("TokenizerInfo needs a tokenizer or its JSON")
        self._tokenizer = tokenizer
        self._raw_json = raw_json
        self._spec = spec
        self.source = source
        self.config = config or {}

    def __repr__(self) -> str:
        return f"TokenizerInfo({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def tokenizer(self) -> Tokenizer:
        """The Rust tokenizer (built on first use)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = Tokenizer.from_str(self._raw_json)  # type: ignore[arg-type]
            except Exception as e:  # tokenizers raises plain Exception subclasses
                raise TokenizerLoadError(
                    f"{self.source} is JSON but not a tokenizer ({str(e).splitlines()[0]}); pass the "
                    "tokenizer.json of a fast (Rust) tokenizer"
                ) from None
            self._raw_json = None
        return self._tokenizer

    @property
    def spec(self) -> dict[str, Any]:
        """The tokenizer's JSON serialization, parsed (model, added tokens, decoder, …)."""
        if self._spec is None:
            self._spec = json.loads(self._tokenizer.to_str() if self._tokenizer is not None else self._raw_json)
        return self._spec

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Model vocabulary (without added tokens): token string → id."""
        model = self.spec.get("model") or {}
        v = model.get("vocab")
        if isinstance(v, dict):
            return v
        if isinstance(v, list):  # Unigram: [[piece, score], ...], id = position
            return {piece[0] if isinstance(piece, list) else piece: i for i, piece in enumerate(v)}
        return {}

    @cached_property
    def added_tokens(self) -> list[dict[str, Any]]:
        return list(self.spec.get("added_tokens") or [])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the model type, vocabulary, merges and added tokens (not of file formatting)."""
        model = self.spec.get("model") or {}
        h = hashlib.sha256()
        h.update(f"type={model.get('type')}\n".encode())
        by_id = sorted(self.vocab.items(), key=itemgetter(1))
        h.update("\n".join([f"{i}\t{tok}" for tok, i in by_id]).encode("utf-8", "surrogatepass"))
        h.update(b"merges\n")
        merges = model.get("merges") or []
        # Older files store merges as "a b", newer as ["a", "b"]: hash one form.
        h.update("\n".join([m if m.__class__ is str else " ".join(m) for m in merges]).encode("utf-8", "surrogatepass"))
        h.update(b"\nadded\n")
        for t in sorted(self.added_tokens, key=lambda t: t["id"]):
            h.update(f"{t['id']}\t{t['content']}\t{bool(t.get('special'))}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @cached_property
    def vocab_size(self) -> int:
        """Number of ids, ``max id + 1``: ids in gaps exist but stand for no string."""
        ids = list(self.vocab.values()) + [t["id"] for t in self.added_tokens]
        return (max(ids) + 1) if ids else 0

    @property
    def name(self) -> str:
        return self.source


TokenizerLike = "str | os.PathLike[str] | TokenizerInfo | Tokenizer | Any"


def _from_file(path: Path, config: dict[str, Any] | None = None) -> TokenizerInfo:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerLoadError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
        spec = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(
            f"{path} is not a JSON file ({e.__class__.__name__}: {e}); pass the tokenizer.json of a "
            "fast (Rust) tokenizer, its Hugging Face folder, or a hub name"
        ) from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or "type" not in model or "vocab" not in model:
        raise TokenizerLoadError(
            f"{path} is JSON but not a tokenizer (no 'model' with a 'type' and a 'vocab'); pass the "
            "tokenizer.json of a fast (Rust) tokenizer"
        )
    if config is None:
        cfg_path = path.with_name("tokenizer_config.json")
        config = _read_config(cfg_path)
    info = TokenizerInfo(None, str(path), config, spec=spec, raw_json=text)
    _check_nonempty(info)
    return info


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _check_nonempty(info: TokenizerInfo) -> None:
    if info.vocab_size == 0:
        raise TokenizerLoadError(f"tokenizer {info.source} has an empty vocabulary: pass a trained tokenizer")


def _from_transformers(name_or_path: str, trust_remote_code: bool, local_only: bool = True) -> TokenizerInfo:
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise TokenizerLoadError(
            f"loading {name_or_path!r} needs `transformers`; install it or pass a tokenizer.json file"
        ) from None
    try:
        hf = AutoTokenizer.from_pretrained(
            name_or_path, use_fast=True, local_files_only=local_only, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise TokenizerLoadError(
            f"cannot load tokenizer {name_or_path!r} offline ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "pass a tokenizer.json file or a local folder, or download it first "
            f"(`hf download {name_or_path}`)"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerLoadError(
            f"tokenizer {name_or_path!r} has no fast (Rust) backend; convert it with transformers "
            "(`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir)`) and pass dir"
        )
    config = {k: getattr(hf, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    info = TokenizerInfo(backend, str(name_or_path), {k: v for k, v in config.items() if v is not None})
    _check_nonempty(info)
    return info


#: How many tokenizers each cache (files, objects) keeps.
CACHE_SIZE = 8
_FILE_CACHE: "OrderedDict[str, tuple[tuple[int, int, int], TokenizerInfo]]" = OrderedDict()
_OBJECT_CACHE: "OrderedDict[int, tuple[Any, tuple, TokenizerInfo]]" = OrderedDict()


def clear_cache() -> None:
    """Forget every cached tokenizer (files and objects)."""
    _FILE_CACHE.clear()
    _OBJECT_CACHE.clear()


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _cached_file(path: Path, config: dict[str, Any] | None = None) -> TokenizerInfo:
    """``_from_file`` cached by resolved path, checked against size, mtime and inode on every call."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        return _from_file(path, config)
    cfg = Path(real).with_name("tokenizer_config.json")
    try:
        cst = os.stat(cfg)
        stamp += (cst.st_size, cst.st_mtime_ns)
    except OSError:
        pass
    hit = _FILE_CACHE.get(real)
    if hit is not None and hit[0] == stamp and config is None:
        _FILE_CACHE.move_to_end(real)
        return hit[1]
    info = _from_file(path, config)
    if config is None:
        _remember(_FILE_CACHE, real, (stamp, info))
    return info


def _object_state(tok: Tokenizer) -> tuple:
    """What can change in a ``tokenizers.Tokenizer`` without a new object (cheap: no vocabulary copy)."""

    def state(component: Any) -> bytes | None:
        return None if component is None else component.__getstate__()

    return (
        state(tok.normalizer), state(tok.pre_tokenizer), state(tok.decoder), state(tok.post_processor),
        repr(tok.truncation), repr(tok.padding), tok.get_vocab_size(with_added_tokens=False),
    )


def _cached_object(obj: Any, tok: Tokenizer, make) -> TokenizerInfo:
    """A ``TokenizerInfo`` for ``tok`` (the backend of ``obj``), cached by identity and checked state."""
    state = _object_state(tok)
    hit = _OBJECT_CACHE.get(id(obj))
    # the cache holds a reference to obj, so its id cannot be reused while the entry lives
    if hit is not None and hit[0] is obj and hit[1] == state and tok.id_to_token(hit[2].vocab_size) is None:
        _OBJECT_CACHE.move_to_end(id(obj))
        return hit[2]
    info = make()
    _remember(_OBJECT_CACHE, id(obj), (obj, state, info))
    return info


def load_tokenizer(spec: Any, *, trust_remote_code: bool = False) -> TokenizerInfo:
    """Load a tokenizer from a ``tokenizer.json`` path, a Hugging Face folder, a cached hub name,
    a ``tokenizers.Tokenizer``, a ``transformers`` fast tokenizer, or return a ``TokenizerInfo`` as is.
    """
    if isinstance(spec, TokenizerInfo):
        return spec
    if isinstance(spec, Tokenizer):
        def make() -> TokenizerInfo:
            info = TokenizerInfo(spec, "<tokenizers.Tokenizer>")
            _check_nonempty(info)
            return info

        return _cached_object(spec, spec, make)
    backend = getattr(spec, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        def make_hf() -> TokenizerInfo:
            config = {k: getattr(spec, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
            info = TokenizerInfo(backend, getattr(spec, "name_or_path", "<transformers tokenizer>") or "<hf>",
                                 {k: v for k, v in config.items() if isinstance(v, str)})
            _check_nonempty(info)
            return info

        return _cached_object(spec, backend, make_hf)
    if not isinstance(spec, (str, os.PathLike)):
        raise TokenizerLoadError(f"cannot load a tokenizer from a {type(spec).__name__}: pass a path or a hub name")
    path = Path(spec).expanduser()
    if path.is_file():
        return _cached_file(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _cached_file(path / "tokenizer.json")
        return _from_transformers(str(path), trust_remote_code)
    text = str(spec)
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") > 1
    if looks_like_path:
        raise TokenizerLoadError(
            f"tokenizer file {text} does not exist: pass a tokenizer.json file, a Hugging Face folder, "
            "or a hub name that is in the local cache"
        )
    # A hub name: resolve from the local cache only (no network).
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(text, "tokenizer.json")
    except Exception:
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        return _cached_file(Path(cached))
    return _from_transformers(text, trust_remote_code)
