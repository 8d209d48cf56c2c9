"""The CLI contract of build-projection, audit and inspect, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nemo_xtoken.cli.main import main


@pytest.fixture(scope="module")
def w_qwen3_file(tmp_path_factory, w_llama3_qwen3):
    path = tmp_path_factory.mktemp("w") / "llama3_qwen3.safetensors"
    w_llama3_qwen3.save(path)
    return path


def test_build_projection_writes_a_loadable_file(tmp_path, llama3_path, o200k_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["build-projection", "--student-tokenizer", llama3_path, "--teacher-tokenizer", o200k_path, "--output", str(out)]) == 0
    msg = capsys.readouterr().out
    assert "wrote" in msg and "321 empty" in msg
    assert out.stat().st_size > 1_000_000


def test_audit_json_contract(w_qwen3_file, llama3_path, qwen3_path, capsys):
    assert main(["audit", "--projection", str(w_qwen3_file), "--student-tokenizer", llama3_path,
                 "--teacher-tokenizer", qwen3_path, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["categories"]["two_digit_numerals"] == {"total": 100, "exact": 0, "mapped": 100, "empty": 0}
    assert rep["categories"]["three_digit_numerals"]["total"] == 1000
    assert rep["recommended_loss"] == "p_kl"
    assert isinstance(rep["empty_rows"], int) and rep["empty_rows"] > 0


def test_audit_table(w_qwen3_file, llama3_path, qwen3_path, capsys):
    assert main(["audit", "-p", str(w_qwen3_file), "-s", llama3_path, "-t", qwen3_path]) == 0
    out = capsys.readouterr().out
    assert "*two_digit_numerals" in out and "recommended loss: p_kl" in out


def test_inspect_json_contract(w_qwen3_file, llama3_path, qwen3_path, capsys):
    assert main(["inspect", "-p", str(w_qwen3_file), "-s", llama3_path, "-t", qwen3_path, "--token", "201", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["student_token"] == "201" and isinstance(got["student_id"], int)
    assert [(r["teacher_token"], round(r["weight"], 4)) for r in got["row"]] == [("2", 0.9009), ("0", 0.0901), ("1", 0.009)]
    assert all(isinstance(r["teacher_id"], int) for r in got["row"])


def test_inspect_unknown_token_is_a_clear_error(w_qwen3_file, llama3_path, qwen3_path, capsys):
    assert main(["inspect", "-p", str(w_qwen3_file), "-s", llama3_path, "-t", qwen3_path, "--token", "no such token!!"]) == 2
    err = capsys.readouterr().err
    assert "no token of" in err and "'no such token!!'" in err


@pytest.mark.parametrize(
    "case",
    ["missing_tokenizer", "not_a_tokenizer", "truncated_w", "foreign_w", "w_for_other_tokenizers", "empty_vocab"],
)
def test_bad_input_exits_nonzero_with_one_line_and_no_traceback(case, tmp_path, w_qwen3_file, llama3_path, o200k_path):
    w = str(w_qwen3_file)
    if case == "missing_tokenizer":
        argv = ["build-projection", "-s", str(tmp_path / "nope.json"), "-t", llama3_path, "-o", str(tmp_path / "w")]
        needle = "nope.json"
    elif case == "not_a_tokenizer":
        bad = tmp_path / "config.json"
        bad.write_text('{"architectures": ["LlamaForCausalLM"]}')
        argv = ["build-projection", "-s", str(bad), "-t", llama3_path, "-o", str(tmp_path / "w")]
        needle = "not a tokenizer"
    elif case == "truncated_w":
        t = tmp_path / "t.safetensors"
        t.write_bytes(w_qwen3_file.read_bytes()[:1000])
        argv = ["audit", "-p", str(t), "-s", llama3_path, "-t", llama3_path]
        needle = "t.safetensors"
    elif case == "foreign_w":
        f = tmp_path / "model.safetensors"
        from safetensors.numpy import save_file
        import numpy as np

        save_file({"w": np.ones(3, np.float32)}, str(f))
        argv = ["audit", "-p", str(f), "-s", llama3_path, "-t", llama3_path]
        needle = "not an nemo_xtoken projection"
    elif case == "w_for_other_tokenizers":
        argv = ["audit", "-p", w, "-s", llama3_path, "-t", o200k_path]
        needle = "another teacher tokenizer"
    else:
        e = tmp_path / "empty.json"
        e.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": []}))
        argv = ["build-projection", "-s", str(e), "-t", llama3_path, "-o", str(tmp_path / "w")]
        needle = "empty vocabulary"
    proc = subprocess.run([sys.executable, "-m", "nemo_xtoken.cli.main", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
