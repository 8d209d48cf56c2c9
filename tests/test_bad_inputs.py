"""The bad-input table (issue 23): every wrong input a new user tried, one row each.

Each row runs one command as a user types it and asserts its exit code and a distinctive piece of
its one-line message (on stderr, or the report for inputs that are rejected and counted while the
run goes on).  Commands run in-process (``xtoken``'s ``main``, the launch examples' ``main``): the
same code as the console script, without an interpreter start per row.  Interrupting
``xtoken preprocess`` (Ctrl-C, kill -9) needs a real process: those run as subprocesses.

Real tokenizers (the asset cache), a real W (``w_llama3_qwen3``), real text; nothing is mocked.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from nemo_xtoken.data.corpus import iter_documents
from nemo_xtoken.cli.main import main as xtoken

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "llama32_1b__qwen3_4b_pkl.yaml"
IMAGE = "registry.example.com/me/nemo-xtoken:26.08.01"
GOOD = ["It is a truth universally acknowledged.", "In 1776 the thirteen colonies declared independence."]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def f(tmp_path_factory, llama3_path, qwen3_path, w_llama3_qwen3) -> dict[str, str]:
    """The inputs of the table, written once: tokenizers, W files, corpora, configs, folders."""
    d = tmp_path_factory.mktemp("bad")
    w = w_llama3_qwen3.save(d / "W.safetensors")
    raw = w.read_bytes()
    (d / "W_truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "empty_tokenizer.json").write_bytes(b"")
    (d / "not_a_tokenizer.json").write_text('{"version": "1.0", "vocab": ["a", "b"]}')
    (d / "tokenizer.json.gz").write_bytes(gzip.compress(Path(llama3_path).read_bytes()[:4096]))
    good = [json.dumps({"text": t}) for t in GOOD]
    _jsonl(d / "good.jsonl", good)
    (d / "empty.jsonl").write_bytes(b"")
    (d / "corpus.jsonl.gz").write_bytes(gzip.compress((d / "good.jsonl").read_bytes()))
    _jsonl(d / "body.jsonl", [json.dumps({"body": t}) for t in GOOD])
    _jsonl(d / "number.jsonl", [json.dumps({"text": 123}), json.dumps({"text": 4.5})])
    _jsonl(d / "number_mixed.jsonl", [good[0], json.dumps({"text": 123})])
    _jsonl(d / "surrogate.jsonl", [good[0], '{"text": "a lone \\ud800 surrogate"}', good[1]])
    (d / "not_utf8.jsonl").write_bytes(good[0].encode() + b"\n" + b'{"text": "caf\xe9"}\n' + good[1].encode() + b"\n")
    _jsonl(d / "huge.jsonl", [good[0], json.dumps({"text": "word " * 20_000}), good[1]])
    chat = [json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": t}]}) for t in GOOD]
    _jsonl(d / "chat_surrogate.jsonl", [chat[0], '{"messages": [{"role": "user", "content": "a lone \\ud800"}]}', chat[1]])
    _jsonl(d / "chat_huge.jsonl", [chat[0], json.dumps({"messages": [{"role": "user", "content": "word " * 20_000}]}), chat[1]])
    (d / "no_data_files").mkdir()
    (d / "no_data_files" / "notes.txt").write_text("not data")
    (d / "a_folder").mkdir()
    unfinished = d / "unfinished"  # what a killed `xtoken preprocess` leaves before its first run ends
    (unfinished / "shards" / "00000").mkdir(parents=True)
    (d / "broken.yaml").write_text("student:\n  tokenizer: [llama3, qwen3\nteachers: []\n")
    from tests.bridge_tiny import write_tiny  # --check reads every model's config; no hub here

    models = {k: str(write_tiny(k, d / "models" / k, seed=0, with_tokenizer=False)) for k in ("llama", "qwen3")}
    return {"dir": str(d), "ML": models["llama"], "MQ": models["qwen3"], "L": llama3_path, "Q": qwen3_path, "W": str(w), **{p.stem.replace(".", "_"): str(p) for p in d.iterdir()}}


def _local(f: dict[str, str]) -> list[str]:
    """Overrides pointing the shipped config at the local tokenizers, W and tiny models of its architectures (no model hub here)."""
    return [f"student.tokenizer={f['L']}", f"teachers.0.tokenizer={f['Q']}", f"teachers.0.projection={f['W']}",
            f"student.model={f['ML']}", f"teachers.0.model={f['MQ']}"]


def _example(name: str) -> Callable[[list[str]], int]:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.main


@dataclass(frozen=True)
class Case:
    id: str
    tool: str  # "xtoken", or an example launcher "launch_slurm" / "launch_local"
    argv: Callable[[dict[str, str]], list[str]]
    rc: int
    message: str  # a distinctive piece of the one line (stderr; the report when rc == 0)


def _pre(*extra: str) -> Callable[[dict[str, str]], list[str]]:
    return lambda f: ["preprocess", "-s", f["L"], "-t", f["Q"], *[a.format(**f) for a in extra]]


def _check(*extra: str, resources: bool = True) -> Callable[[dict[str, str]], list[str]]:
    def argv(f: dict[str, str]) -> list[str]:
        return ["distill", "--config", str(CONF), "--check", *([] if resources else ["--no-resources"]), *_local(f),
                *[a.format(**f) for a in extra]]
    return argv


def _slurm(*extra: str, image: str = IMAGE) -> Callable[[dict[str, str]], list[str]]:
    return lambda f: ["--config", str(CONF), "--account", "acct", "--container-image", image, "--dry-run", *extra]


CASES = [
    # ---- tokenizers and W (xtoken build-projection / audit) ----
    Case("tokenizer-missing", "xtoken", lambda f: ["build-projection", "-s", f["dir"] + "/nope.json", "-t", f["Q"], "-o", f["dir"] + "/x.safetensors"], 2,
         "nope.json does not exist: pass a tokenizer.json file"),
    Case("tokenizer-not-a-tokenizer", "xtoken", lambda f: ["build-projection", "-s", f["not_a_tokenizer"], "-t", f["Q"], "-o", f["dir"] + "/x.safetensors"], 2,
         "not_a_tokenizer.json is JSON but not a tokenizer"),
    Case("tokenizer-gzip", "xtoken", lambda f: ["build-projection", "-s", f["tokenizer_json"], "-t", f["Q"], "-o", f["dir"] + "/x.safetensors"], 2,
         "tokenizer.json.gz is not a JSON file"),
    Case("tokenizer-empty", "xtoken", lambda f: ["build-projection", "-s", f["empty_tokenizer"], "-t", f["Q"], "-o", f["dir"] + "/x.safetensors"], 2,
         "empty_tokenizer.json is not a JSON file"),
    Case("output-is-a-folder", "xtoken", lambda f: ["build-projection", "-s", f["L"], "-t", f["Q"], "-o", f["a_folder"]], 2,
         "a_folder is an existing folder, but W is written to one file: pass a file name"),
    Case("w-missing", "xtoken", lambda f: ["audit", "-p", f["dir"] + "/nope.safetensors", "-s", f["L"], "-t", f["Q"]], 2,
         "nope.safetensors does not exist: build it with `xtoken build-projection`"),
    Case("w-truncated", "xtoken", lambda f: ["audit", "-p", f["W_truncated"], "-s", f["L"], "-t", f["Q"]], 2,
         "W_truncated.safetensors is not a readable safetensors file"),
    Case("w-swapped", "xtoken", lambda f: ["audit", "-p", f["W"], "-s", f["Q"], "-t", f["L"]], 2,
         "was built for another student tokenizer"),
    # ---- corpora (xtoken preprocess) ----
    Case("input-missing", "xtoken", _pre("--input", "{dir}/nope.jsonl", "--output", "{dir}/o_missing"), 2,
         "nope.jsonl does not exist: pass a .jsonl or .parquet file"),
    Case("input-folder-without-data", "xtoken", _pre("--input", "{no_data_files}", "--output", "{dir}/o_nodata"), 2,
         "is a folder without .jsonl or .parquet files (it holds ['notes.txt'])"),
    Case("input-empty", "xtoken", _pre("--input", "{empty}", "--output", "{dir}/o_empty"), 2,
         "empty.jsonl holds no documents (it is empty or has only blank lines)"),
    Case("input-gzip", "xtoken", _pre("--input", "{corpus_jsonl}", "--output", "{dir}/o_gz"), 2,
         "corpus.jsonl.gz is gzip-compressed: decompress it first"),
    Case("input-wrong-field", "xtoken", _pre("--input", "{body}", "--output", "{dir}/o_body"), 2,
         "the first document has the fields ['body']: pass --field with the name of the text field (now --field text)"),
    Case("text-is-a-number", "xtoken", _pre("--input", "{number}", "--output", "{dir}/o_number"), 2,
         "the field 'text' exists but is not a string; each document's 'text' must be a JSON string"),
    Case("text-is-a-number-one-document", "xtoken", _pre("--input", "{number_mixed}", "--output", "{dir}/o_number1"), 0,
         "rejected document 1: line 2: field 'text' is a number, not a string"),
    Case("lone-surrogate", "xtoken", _pre("--input", "{surrogate}", "--output", "{dir}/o_surrogate"), 0,
         "rejected document 1: line 2: 'text' holds a lone surrogate (\\ud800 at character 7)"),
    Case("not-utf8", "xtoken", _pre("--input", "{not_utf8}", "--output", "{dir}/o_utf8"), 0,
         "rejected document 1: line 2 is not valid UTF-8 (byte 0xe9 at offset 13)"),
    Case("document-over-the-cap", "xtoken", _pre("--input", "{huge}", "--output", "{dir}/o_huge", "--max-document-bytes", "65536"), 0,
         "rejected document 1: line 2 is 100012 bytes, over the 65536-byte document cap"),
    Case("chat-lone-surrogate", "xtoken", _pre("--chat", "--input", "{chat_surrogate}", "--output", "{dir}/o_chat_surrogate"), 0,
         "rejected document 1: line 2 holds a lone surrogate, which is not valid Unicode text"),
    Case("chat-row-over-the-cap", "xtoken", _pre("--chat", "--input", "{chat_huge}", "--output", "{dir}/o_chat_huge", "--max-document-bytes", "65536"), 0,
         "rejected document 1: line 2 is 100047 bytes, over the 65536-byte document cap"),
    Case("output-unfinished-without-params", "xtoken", _pre("--input", "{good}", "--output", "{unfinished}"), 2,
         "has shards but no params.json: it was not written by `xtoken preprocess`"),
    # ---- run configs (xtoken distill --check) ----
    Case("config-missing", "xtoken", lambda f: ["distill", "--config", f["dir"] + "/nope.yaml", "--check"], 2,
         "nope.yaml does not exist (see conf/ for examples)"),
    Case("config-broken-yaml", "xtoken", lambda f: ["distill", "--config", f["broken"], "--check"], 2,
         "broken.yaml is not valid YAML: line 3, column 9: expected ',' or ']', but got ':' (while parsing a flow sequence started at line 2, column 14)"),
    Case("override-broken-yaml", "xtoken", _check("student.seq_length=[1", resources=False), 2,
         "value is not valid YAML (line 1, column 3:"),
    Case("key-typo", "xtoken", _check("train.train_iter=5", resources=False), 2,
         "unknown key 'train.train_iter'"),
    Case("wrong-type", "xtoken", _check("train.train_iters=many", resources=False), 2,
         "train.train_iters must be an integer, got 'many'"),
    Case("cached-teacher-tokenizer-null", "xtoken", _check("teachers.0.cache={dir}", "teachers.0.tokenizer=null", "teachers.0.model=null", resources=False), 0,
         '"teacher": "qwen3_4b"'),
    Case("cache-missing", "xtoken", _check("teachers.0.cache={dir}/no_cache", "teachers.0.model=null", "data.format=jsonl", "data.paths=[{good}]"), 2,
         "teachers.0.cache: {dir}/no_cache does not exist (an absolute path: it must exist on every node that runs the job)"),
    Case("cache-unfinished", "xtoken", _check("teachers.0.cache={a_folder}", "teachers.0.model=null", "data.format=jsonl", "data.paths=[{good}]"), 2,
         "a_folder has no manifest.json: it is not (or not yet completely) an `xtoken cache-teacher` output"),
    Case("data-missing", "xtoken", _check("data.paths=[{dir}/nope.jsonl]"), 2,
         "nope.jsonl does not exist"),
    Case("data-lone-surrogate", "xtoken", _check("data.format=jsonl", "data.paths=[{surrogate}]"), 2,
         "document 1: line 2: 'text' holds a lone surrogate"),
    Case("data-text-is-a-number", "xtoken", _check("data.format=jsonl", "data.paths=[{number_mixed}]"), 2,
         "document 1: line 2: field 'text' is a number, not a string"),
    Case("data-jsonl-read-as-preprocessed", "xtoken", _check("data.paths=[{good}]"), 2,
         "good.jsonl is not a finished `xtoken preprocess` output (no manifest.json) but data.format is 'preprocessed'"),
    Case("data-unfinished-preprocess-folder", "xtoken", _check("data.format=preprocessed", "data.paths=[{unfinished}]"), 2,
         "is not a finished `xtoken preprocess` output (no manifest.json)"),
    # ---- launchers (examples/launch_slurm.py, examples/launch_local.py) ----
    Case("slurm-env-without-equals", "launch_slurm", _slurm("--env", "NOEQUALS"), 2,
         "launch_slurm: error: --env 'NOEQUALS' is not NAME=VALUE"),
    Case("local-env-without-equals", "launch_local", lambda f: ["--config", str(CONF), "--dry-run", "--env", "NOEQUALS"], 2,
         "launch_local: error: --env 'NOEQUALS' is not NAME=VALUE"),
    Case("slurm-time-4h", "launch_slurm", _slurm("--time", "4h"), 2,
         "--time '4h' is not a Slurm time limit: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    Case("slurm-time-minutes-60", "launch_slurm", _slurm("--time", "1-00:60"), 2,
         "--time '1-00:60' is not a Slurm time limit"),
    Case("slurm-stock-nemo-image", "launch_slurm", _slurm(image="nvcr.io/nvidia/nemo:26.08.01"), 2,
         "NVIDIA's NeMo image, which has no nemo_xtoken"),
    Case("slurm-config-missing", "launch_slurm", lambda f: ["--config", f["dir"] + "/nope.yaml", "--account", "a", "--container-image", IMAGE, "--dry-run"], 2,
         "nope.yaml does not exist"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, f, capsys) -> None:
    if case.tool != "xtoken":
        pytest.importorskip("nemo_run")
        run = _example(case.tool)
    else:
        run = xtoken
    rc = run(case.argv(f))
    out, err = capsys.readouterr()
    said = err if case.rc else out + err
    assert rc == case.rc, f"exit {rc}, expected {case.rc}:\n{err[-3000:]}"
    message = case.message.format(**f)  # a row may name the table's folder, {dir}
    assert message in said, f"{message!r} not in:\n{said[-3000:]}"
    if case.rc:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in err, err  # one line, no traceback


def test_valid_slurm_times_are_accepted():
    from nemo_xtoken.integration.launch import check_slurm_time

    for t in ("30", "30:00", "04:00:00", "48:00:00", "2-12", "1-00:00", "1-00:00:00", "UNLIMITED"):
        assert check_slurm_time(t) == t


def test_rejected_documents_are_counted_and_the_good_ones_kept(f, tmp_path, capsys) -> None:
    """The surrogate, non-UTF-8 and oversized documents are rejected like any other: counted, named in
    rejected.jsonl, and the documents around them aligned."""
    for name, extra in (("surrogate", []), ("not_utf8", []), ("huge", ["--max-document-bytes", "65536"])):
        out = tmp_path / name
        assert xtoken(["preprocess", "-s", f["L"], "-t", f["Q"], "--input", f[name], "--output", str(out), "--json", *extra]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["input_documents"], report["documents"], report["rejected"]) == (3, 2, 1), report
        assert json.loads((out / "manifest.json").read_text())["totals"]["rejected"] == 1
        rej = [json.loads(x) for x in (out / "shards" / "00000" / "rejected.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rej] == [1]


def test_cached_teacher_tokenizer_null_means_the_caches(f) -> None:
    from nemo_xtoken.integration.config import load_config

    cfg = load_config(str(CONF), [*_local(f), f"teachers.0.cache={f['dir']}", "teachers.0.tokenizer=null", "teachers.0.model=null"])
    assert cfg.teachers[0].tokenizer == "" and cfg.teachers[0].cache == f["dir"]  # "": the cache's (validate_resources)


def test_huge_line_is_skipped_in_bounded_memory(tmp_path) -> None:
    """A 16 MB line is rejected while memory stays near the cap (64 KiB), not near the line."""
    p = tmp_path / "big.jsonl"
    with open(p, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "short one"}) + "\n")
        fh.write('{"text": "' + "x" * (16 << 20) + '"}\n')
        fh.write(json.dumps({"text": "after it"}) + "\n")
    tracemalloc.start()
    try:
        docs = list(iter_documents(p, "text", max_bytes=64 << 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(i, t) for i, t, _ in docs] == [(0, "short one"), (1, None), (2, "after it")]
    assert "line 2 is 16777228 bytes, over the 65536-byte document cap" in docs[1][2]
    assert peak < 4 << 20, peak  # a few blocks of at most 1 MiB, never the 16 MB line


def test_w_files_follow_the_umask(w_llama3_qwen3, tmp_path) -> None:
    """W files get 0666 less the umask (shared file systems), not mkstemp's private 0600."""
    old = os.umask(0o022)
    try:
        a = w_llama3_qwen3.save(tmp_path / "a.safetensors")
        os.umask(0o002)
        b = w_llama3_qwen3.save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777, b.stat().st_mode & 0o777) == (0o644, 0o664)


# ---- interrupted preprocessing resumes to the same bytes ---------------------------------------------


@pytest.fixture(scope="module")
def sotu_part(tmp_path_factory) -> Path:
    from nemo_xtoken.assets import text_corpus

    lines = open(text_corpus("sotu"), encoding="utf-8").read().splitlines()[:20]
    return _jsonl(tmp_path_factory.mktemp("sotu") / "sotu20.jsonl", lines)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted((d / "shards").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sotu_part, llama3_path, qwen3_path) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert xtoken(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(sotu_part), "--output", str(out),
                   "--shard-size", "1", "--no-progress"]) == 0
    return _tree(out)


@pytest.mark.parametrize("sig, rc, message", [(signal.SIGINT, 130, "interrupted"), (signal.SIGKILL, -signal.SIGKILL, "")],
                         ids=["ctrl-c", "kill-9"])
def test_interrupted_preprocess_resumes_byte_identical(sig, rc, message, tmp_path, sotu_part, reference, llama3_path, qwen3_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemo_xtoken.cli.main", "preprocess", "-s", llama3_path, "-t", qwen3_path,
         "--input", str(sotu_part), "--output", str(out), "--shard-size", "1", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C must reach it even where this test runs with SIGINT ignored (a job started with `&` or nohup, a
        # pytest-xdist worker): an ignored SIGINT is inherited, and the child then finished all 20 shards, rc 0
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (out / "shards" / "00002" / "DONE.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert message in err and "Traceback" not in err, err
    assert not (out / "manifest.json").exists()  # stopped mid-way
    done = len(list((out / "shards").glob("*/DONE.json")))
    assert 3 <= done < 20
    capsys.readouterr()
    assert xtoken(["preprocess", "-s", llama3_path, "-t", qwen3_path, "--input", str(sotu_part), "--output", str(out),
                   "--shard-size", "1", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards_skipped"] == done and report["documents"] + report["rejected"] == 20
    assert _tree(out) == reference  # every shard file, byte for byte; no stale temporary folder left
