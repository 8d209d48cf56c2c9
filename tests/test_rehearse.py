"""``xtoken rehearse``: the shipped configs through Megatron-Bridge's own ``pretrain()`` on this CPU.

Each rehearsal is the real thing end to end: the shipped ``conf/*.yaml`` read with overrides that point
its models at tiny same-architecture Hugging Face checkpoints written here (Llama student; Qwen3, Phi3
and Llama teachers: tests/bridge_tiny.py), its tokenizers at the cached real ones and its W at files
built here; then ``rehearse()`` shrinks, launches gloo ranks from a foreign working directory with the
hub offline, kills them after the first checkpoint, resumes, compares with an uninterrupted run, and
exports.  The fast tests cover the model shrinking and the CUDA shim's scope.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


# ---- fast: shrinking and the shim ------------------------------------------------------------------------


def test_shrink_keeps_architecture_vocab_tying_and_rotary_scaling():
    from bridge_tiny import phi3_config

    from nemo_xtoken.cpu.rehearse import shrink_hf_config

    big = phi3_config(tied=True)
    big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads = 6, 24, 8  # Phi-4-mini's 3 q per kv
    big.hidden_size = 24 * 16
    n_old = len(big.rope_scaling["short_factor"])
    small, notes = shrink_hf_config(big, tp=2)
    assert type(small) is type(big) and small.vocab_size == big.vocab_size and small.tie_word_embeddings
    assert small.num_hidden_layers == 2 and small.num_key_value_heads == 2 and small.num_attention_heads == 6  # 3 per kv kept
    assert small.partial_rotary_factor == big.partial_rotary_factor
    rot = int(small.hidden_size // small.num_attention_heads * small.partial_rotary_factor)
    assert small.rope_scaling["type"] == "longrope" and len(small.rope_scaling["short_factor"]) == rot // 2 <= n_old
    assert small.rope_scaling["long_factor"] == big.rope_scaling["long_factor"][: rot // 2]
    assert any("num_hidden_layers" in n for n in notes)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(small)  # builds: the shrunk config is consistent
    assert m.get_output_embeddings().weight.shape[0] == big.vocab_size


def test_cuda_on_cpu_redirects_and_restores():
    import torch.distributed as dist

    from nemo_xtoken.cpu.cuda_shim import cuda_on_cpu

    before = {n: getattr(torch.cuda, n) for n in ("is_available", "current_device", "Stream", "get_rng_state")}
    before_barrier = dist.barrier
    with cuda_on_cpu():
        assert torch.cuda.is_available() and torch.cuda.current_device() == 0
        x = torch.ones(3, device="cuda")
        y = torch.zeros(2, device=torch.device("cuda", 0)).cuda()
        z = x.to(torch.cuda.current_device())
        assert x.device.type == y.device.type == z.device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert torch.empty(4).eq(0).all()
        torch.cuda.manual_seed(7)
        a = torch.rand(3, device="cuda")
        torch.cuda.manual_seed(7)
        assert torch.equal(a, torch.rand(3, device="cuda"))
    assert {n: getattr(torch.cuda, n) for n in before} == before and dist.barrier is before_barrier
    assert not isinstance(torch.overrides._get_current_function_mode_stack(), list) or not any(
        type(m).__name__ == "CudaToCpuMode" for m in torch.overrides._get_current_function_mode_stack())
    assert torch.ones(1).type() == "torch.FloatTensor"


# ---- slow: the shipped configs rehearsed --------------------------------------------------------------------


# tiny (the checkpoints) and w_files: session fixtures of tests/conftest.py, shared with tests/test_bridge_real.py


def _overrides(name: str, tiny, w_files, llama3_path, qwen3_path, o200k_path) -> list[str]:
    """Point a shipped config at the tiny checkpoints, the cached tokenizers and the W built here."""
    ov = [f"student.model={tiny['student']}", f"student.tokenizer={llama3_path}"]
    if "qwen3" in name:
        ov += [f"teachers.0.model={tiny['qwen3']}", f"teachers.0.tokenizer={qwen3_path}", f"teachers.0.projection={w_files['qwen3']}"]
    else:
        ov += [f"teachers.0.model={tiny['phi3']}", f"teachers.0.tokenizer={o200k_path}", f"teachers.0.projection={w_files['phi3']}"]
    if "llama32_3b" in name:
        ov += [f"teachers.1.model={tiny['llama_t']}", f"teachers.1.tokenizer={llama3_path}"]
    return ov


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """One rank launcher for the rehearsals of this module, one after the other (its imports, ~15 CPU-seconds, once);
    test_rehearse_tp2_dp2 starts its own, as ``xtoken rehearse`` does."""
    from nemo_xtoken.cpu.rehearse import _Launcher

    cwd = tmp_path_factory.mktemp("launcher")
    started = _Launcher(2, cwd, cwd / "launcher.log", 600)
    yield started
    started.close()


def _rehearse(name, nproc, tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path, extra=(), launcher=None):
    from nemo_xtoken.cpu.rehearse import rehearse

    cfg = CONF / f"{name}.yaml"
    lines: list[str] = []
    report = rehearse(str(cfg), _overrides(name, tiny, w_files, llama3_path, qwen3_path, o200k_path) + list(extra), nproc=nproc,
                      steps=2, workdir=str(tmp_path / "work"), log=lines.append, launcher=launcher)
    return cfg, report, lines


def _check(cfg: Path, report: dict, lines: list[str], tp: int = 2) -> None:
    assert report["problems"] == [], report["problems"]
    assert report["resume_equal"] is True and report["resumed_step"] == 1
    assert len(report["losses"]) == 2 and all(x == x and x > 0 for x in report["losses"])
    assert report["kd_losses"] and all(len(v) == 2 for v in report["kd_losses"].values())
    assert report["export_max_abs_logit_diff"] <= report["export_tolerance"] and report["export_argmax_agreement"] >= 0.99
    assert [Path(c).name for c in report["checkpoints"]] == ["iter_0000001", "iter_0000002"]
    keys = {c["key"] for c in report["changes"]}
    assert {"student.model", "student.seq_length", "train.train_iters", "train.global_batch_size", "data.paths"} <= keys
    printed = "\n".join(lines)
    assert "change: student.seq_length: 4096 -> 64" in printed  # every change printed
    work = Path(report["workdir"])
    cwd = work / "cwd"
    assert cwd.resolve() != cfg.parent.resolve() and REPO not in cwd.resolve().parents  # a foreign working directory
    for env_file in (work / "runs").glob("*/*/env.rank*.json"):
        env = json.loads(env_file.read_text())
        assert env == {"cwd": str(cwd), "HF_HUB_OFFLINE": "1"}, env_file
    # the shipped TP 2 with sequence parallelism ran as shipped
    text = cfg.read_text()
    assert "sequence_parallel: true" in text and f"tensor_model_parallel_size: {tp}" in text
    assert "sequence_parallel" not in keys and "parallel.tensor_model_parallel_size" not in keys


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama32_1b__qwen3_4b_pkl", "llama32_1b__phi4mini_hkl", "llama32_1b__phi4mini_llama32_3b"])
def test_rehearse_shipped_config_nproc2(name, tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path, launcher):
    cfg, report, lines = _rehearse(name, 2, tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path, launcher=launcher)
    _check(cfg, report, lines)
    assert report["tp"] == 2 and report["dp"] == 1
    env_log = (Path(report["workdir"]) / "runs" / "resumed" / "launch2" / "rank0.log").read_text()
    assert "successfully saved checkpoint from iteration       2" in env_log
    # the rank took the student tokenizer the launcher loaded (nemo_xtoken/cpu/rehearse_zygote.py _share_tokenizers)
    assert "AutoTokenizer.from_pretrained(" in env_log and "the launcher's copy" in env_log


@pytest.mark.slow
def test_rehearse_tp2_dp2(tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path):
    cfg, report, lines = _rehearse("llama32_1b__qwen3_4b_pkl", 4, tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path)
    _check(cfg, report, lines)
    assert report["tp"] == 2 and report["dp"] == 2
    assert (Path(report["workdir"]) / "runs" / "launcher.log").is_file()  # its own launcher, as the command line starts it
    gbs = next(c for c in report["changes"] if c["key"] == "train.global_batch_size")
    assert gbs["rehearsal"] == "4"  # micro-batch 1 x DP 2 x 2 accumulation steps


def test_rehearse_refuses_nproc_not_multiple_of_tp(tmp_path):
    from nemo_xtoken.cpu.rehearse import RehearsalError, rehearse

    with pytest.raises(RehearsalError, match="--nproc 3 is not a multiple"):
        rehearse(str(CONF / "llama32_1b__qwen3_4b_pkl.yaml"), nproc=3, workdir=str(tmp_path / "w"), log=lambda m: None)


def test_rehearsal_data_for_a_preprocessed_config(tmp_path, llama3_path, qwen3_path, o200k_path):
    """``data.format: preprocessed`` whose folders are not here: the real ``xtoken preprocess`` makes the rehearsal's,
    one per cross-tokenizer teacher tokenizer, and the change is reported; a run's config reads them."""
    from nemo_xtoken.cpu.rehearse import _prepare_data
    from nemo_xtoken.integration.config import load_config
    from nemo_xtoken.data.documents import PreprocessedDocuments as RunReader

    cfg_file = CONF / "llama32_1b__phi4mini_llama32_3b.yaml"
    ov = ["data.format=preprocessed", "data.paths=[data/aligned_phi4mini]", f"student.tokenizer={llama3_path}",
          f"teachers.0.tokenizer={o200k_path}", f"teachers.1.tokenizer={llama3_path}"]
    cfg = load_config(cfg_file, ov)
    extra, changes = [], []
    _prepare_data(cfg, CONF, tmp_path, llama3_path, extra, changes)
    (change,) = changes
    assert change.key == "data.paths" and "xtoken preprocess" in change.why
    folders = json.loads(extra[0].split("=", 1)[1])
    assert len(folders) == 1  # the KL teacher shares the student's tokenizer: one folder (Phi-4-mini's o200k)
    docs = RunReader(Path(folders[0]))
    assert len(docs) == 48 and docs.params["teacher_tokenizer"] == o200k_path
    load_config(cfg_file, ov + extra)  # still a valid run config


@pytest.mark.slow
def test_rehearse_learnable_w_bf16(tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path, launcher):
    """A learnable W in the shipped bf16 run: Bridge's loop trains it in fp32 next to the bf16 student, saves, resumes
    equal.  Before the fixes W was cast to bf16 (Float16Module), and once kept in fp32 the distributed optimizer's first
    checkpoint save failed (an fp32 W and bf16 norms in one parameter group: distrib_optimizer.py:1958)."""
    cfg, report, lines = _rehearse("llama32_1b__qwen3_4b_pkl", 2, tmp_path, tiny, w_files, llama3_path, qwen3_path, o200k_path,
                                   extra=["teachers.0.learnable_w=true"], launcher=launcher)
    _check(cfg, report, lines)
    state = torch.load(next((Path(report["workdir"]) / "scratch").glob("resumed_iter_*.pt")), weights_only=False)
    w = [v for k, v in state.items() if "learnable_w" in k and k.endswith("logits")]
    assert w and all(t.dtype == torch.float32 for t in w)
    assert state["embedding.word_embeddings.weight"].dtype == torch.bfloat16


def test_launcher_forks_ranks_in_their_own_session_env_and_log_and_reports_a_failing_rank(tmp_path):
    """The rehearsal's launcher (nemo_xtoken/cpu/rehearse_zygote.py): each rank forked with its own environment, working
    directory and log; a rank that fails ends the launch with its exit status and its log's exception line."""
    from nemo_xtoken.cpu.rehearse import RehearsalError, _launch, _Launcher

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    launcher = _Launcher(2, cwd, tmp_path / "launcher.log", 600)
    try:
        with pytest.raises(RehearsalError, match=r"launch x: rank \d exited with 1: .*missing\.yaml"):
            _launch("launch x", 2, str(tmp_path / "missing.yaml"), [], tmp_path / "out", cwd, launcher=launcher, timeout=600,
                    log=lambda m: None)
    finally:
        launcher.close()
    assert launcher.proc.returncode == 0
    for r in range(2):
        assert json.loads((tmp_path / "out" / f"env.rank{r}.json").read_text()) == {"cwd": str(cwd), "HF_HUB_OFFLINE": "1"}
        assert (tmp_path / "out" / f"exit.rank{r}").read_text() in ("1", "-9")  # failed, or killed once the other failed
