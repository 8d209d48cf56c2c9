"""The run config's data: `xtoken distill --check` validates it, the shipped configs run on ordinary text.

Real tokenizers stand in for the configs' hub names (Llama-3 for Llama-3.2, Qwen3, o200k for
Phi-4-mini's vocabulary), real W files, real English text (State of the Union addresses: long
documents, up to ~40k tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nemo_xtoken.integration.config import ConfigError, load_config, validate_resources
from nemo_xtoken.integration.train import main

CONF = Path(__file__).resolve().parents[1] / "conf"
SOTU_DOCS = (0, 60, 120, 180, 220, 226, 228, 229, 230, 231, 232)  # 232: once "more than 4097" teacher tokens


@pytest.fixture(scope="module")
def sotu(tmp_path_factory):
    from nemo_xtoken.assets import text_corpus

    lines = open(text_corpus("sotu")).read().splitlines()
    p = tmp_path_factory.mktemp("text") / "sotu.jsonl"
    p.write_text("\n".join(lines[i] for i in SOTU_DOCS) + "\n")
    return p


@pytest.fixture(scope="module")
def w_files(tmp_path_factory, w_llama3_qwen3, w_llama3_o200k):
    """W files, and tiny random checkpoints of the configs' architectures (Llama, Qwen3, Phi3): ``--check``
    reads every model's Hugging Face config to check Megatron-Bridge support, and no model hub is reachable here."""
    from tests.bridge_tiny import write_tiny

    d = tmp_path_factory.mktemp("w")
    models = {k: str(write_tiny(k, d / k, seed=0, with_tokenizer=False)) for k in ("llama", "qwen3", "phi3")}
    return {"qwen3": str(w_llama3_qwen3.save(d / "q.safetensors")), "o200k": str(w_llama3_o200k.save(d / "o.safetensors")),
            "models": models}


def _local(name: str, llama3_path, qwen3_path, o200k_path, w_files) -> list[str]:
    """Overrides pointing a shipped config at local tokenizers, W files and models of the same architectures (no model hub here)."""
    m = w_files["models"]
    ov = [f"student.tokenizer={llama3_path}", f"student.model={m['llama']}"]
    if "qwen3" in name:
        ov += [f"teachers.0.tokenizer={qwen3_path}", f"teachers.0.projection={w_files['qwen3']}", f"teachers.0.model={m['qwen3']}"]
    else:
        ov += [f"teachers.0.tokenizer={o200k_path}", f"teachers.0.projection={w_files['o200k']}", f"teachers.0.model={m['phi3']}"]
    if "llama32_3b" in name:
        ov += [f"teachers.1.tokenizer={llama3_path}", f"teachers.1.model={m['llama']}"]
    return ov


@pytest.mark.parametrize("name", ["llama32_1b__qwen3_4b_pkl", "llama32_1b__phi4mini_hkl", "llama32_1b__phi4mini_llama32_3b"])
def test_shipped_configs_check_and_pack_ordinary_text(name, sotu, llama3_path, qwen3_path, o200k_path, w_files, capsys):
    ov = _local(name, llama3_path, qwen3_path, o200k_path, w_files) + [f"data.paths=[{sotu}]"]
    rc = main(["--config", str(CONF / f"{name}.yaml"), "--check", *ov])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = re.search(r"data: (\d+) documents checked, (\d+) student tokens; packed at seq_length 4096: (\d+) samples, "
                  r"loss-bearing fraction ([0-9.]+), (\d+) documents split", err)
    assert m, err
    assert int(m.group(1)) == len(SOTU_DOCS) and int(m.group(5)) > 0
    assert float(m.group(4)) >= 0.95, err  # the goal, on the shipped settings
    assert re.search(r"data: teacher \w+: \d+ tokens .* one-sided tokens [0-9.]+%", err), err
    assert "warning" not in err
    # how each teacher's loss crosses the TP ranks (tp 2 in every shipped config), from the run's own criterion
    rows = json.loads(out)["kd_exchange"]
    expected = {"llama32_1b__qwen3_4b_pkl": ["plan"], "llama32_1b__phi4mini_hkl": ["summary"],
                "llama32_1b__phi4mini_llama32_3b": ["summary", "local"]}[name]
    assert [r["exchange"] for r in rows] == expected and all(r["tp"] == 2 for r in rows)
    for r in rows:
        if r["exchange"] == "local":
            assert r["bytes_per_token_per_rank"]["mean"] == 5 * 4 and r["fraction_of_all_gather"] is None  # scalars only
            continue
        assert 0 < r["fraction_of_all_gather"] < 0.2, r
        line = re.search(rf"kd exchange: teacher {r['teacher']} \({r['loss']}, tp 2\): {r['exchange']}.*; ([0-9,]+) bytes per token per rank", err)
        assert line and int(line.group(1).replace(",", "")) == round(r["bytes_per_token_per_rank"]["mean"]), err
    if "summary" in expected:  # Phi-4-mini's output layer: 200,064 columns, read from the model's config
        assert rows[0]["teacher_padded"] == 200064 and rows[0]["summary_bins"] == 2048 and "kd_bound/phi4_mini" in err


def test_check_reports_data_errors(sotu, tmp_path, llama3_path, qwen3_path, o200k_path, w_files, capsys):
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    ov = _local("qwen3", llama3_path, qwen3_path, o200k_path, w_files)
    assert main(["--config", conf, "--check", *ov]) == 2  # the shipped data/train.jsonl is not here
    assert re.search(r"data\.paths: .*data/train\.jsonl does not exist", capsys.readouterr().err)
    assert main(["--config", conf, "--check", *ov, f"data.paths=[{sotu}]", "data.text_key=body"]) == 2
    assert "document 0: line 1 has no string field 'body'" in capsys.readouterr().err
    assert main(["--config", conf, "--check", *ov, f"data.paths=[{sotu}]", "data.format=parquet"]) == 2
    assert "is not a .parquet file but data.format is 'parquet'" in capsys.readouterr().err
    assert main(["--config", conf, "--check", *ov, f"data.paths=[{sotu}]", "data.format=preprocessed"]) == 2
    assert "is not a finished `xtoken preprocess` output" in capsys.readouterr().err
    # without packing, ordinary text mostly pads: the check says so
    assert main(["--config", conf, "--check", *ov, f"data.paths=[{sotu}]", "data.packing=false"]) == 0
    err = capsys.readouterr().err
    assert "unpacked at seq_length 4096" in err
    # a teacher budget too small for its tokens: named, with the length to set
    numerals = tmp_path / "numbers.jsonl"
    numerals.write_text("".join(json.dumps({"text": " ".join(str(1000 + 37 * i + j) for i in range(400))}) + "\n" for j in range(8)))
    assert main(["--config", conf, "--check", *ov, f"data.paths=[{numerals}]", "student.seq_length=512", "teachers.0.seq_length=512"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: teacher qwen3_4b: its seq_length 512 is what limits the samples .* raise teachers\.0\.seq_length to about \d+", err), err


def _two_teacher_cfg(tmp_path, data: dict, llama3_path, qwen3_path, o200k_path, w_files):
    import yaml

    d = {
        "student": {"tokenizer": llama3_path, "seq_length": 256},
        "teachers": [
            {"name": "qwen3", "tokenizer": qwen3_path, "projection": w_files["qwen3"], "loss": "p_kl", "seq_length": 288},
            {"name": "llama", "tokenizer": llama3_path, "loss": "kl", "weight": 0.2},
            {"name": "phi", "tokenizer": o200k_path, "projection": w_files["o200k"], "loss": "h_kl", "seq_length": 272},
        ],
        "train": {"train_iters": 10, "global_batch_size": 4, "micro_batch_size": 1},
        "data": data,
    }
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_two_cross_tokenizer_teachers_from_text_and_from_preprocessed_folders(sotu, tmp_path, llama3_path, qwen3_path, o200k_path, w_files):
    from nemo_xtoken.align.preprocess import PreprocessOptions, preprocess
    from nemo_xtoken.integration import bridge as B
    from nemo_xtoken.integration.data import collate

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(sotu.read_text().splitlines()[:3]) + "\n")
    cfg_text = load_config(_two_teacher_cfg(tmp_path, {"paths": [str(small)]}, llama3_path, qwen3_path, o200k_path, w_files))
    res = validate_resources(cfg_text)
    stream = B.build_dataset(cfg_text, 12, resources=res)
    batch = collate([stream[i] for i in range(3)])
    assert batch["teacher_tokens"].shape == (3, 288) and batch["teacher_tokens@2"].shape == (3, 272)  # teacher 2 = config index
    tbs = B.teacher_batches_from_batch(batch, [t.loss for t in cfg_text.teachers])
    assert torch.equal(tbs[0]["teacher_tokens"], batch["teacher_tokens"]) and torch.equal(tbs[2]["teacher_tokens"], batch["teacher_tokens@2"])
    assert torch.equal(tbs[2]["teacher_segment_ids"], batch["teacher_segment_ids@2"])
    assert torch.equal(tbs[1]["teacher_tokens"], batch["tokens"]) and torch.equal(tbs[1]["teacher_segment_ids"], batch["segment_ids"])
    # the same from one `xtoken preprocess` folder per teacher tokenizer, in any order
    folders = {}
    for name, tok in (("q", qwen3_path), ("o", o200k_path)):
        preprocess(small, tmp_path / name, PreprocessOptions(llama3_path, tok, shard_size=2), progress=False)
        folders[name] = str(tmp_path / name)
    cfg_pre = load_config(_two_teacher_cfg(tmp_path, {"paths": [folders["o"], folders["q"]], "format": "preprocessed"},
                                           llama3_path, qwen3_path, o200k_path, w_files))
    stream2 = B.build_dataset(cfg_pre, 12, resources=res)
    for i in range(6):
        x, y = stream[i], stream2[i]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), i
    # folders that do not fit the run are named
    cfg_one = load_config(_two_teacher_cfg(tmp_path, {"paths": [folders["q"]], "format": "preprocessed"},
                                           llama3_path, qwen3_path, o200k_path, w_files))
    with pytest.raises(ConfigError, match=r"no `xtoken preprocess` folder for teacher\(s\) \['phi'\]"):
        B.build_dataset(cfg_one, 4, resources=res)
    preprocess(small, tmp_path / "swapped", PreprocessOptions(qwen3_path, o200k_path, shard_size=2), progress=False)
    cfg_bad = load_config(_two_teacher_cfg(tmp_path, {"paths": [folders["q"], str(tmp_path / "swapped")], "format": "preprocessed"},
                                           llama3_path, qwen3_path, o200k_path, w_files))
    with pytest.raises(ConfigError, match=r"swapped was preprocessed with student tokenizer .*qwen3.*not the run's"):
        B.build_dataset(cfg_bad, 4, resources=res)


def test_check_without_resources_skips_the_data(capsys):
    assert main(["--config", str(CONF / "llama32_1b__qwen3_4b_pkl.yaml"), "--check", "--no-resources"]) == 0
    assert "data:" not in capsys.readouterr().err
    # the exchange each teacher will use is known from the config alone (no W read: no byte counts)
    for over, exchange in (([], "summary"), (["distill.tp_exchange=exact"], "all-gather"),
                           (["parallel.tensor_model_parallel_size=1"], "all-gather")):
        assert main(["--config", str(CONF / "llama32_1b__phi4mini_hkl.yaml"), "--check", "--no-resources", *over]) == 0
        out, err = capsys.readouterr()
        (row,) = json.loads(out)["kd_exchange"]
        assert row["exchange"] == exchange and "bytes_per_token_per_rank" not in row, over
        assert f"kd exchange: teacher phi4_mini (h_kl, tp {row['tp']}): {exchange}" in err


def test_data_defaults_pack_and_split():
    from nemo_xtoken.integration.config import DataConfig

    d = DataConfig()
    assert d.packing is True and d.on_too_long == "split"
    for name in ("llama32_1b__qwen3_4b_pkl", "llama32_1b__phi4mini_hkl", "llama32_1b__phi4mini_llama32_3b"):
        assert load_config(CONF / f"{name}.yaml").data.packing is True
