"""Hugging Face hub access of a run: which hub ids the config names, whether they are in the local cache.

Compute nodes usually cannot reach the hub (and Llama-3.2 is gated), so the launchers run every rank
with ``HF_HUB_OFFLINE=1`` and a mounted cache (``HF_HOME``; :func:`launch_env`).  Everything a run
reads by hub id — each model's ``config.json`` and weights (``AutoBridge.from_hf_pretrained`` on every
rank), each tokenizer given as a hub name, and Bridge's own tokenizer (the student model's) — must
then be in that cache.  :func:`check_hub_cache` says which are not, before any rank starts, without
touching the network (so an offline machine answers at once instead of retrying for tens of seconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_xtoken.errors import XTokenError

__all__ = [
    "hub_offline",
    "hub_cache_dir",
    "hub_reachable",
    "MissingHubFile",
    "hub_inputs",
    "missing_from_cache",
    "check_hub_cache",
    "launch_env",
]

_FALSY = ("0", "false", "no", "off")


def hub_offline(env: dict[str, str] | None = None) -> bool | None:
    """``HF_HUB_OFFLINE`` as set: True (offline), False (explicitly online), None (unset)."""
    v = (os.environ if env is None else env).get("HF_HUB_OFFLINE")
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() not in _FALSY


def hub_cache_dir(env: dict[str, str] | None = None) -> Path:
    """The hub cache this process reads: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    e = os.environ if env is None else env
    if e.get("HF_HUB_CACHE"):
        return Path(e["HF_HUB_CACHE"]).expanduser()
    home = e.get("HF_HOME") or os.path.join(e.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a TCP connection to the hub (``HF_ENDPOINT`` or huggingface.co) within ``timeout`` s?"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class MissingHubFile:
    """A hub id the run needs and the files of it that the local cache lacks."""

    key: str  # config key, e.g. "student.model"
    repo: str
    missing: list[str]


def hub_inputs(cfg: Any, base_dir: str | Path | None) -> list[tuple[str, str, str]]:
    """``(key, hub id, kind)`` for every model (``model``) and tokenizer (``tokenizer``) the config names by hub id."""
    from nemo_xtoken.integration.config import looks_like_hub_id, resolve_input

    out = []
    # kinds: "tokenizer"; "model" (config.json + weights); "config" (a Megatron checkpoint gives the weights);
    # the student's model also serves Bridge's tokenizer (TokenizerConfig.tokenizer_model): "+tokenizer"
    student_kind = ("config" if cfg.student.checkpoint else "model") + "+tokenizer"
    entries = [("student.tokenizer", cfg.student.tokenizer, "tokenizer"), ("student.model", cfg.student.model, student_kind)]
    for i, t in enumerate(cfg.teachers):
        if t.tokenizer:
            entries.append((f"teachers.{i}.tokenizer", t.tokenizer, "tokenizer"))
        if t.cache is None and t.model:
            entries.append((f"teachers.{i}.model", t.model, "config" if t.checkpoint else "model"))
    for key, value, kind in entries:
        if not value:
            continue
        where = resolve_input(value, base_dir, key, hub_ok=True) if base_dir is not None else value
        if where == value and looks_like_hub_id(value) and not Path(value).exists():
            out.append((key, value, kind))
    return out


def _cached(repo: str, filename: str, cache: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
    except Exception:  # a malformed id: not cached
        return None
    return hit if isinstance(hit, str) and os.path.isfile(hit) else None


def _missing_files(repo: str, kind: str, cache: Path) -> list[str]:
    if kind == "tokenizer":
        return [] if _cached(repo, "tokenizer.json", cache) else ["tokenizer.json"]
    missing = [] if _cached(repo, "config.json", cache) else ["config.json"]
    if kind.endswith("+tokenizer") and not (_cached(repo, "tokenizer.json", cache) or _cached(repo, "tokenizer_config.json", cache)):
        missing.append("tokenizer.json (Bridge's tokenizer)")
    if kind.startswith("config"):
        return missing
    index = _cached(repo, "model.safetensors.index.json", cache)
    if index is not None:
        try:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            shards = ["model.safetensors.index.json (unreadable)"]
        missing += [s for s in shards if not _cached(repo, s, cache)]
    elif not _cached(repo, "model.safetensors", cache):
        missing.append("weights (model.safetensors or model.safetensors.index.json)")
    return missing


def missing_from_cache(cfg: Any, base_dir: str | Path | None, *, cache: Path | None = None) -> list[MissingHubFile]:
    """Every hub id of the config whose files (model: config + weights; tokenizer: tokenizer.json) are not in ``cache``."""
    cache = cache or hub_cache_dir()
    out = []
    for key, repo, kind in hub_inputs(cfg, base_dir):
        miss = _missing_files(repo, kind, cache)
        if miss:
            out.append(MissingHubFile(key, repo, miss))
    return out


def check_hub_cache(cfg: Any, base_dir: str | Path | None) -> list[MissingHubFile]:
    """Refuse a run whose hub ids are not cached here when the hub cannot be used; returns what is missing.

    Offline (``HF_HUB_OFFLINE`` set or unset: the launchers set it for every rank): anything missing
    is an error naming each key, hub id and file, with the download command.  ``HF_HUB_OFFLINE=0``:
    allowed when the hub answers within 3 s, otherwise the same error with the offline hint.
    """
    from nemo_xtoken.integration.config import ConfigError

    cache = hub_cache_dir()
    missing = missing_from_cache(cfg, base_dir, cache=cache)
    if not missing:
        return []
    offline = hub_offline()
    if offline is False and hub_reachable():
        return missing
    listing = "; ".join(f"{m.key}={m.repo} lacks {', '.join(m.missing)}" for m in missing)
    repos = " ".join(sorted({m.repo for m in missing}))
    why = (
        "the hub is not reachable from here within 3 s" if offline is False else
        "HF_HUB_OFFLINE=1" if offline else
        "HF_HUB_OFFLINE is unset here, but the launchers run every rank with HF_HUB_OFFLINE=1 (compute nodes rarely reach the hub)"
    )
    raise ConfigError(
        f"not in the local Hugging Face cache {cache} ({why}): {listing}. Download them into the cache the job mounts "
        f"(`HF_HOME=<shared>/hf hf download <id>` for each of {repos}; gated models such as Llama-3.2 need "
        "HF_TOKEN) and launch with --hf-home <shared>/hf, or give local folders; HF_HUB_OFFLINE=0 lets a machine that "
        "reaches the hub download them instead"
    )


def launch_env(hf_home: str | None, *, slurm: bool, env: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Environment and container mounts that give every rank the Hugging Face cache, offline.

    ``HF_HUB_OFFLINE=1`` always (no rank waits on hub retries; ``--env HF_HUB_OFFLINE=0`` undoes it);
    with ``hf_home`` (on Slurm: an absolute folder on a file system the nodes mount): ``HF_HOME``, and
    on Slurm a container mount of it at the same path.  ``HF_TOKEN`` (gated models such as Llama-3.2)
    passes through: locally its value when set here; on Slurm as ``${HF_TOKEN:-}``, read from the
    environment the job runs in, so the token is never written into the sbatch script.  ``env``
    (the user's ``--env``) wins.
    """
    out = {"HF_HUB_OFFLINE": "1"}
    mounts = []
    if hf_home:
        if slurm and not os.path.isabs(hf_home):
            raise XTokenError(f"--hf-home {hf_home}: give the absolute path of the cache on the cluster's shared file system")
        out["HF_HOME"] = hf_home if slurm else os.path.abspath(os.path.expanduser(hf_home))
        if slurm:
            mounts.append(f"{hf_home}:{hf_home}")
    if slurm:
        out["HF_TOKEN"] = "${HF_TOKEN:-}"
    elif os.environ.get("HF_TOKEN"):
        out["HF_TOKEN"] = os.environ["HF_TOKEN"]
    out.update(env or {})
    return out, mounts
