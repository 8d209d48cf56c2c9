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
    ov = _local(name, llama3_path, qwen3_path, o200k_path, w_files) + [f"data.paths=[{sotu}]", "data.format=jsonl"]
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
    assert main(["--config", conf, "--check", *ov]) == 2  # the shipped ../data/llama3__qwen3 (preprocess output) is not here
    assert re.search(rf"data\.paths: {CONF}/\.\./data/llama3__qwen3 does not exist \(relative paths in a config resolve against "
                     r"the config's folder", capsys.readouterr().err)
    ov += ["data.format=jsonl"]
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
    from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess
    from nemo_xtoken.integration import bridge as B
    from nemo_xtoken.data.batch import collate

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
                           (["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"], "all-gather")):
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


@pytest.mark.parametrize("name", ["llama32_1b__qwen3_4b_pkl", "llama32_1b__phi4mini_hkl", "llama32_1b__phi4mini_llama32_3b"])
def test_shipped_configs_read_preprocess_output_relative_to_their_folder(name):
    """format: jsonl aligned the whole corpus in memory on each of the 128 ranks; the shipped configs read `xtoken
    preprocess` folders, and their inputs from the repository root's folders as seen from conf/ (where they resolve)."""
    cfg = load_config(CONF / f"{name}.yaml")
    assert cfg.data.format == "preprocessed" and all(p.startswith("../data/") for p in cfg.data.paths)
    assert all(t.projection.startswith("../projections/") for t in cfg.teachers if t.projection)
    assert (cfg.train.micro_batch_size, cfg.data.packing, cfg.parallel.sequence_parallel) == (1, True, True)
    cfg.check_sequence_parallel()


# ---- issue 24: `--check` refuses what the run would refuse; hub ids not in the local cache ----------------------


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory):
    """The Hugging Face configs of Llama-3.2-1B and Qwen3-4B (their real attention, MLP and vocabulary sizes; config.json
    only: `--check` reads no weights)."""
    from transformers import LlamaConfig, Qwen3Config

    d = tmp_path_factory.mktemp("layouts")
    LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                architectures=["LlamaForCausalLM"]).save_pretrained(d / "llama32_1b")
    Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                architectures=["Qwen3ForCausalLM"]).save_pretrained(d / "qwen3_4b")
    return {"student": str(d / "llama32_1b"), "teacher": str(d / "qwen3_4b")}


def test_check_refuses_what_the_run_refuses_with_the_nearest_valid_value(sotu, tmp_path, llama3_path, qwen3_path, w_files,
                                                                          real_layouts, capsys):
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    small = tmp_path / "two.jsonl"
    small.write_text("\n".join(sotu.read_text().splitlines()[:2]) + "\n")
    ov = [f"student.tokenizer={llama3_path}", f"teachers.0.tokenizer={qwen3_path}", f"teachers.0.projection={w_files['qwen3']}",
          f"student.model={real_layouts['student']}", f"teachers.0.model={real_layouts['teacher']}",
          f"data.paths=[{small}]", "data.format=jsonl", "student.seq_length=512"]

    def check(*more):
        rc = main(["--config", conf, "--check", *ov, *more])
        out, err = capsys.readouterr()
        return rc, out, err.strip().splitlines()[-1] if err.strip() else ""

    from nemo_xtoken.integration.train import check_tensor_parallel

    rep = check_tensor_parallel(load_config(conf, ov), CONF)  # the shipped TP 2 (what --check reports as "tensor_parallel")
    assert rep["valid_tensor_model_parallel_sizes"] == [1, 2, 4, 8]
    assert rep["models"]["student.model"] == {"num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
                                              "vocab_size": 128256}
    # 64 ranks for a 32-head student (passed before)
    rc, _, last = check("parallel.tensor_model_parallel_size=64")
    assert rc == 2 and re.search(r"parallel\.tensor_model_parallel_size=64: student\.model=.*llama32_1b has 32 attention heads "
                                 r"\(num_attention_heads\).*the nearest size valid for every model of this run is 8 \(valid: \[1, 2, 4, 8\]\)", last), last
    # 3 (a vocabulary-padding message before): the heads, both nearest sizes
    rc, _, last = check("parallel.tensor_model_parallel_size=3")
    assert rc == 2 and "32 attention heads" in last and "is 2 or 4" in last and "padd" not in last, last
    # 16: the student's 8 KV heads
    rc, _, last = check("parallel.tensor_model_parallel_size=16")
    assert rc == 2 and "has 8 KV heads (query groups)" in last and "is 8 (valid" in last, last
    # micro-batch 2 with packing (docs/data.md: refused; the run refused it at its first step)
    rc, _, last = check("train.micro_batch_size=2")
    assert rc == 2 and "train.micro_batch_size=2 with data.packing=true" in last and "set train.micro_batch_size=1" in last, last
    from nemo_xtoken.integration.train import check_packed_micro_batch

    check_packed_micro_batch(load_config(conf, ["train.micro_batch_size=2", "data.packing=false"]))  # unpacked: accepted
    # sequence parallelism without TP; a sequence length TP does not divide
    rc, _, last = check("parallel.tensor_model_parallel_size=1")
    assert rc == 2 and "parallel.sequence_parallel: is true but parallel.tensor_model_parallel_size is 1" in last, last
    rc, _, last = check("parallel.tensor_model_parallel_size=8", "teachers.0.seq_length=516")
    assert rc == 2 and "teachers.0.seq_length: 516 is not a multiple of parallel.tensor_model_parallel_size=8" in last, last
    assert "nearest valid value is 512" in last


def test_check_names_hub_ids_missing_from_the_local_cache_at_once(sotu, tmp_path, llama3_path, qwen3_path, w_files, monkeypatch, capsys):
    """Hub ids on a machine whose cache lacks them: one line naming each key, id and file, in well under a second of
    network (none is touched), with the hint to download them and HF_HUB_OFFLINE; before, 40 s of retries."""
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    ov = [f"teachers.0.tokenizer={qwen3_path}", f"teachers.0.projection={w_files['qwen3']}", f"data.paths=[{sotu}]", "data.format=jsonl"]
    t0 = time.perf_counter()
    assert main(["--config", conf, "--check", *ov]) == 2
    took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert took < 5, took
    assert len(err.splitlines()) == 1, err
    assert f"not in the local Hugging Face cache {tmp_path / 'hf' / 'hub'}" in err
    assert "student.tokenizer=meta-llama/Llama-3.2-1B lacks tokenizer.json" in err
    assert "student.model=meta-llama/Llama-3.2-1B lacks config.json, tokenizer.json (Bridge's tokenizer), weights" in err
    assert "teachers.0.model=Qwen/Qwen3-4B lacks config.json" in err and "teachers.0.tokenizer" not in err  # a local file
    assert "hf download" in err and "HF_HUB_OFFLINE" in err and "--hf-home" in err


def test_hub_cache_check_reads_the_cache_layout(tmp_path, llama3_path, monkeypatch):
    """A Hugging Face cache filled as `hf download` fills it (refs/main → snapshots/<rev>/…): found; a
    sharded checkpoint with a shard missing: that shard named."""
    import shutil

    from nemo_xtoken.integration.config import config_from_dict
    from nemo_xtoken.integration.hub import check_hub_cache, missing_from_cache
    from tests.bridge_tiny import write_tiny

    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    for repo in ("meta-llama/Llama-3.2-1B", "Qwen/Qwen3-4B"):
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(rev)
        snap = root / "snapshots" / rev
        write_tiny("llama" if "llama" in repo else "qwen3", snap, seed=0, with_tokenizer=False)
        shutil.copy(llama3_path, snap / "tokenizer.json")
    cfg = config_from_dict({"student": {"tokenizer": "meta-llama/Llama-3.2-1B", "model": "meta-llama/Llama-3.2-1B"},
                            "teachers": [{"name": "q", "tokenizer": "Qwen/Qwen3-4B", "model": "Qwen/Qwen3-4B", "loss": "uld"}]})
    assert missing_from_cache(cfg, tmp_path, cache=cache) == []
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert check_hub_cache(cfg, tmp_path) == []
    snap = cache / "models--Qwen--Qwen3-4B" / "snapshots" / rev
    (snap / "model.safetensors").rename(snap / "model-00001-of-00002.safetensors")
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (miss,) = missing_from_cache(cfg, tmp_path, cache=cache)
    assert (miss.key, miss.repo, miss.missing) == ("teachers.0.model", "Qwen/Qwen3-4B", ["model-00002-of-00002.safetensors"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"\(HF_HUB_OFFLINE=1\): teachers\.0\.model=Qwen/Qwen3-4B lacks model-00002-of-00002"):
        check_hub_cache(cfg, tmp_path)
    # a teacher loaded from a Megatron checkpoint needs only the architecture (config.json) from the hub
    cfg.teachers[0].checkpoint = "ckpt"
    assert missing_from_cache(cfg, tmp_path, cache=cache) == []
    # the student's model folder also gives Bridge its tokenizer
    (cache / "models--meta-llama--Llama-3.2-1B" / "snapshots" / rev / "tokenizer.json").unlink()
    got = {(m.key, tuple(m.missing)) for m in missing_from_cache(cfg, tmp_path, cache=cache)}
    assert got == {("student.tokenizer", ("tokenizer.json",)), ("student.model", ("tokenizer.json (Bridge's tokenizer)",))}
