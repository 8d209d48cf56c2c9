"""XTokenDistillConfig: strict YAML, overrides, validation of bad inputs before any GPU time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nemo_xtoken.errors import ProjectionFileError, XTokenError
from nemo_xtoken.integration.config import (
    ConfigError,
    XTokenDistillConfig,
    config_from_dict,
    load_config,
    validate_resources,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _base(student_tok: str = "s.json", teacher_tok: str = "t.json", w: str = "w.safetensors") -> dict:
    return {
        "student": {"tokenizer": student_tok, "seq_length": 32},
        "teachers": [{"name": "t", "tokenizer": teacher_tok, "projection": w, "loss": "p_kl", "seq_length": 48}],
        "train": {"train_iters": 20, "global_batch_size": 4, "micro_batch_size": 2},
    }


@pytest.mark.parametrize("name", ["llama32_1b__qwen3_4b_pkl", "llama32_1b__phi4mini_hkl", "llama32_1b__phi4mini_llama32_3b"])
def test_paper_configs_load_with_paper_hyperparameters(name):
    cfg = load_config(CONF / f"{name}.yaml")
    assert isinstance(cfg, XTokenDistillConfig)
    o, t = cfg.optimizer, cfg.train
    assert (o.name, o.lr, o.weight_decay, o.clip_grad, o.warmup_fraction, o.lr_decay_style) == ("adamw", 5e-5, 0.1, 1.0, 0.05, "cosine")
    assert (t.train_iters, t.global_batch_size, cfg.student.seq_length) == (30000, 768, 4096)
    assert cfg.warmup_iters == 1500
    assert cfg.parallel.context_parallel_size == 1


def test_paper_teacher_mixes():
    assert [(t.loss, t.weight) for t in load_config(CONF / "llama32_1b__qwen3_4b_pkl.yaml").teachers] == [("p_kl", 1.0)]
    assert [(t.loss, t.weight) for t in load_config(CONF / "llama32_1b__phi4mini_hkl.yaml").teachers] == [("h_kl", 1.0)]
    mix = load_config(CONF / "llama32_1b__phi4mini_llama32_3b.yaml").teachers
    assert [(t.name, t.loss, t.weight, t.projection is None) for t in mix] == [
        ("phi4_mini", "h_kl", 0.8, False),
        ("llama32_3b", "kl", 0.2, True),
    ]


@pytest.mark.parametrize(
    "mutate,key,nearest",
    [
        (lambda d: d.__setitem__("optimiser", {}), "'optimiser'", "'optimizer'"),
        (lambda d: d["student"].__setitem__("seq_len", 4), "'student.seq_len'", "'student.seq_length'"),
        (lambda d: d["teachers"][0].__setitem__("lose", "p_kl"), "'teachers.0.lose'", "'teachers.0.loss'"),
        (lambda d: d.setdefault("distill", {}).__setitem__("temprature", 2.0), "'distill.temprature'", "'distill.temperature'"),
        (lambda d: d.setdefault("optimizer", {}).__setitem__("learning_rate", 1e-4), "'optimizer.learning_rate'", "'optimizer.lr'"),
    ],
)
def test_unknown_keys_name_key_file_nearest_and_valid_keys(tmp_path, mutate, key, nearest):
    d = _base()
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"unknown key {key}" in msg and f"did you mean {nearest}?" in msg and "valid keys" in msg
    assert "Config" not in msg.replace("ConfigError", "")  # CLI spelling: no dataclass names


def test_unknown_key_message_lists_the_valid_keys(tmp_path):
    d = _base()
    d["teachers"][0]["lose"] = "p_kl"
    with pytest.raises(ConfigError, match=r"valid keys under teachers.0: \[.*'loss'.*'projection'.*'weight'"):
        load_config(_write(tmp_path, d))


def test_overrides_host_style(tmp_path):
    p = _write(tmp_path, _base())
    cfg = load_config(p, ["optimizer.lr=1e-4", "teachers.0.loss=h_kl", "parallel.tensor_model_parallel_size=2", "data.paths=[a.jsonl, b.jsonl]"])
    assert cfg.optimizer.lr == 1e-4 and cfg.teachers[0].loss == "h_kl"
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.data.paths == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match=r"override 'optimizer.learning_rate=1e-4': unknown key 'optimizer.learning_rate' \(did you mean 'optimizer.lr'\?\); valid keys under optimizer"):
        load_config(p, ["optimizer.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'teachers.0.wieght' \(did you mean 'teachers.0.weight'\?\)"):
        load_config(p, ["teachers.0.wieght=0.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'pararell' \(did you mean 'parallel'\?\)"):
        load_config(p, ["pararell.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"index < 1"):
        load_config(p, ["teachers.3.weight=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["optimizer.lr"])


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda d: d["teachers"][0].__setitem__("loss", "js"), r"teachers.0 \(t\).loss: 'js' is not one of"),
        (lambda d: d["teachers"][0].pop("projection"), r"loss p_kl needs W"),
        (lambda d: d["teachers"][0].update(loss="kl"), r"loss kl is same-tokenizer KD and takes no W"),
        (lambda d: d.update(parallel={"context_parallel_size": 2}), r"parallel.context_parallel_size=2: .*cut aligned chunks"),
        (lambda d: d.update(parallel={"pipeline_model_parallel_size": 2}), r"parallel.pipeline_model_parallel_size=2: pipeline parallelism is not supported"),
        (lambda d: d["teachers"][0].update(parallel={"tensor_model_parallel_size": 4}), r"tensor_model_parallel_size: is 4 but the student runs with 1"),
        (lambda d: d["teachers"][0].update(parallel={"pipeline_model_parallel_size": 2}), r"pipeline_model_parallel_size: is 2 but the student runs with 1"),
        (lambda d: d["teachers"][0].update(weight=0.0), r"static weights sum to 0"),
        (lambda d: d["train"].update(global_batch_size=5), r"not a multiple of micro_batch_size"),
        (lambda d: d["student"].update(seq_length="long"), r"student.seq_length must be an integer"),
        (lambda d: d.update(teachers=[]), r"at least one teacher"),
        (lambda d: d.update(optimizer={"warmup_fraction": 1.5}), r"warmup_fraction: must be in \[0, 1\)"),
        (lambda d: d["teachers"][0].update(loss="h_kl", learnable_w=True), r"learnable_w: a learnable W is trained through P-KL only"),
        (lambda d: d.update(distill={"block_size": -1}), r"distill.block_size: must be ≥ 0"),
        (lambda d: d.update(distill={"tp_exchange": "fast"}), r"distill.tp_exchange: 'fast' is not one of \['auto', 'exact', 'summary'\]"),
        (lambda d: d.update(distill={"summary_bins": 1}), r"distill.summary_bins: must be ≥ 2"),
        (lambda d: d.update(distill={"summary_bins": "many"}), r"distill.summary_bins must be an integer"),
    ],
)
def test_bad_values_are_refused(tmp_path, mutate, pattern):
    d = _base()
    mutate(d)
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, d))


def test_tp_exchange_defaults_and_overrides(tmp_path):
    from nemo_xtoken.integration import distill
    from nemo_xtoken.parallel.summary import DEFAULT_BINS

    cfg = config_from_dict(_base())
    assert (cfg.distill.tp_exchange, cfg.distill.summary_bins) == ("auto", DEFAULT_BINS)  # the config's default is the code's
    assert distill.TP_EXCHANGES == ("auto", "exact", "summary")
    cfg = load_config(_write(tmp_path, _base()), ["distill.tp_exchange=summary", "distill.summary_bins=512"])
    assert (cfg.distill.tp_exchange, cfg.distill.summary_bins) == ("summary", 512)
    with pytest.raises(ConfigError, match=r"unknown key 'distill.tp_exchnge' \(did you mean 'distill.tp_exchange'\?\)"):
        load_config(_write(tmp_path, _base()), ["distill.tp_exchnge=exact"])


def test_teacher_parallel_equal_to_student_is_fine():
    d = _base()
    d["parallel"] = {"tensor_model_parallel_size": 2}
    d["teachers"][0]["parallel"] = {"tensor_model_parallel_size": 2}
    assert config_from_dict(d).teachers[0].parallel.tensor_model_parallel_size == 2


@pytest.fixture(scope="module")
def w_files(tmp_path_factory, w_llama3_qwen3, w_llama3_o200k):
    d = tmp_path_factory.mktemp("w")
    return str(w_llama3_qwen3.save(d / "l3_q3.safetensors")), str(w_llama3_o200k.save(d / "l3_o200k.safetensors"))


def test_resources_ok_and_audit_silent_when_loss_matches(w_files, llama3_path, qwen3_path, recwarn):
    cfg = config_from_dict(_base(llama3_path, qwen3_path, w_files[0]))
    rep = validate_resources(cfg)
    assert rep.recommendations == {"t": "p_kl"} and rep.warnings == []
    assert rep.projections["t"].shape[0] == rep.student_tokenizer.vocab_size
    assert not [w for w in recwarn if "coverage audit" in str(w.message)]


def test_audit_warns_when_loss_contradicts(w_files, llama3_path, qwen3_path, o200k_path):
    d = _base(llama3_path, qwen3_path, w_files[0])
    d["teachers"][0]["loss"] = "h_kl"
    with pytest.warns(UserWarning, match=r"configured loss h_kl but the coverage audit recommends p_kl"):
        validate_resources(config_from_dict(d))
    d = _base(llama3_path, o200k_path, w_files[1])  # Phi-4-mini's o200k: audit recommends h_kl
    with pytest.warns(UserWarning, match=r"configured loss p_kl but the coverage audit recommends h_kl"):
        validate_resources(config_from_dict(d))


def test_w_built_for_another_teacher_is_refused(w_files, llama3_path, o200k_path):
    cfg = config_from_dict(_base(llama3_path, o200k_path, w_files[0]))  # W is llama3→qwen3
    with pytest.raises(ProjectionFileError, match=r"another teacher tokenizer.*rebuild W"):
        validate_resources(cfg)


def test_same_tokenizer_teacher_must_share_the_student_tokenizer(llama3_path, qwen3_path):
    d = _base(llama3_path, qwen3_path)
    d["teachers"][0].update(loss="kl", projection=None)
    with pytest.raises(XTokenError, match=r"loss kl needs the student's tokenizer"):
        validate_resources(config_from_dict(d))
    d = _base(llama3_path, llama3_path)
    d["teachers"][0].update(loss="kl", projection=None)
    assert validate_resources(config_from_dict(d)).projections == {}


def test_criterion_from_config_rechecks_w_against_the_tokenizers(w_files, w_llama3_o200k, llama3_path, qwen3_path):
    pytest.importorskip("modelopt.torch.distill")
    from nemo_xtoken.integration.distill import XTokenLossBalancer, criterion_from_config

    d = _base(llama3_path, qwen3_path, w_files[0])
    d["distill"] = {"kd_scaling": "fixed", "kd_weight": 0.5, "alpha": "entropy"}
    cfg = config_from_dict(d)
    rep = validate_resources(cfg)
    crit, bal = criterion_from_config(cfg, rep, tp=2, student_padded=128256, teacher_padded=[151808])
    assert isinstance(bal, XTokenLossBalancer) and (bal.kd_scaling, bal.kd_weight) == ("fixed", 0.5)
    assert crit.weighting == "entropy" and crit.student_vocab_size == 128256
    assert crit.specs[0].teacher_vocab_size == rep.teacher_tokenizers["t"].vocab_size == 151669
    rep.projections["t"] = w_llama3_o200k  # a W built for another teacher tokenizer slipped in
    with pytest.raises(ProjectionFileError, match=r"teacher t's W was built for another teacher tokenizer"):
        criterion_from_config(cfg, rep, tp=2, student_padded=128256, teacher_padded=[151808])


def test_criterion_from_config_with_a_learnable_w(w_files, llama3_path, qwen3_path):
    pytest.importorskip("modelopt.torch.distill")
    from nemo_xtoken.integration.distill import criterion_from_config
    from nemo_xtoken.losses.learnable import LearnableProjection

    d = _base(llama3_path, qwen3_path, w_files[0])
    d["teachers"][0]["learnable_w"] = True
    cfg = config_from_dict(d)
    rep = validate_resources(cfg)
    crit, _ = criterion_from_config(cfg, rep, tp=2, student_padded=128256, teacher_padded=[151808])
    lw = crit.learnable_w["t"]
    assert isinstance(lw, LearnableProjection) and lw.nnz == rep.projections["t"].indices.size
    assert [p is lw.logits for p in crit.parameters()] == [True]  # trained with the student, checkpointed with it
    torch.testing.assert_close(lw.weights().detach(), torch.from_numpy(rep.projections["t"].data).float(), rtol=16 * torch.finfo(torch.float32).eps, atol=torch.finfo(torch.float32).eps)  # softmax(log w): ulps


# ---- `xtoken distill --check` speaks CLI -----------------------------------------------------------------


def _distill(*argv):
    from nemo_xtoken.cli.main import main

    return main(["distill", *argv])


def test_check_refuses_pipeline_parallelism_with_the_reason(capsys):
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    assert _distill("--config", conf, "--check", "--no-resources", "parallel.pipeline_model_parallel_size=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xtoken distill: error: ")
    assert "parallel.pipeline_model_parallel_size=2: pipeline parallelism is not supported" in err
    assert "equal sequence lengths" in err and "set parallel.pipeline_model_parallel_size=1" in err


def test_check_context_parallel_error_does_not_suggest_pipeline(capsys):
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    assert _distill("--config", conf, "--check", "--no-resources", "parallel.context_parallel_size=2") == 2
    err = capsys.readouterr().err
    assert "parallel.context_parallel_size=2" in err and "pipeline" not in err
    assert "parallel.tensor_model_parallel_size" in err


def test_check_unknown_override_suggests_the_key(capsys):
    conf = str(CONF / "llama32_1b__qwen3_4b_pkl.yaml")
    assert _distill("--config", conf, "--check", "--no-resources", "train.train_iter=10") == 2
    err = capsys.readouterr().err
    assert "override 'train.train_iter=10': unknown key 'train.train_iter' (did you mean 'train.train_iters'?)" in err


# ---- issue 24: inputs resolve against the config's folder only; sequence parallelism; the job's time limit --------


def test_inputs_resolve_against_the_config_folder_not_the_working_directory(tmp_path, monkeypatch, w_files, llama3_path, qwen3_path, capsys):
    """Under Slurm every rank starts in /nemo_run/code: an input found only from the submitting shell's working
    directory must fail `--check` (naming the key and both paths), not pass through a fallback the job cannot use."""
    import shutil

    from nemo_xtoken.integration.train import main

    conf, work = tmp_path / "conf", tmp_path / "work"
    conf.mkdir()
    work.mkdir()
    shutil.copy(w_files[0], work / "w.safetensors")
    monkeypatch.chdir(work)
    p = _write(conf, _base(llama3_path, qwen3_path, "w.safetensors"))
    with pytest.raises(ConfigError, match=r"teachers\.0\.projection: w\.safetensors exists relative to the working directory "
                       r".*not relative to the config's folder .*/nemo_run/code; write teachers\.0\.projection=\.\./work/w\.safetensors"):
        validate_resources(load_config(p), base_dir=conf)
    assert main(["--config", str(p), "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "teachers.0.projection" in err and str(conf / "w.safetensors") in err
    # the same path written relative to the config's folder is what every rank reads, from any working directory
    p2 = _write(conf, _base(llama3_path, qwen3_path, "../work/w.safetensors"), "ok.yaml")
    monkeypatch.chdir(tmp_path)
    assert "t" in validate_resources(load_config(p2), base_dir=conf).projections
    # missing everywhere: the resolved path and the rule
    p3 = _write(conf, _base(llama3_path, qwen3_path, "nope.safetensors"), "missing.yaml")
    with pytest.raises(ConfigError, match=rf"teachers\.0\.projection: {conf}/nope\.safetensors does not exist \(relative paths in a config resolve against the config's folder"):
        validate_resources(load_config(p3), base_dir=conf)


def test_data_and_tokenizer_paths_follow_the_same_rule(tmp_path, monkeypatch, w_files, llama3_path, qwen3_path):
    import shutil

    from nemo_xtoken.integration.config import resolve_input
    from nemo_xtoken.integration.data import config_documents

    conf, work = tmp_path / "conf", tmp_path / "work"
    conf.mkdir()
    work.mkdir()
    (work / "docs.jsonl").write_text('{"text": "one"}\n')
    shutil.copy(llama3_path, work / "student.json")
    monkeypatch.chdir(work)
    d = _base(llama3_path, qwen3_path, w_files[0])
    d["data"] = {"paths": ["docs.jsonl"]}
    cfg = load_config(_write(conf, d))
    res = validate_resources(cfg, base_dir=conf)
    with pytest.raises(ConfigError, match=r"data\.paths: docs\.jsonl exists relative to the working directory .*write data\.paths=\.\./work/docs\.jsonl"):
        config_documents(cfg, res, base_dir=conf)
    d["student"]["tokenizer"] = "student.json"
    with pytest.raises(ConfigError, match=r"student\.tokenizer: student\.json exists relative to the working directory"):
        validate_resources(load_config(_write(conf, d)), base_dir=conf)
    # a hub id is not a path: given as is (the hub cache check names it when it is not cached)
    assert resolve_input("meta-llama/Llama-3.2-1B", conf, "student.model", hub_ok=True) == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ConfigError, match=r"student\.model: .*/conf/models/tiny/llama does not exist"):
        resolve_input("models/tiny/llama", conf, "student.model", hub_ok=True)


@pytest.mark.parametrize(
    "over,pattern",
    [
        ({"parallel": {"sequence_parallel": True}},
         r"parallel\.sequence_parallel: is true but parallel\.tensor_model_parallel_size is 1: Megatron refuses .*set parallel\.sequence_parallel=false, or parallel\.tensor_model_parallel_size=2"),
        ({"train": {"train_iters": 20, "global_batch_size": 4, "micro_batch_size": 2, "exit_duration_in_mins": 0}},
         r"train\.exit_duration_in_mins: must be ≥ 1 minute"),
    ],
)
def test_settings_megatron_refuses_are_refused_at_load(tmp_path, over, pattern):
    d = _base()
    d.update(over)
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, d))


def test_sequence_parallel_needs_every_sequence_divisible_by_tp(tmp_path):
    par = {"tensor_model_parallel_size": 4, "sequence_parallel": True}
    cfg = load_config(_write(tmp_path, {**_base(), "parallel": par}))
    cfg.check_sequence_parallel()  # 32 and 48: multiples of 4
    d = _base()
    d["student"]["seq_length"] = 4097
    with pytest.raises(ConfigError, match=r"student\.seq_length: 4097 is not a multiple of parallel\.tensor_model_parallel_size=4.*nearest valid value is 4096"):
        load_config(_write(tmp_path, {**d, "parallel": par})).check_sequence_parallel()
    d = _base()
    d["teachers"][0]["seq_length"] = 50
    with pytest.raises(ConfigError, match=r"teachers\.0\.seq_length: 50 is not a multiple .*=4.*nearest valid value is 48"):
        load_config(_write(tmp_path, {**d, "parallel": par})).check_sequence_parallel()
    d = _base()
    d["teachers"][0].pop("seq_length")
    d["student"]["seq_length"] = 30
    with pytest.raises(ConfigError, match=r"student\.seq_length: 30 .*nearest valid value is 28"):
        load_config(_write(tmp_path, {**d, "parallel": par})).check_sequence_parallel()
    load_config(_write(tmp_path, {**d, "parallel": {**par, "sequence_parallel": False}})).check_sequence_parallel()


def test_exit_duration_reaches_bridge_training_config(tmp_path):
    from nemo_xtoken.integration.bridge import bridge_config_kwargs

    d = _base()
    assert bridge_config_kwargs(load_config(_write(tmp_path, d)))["train"]["exit_duration_in_mins"] is None
    d["train"]["exit_duration_in_mins"] = 225
    assert bridge_config_kwargs(load_config(_write(tmp_path, d)))["train"]["exit_duration_in_mins"] == 225
