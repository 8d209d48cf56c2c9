"""The real host path on a CPU: Megatron-Bridge 0.6.2 providers from tiny random Hugging Face checkpoints.

No stand-ins: ``AutoBridge`` converts Llama-3 / Qwen3 / Phi3 checkpoints written here (Phi3 through the
plugin's bridge), the plugin's :func:`~nemo_xtoken.integration.bridge.build_providers`,
:func:`~nemo_xtoken.integration.bridge.convert_to_xtoken_distillation_provider`, Bridge's
``provide_distributed_model`` running the plugin's pre-wrap hook (teachers finalized and built from
their own providers, Bridge's weight-loading hooks, the criterion on the TP group), ModelOpt's
``DistillationModel``, the plugin's dataset builder, ``forward_step`` and ``loss_func``, at TP 1 and
2 on gloo.  What is CPU-specific is only what a machine without transformer_engine needs (the
scoped import hook installed by ``tests/conftest.py``, Bridge's local layer spec, the two CUDA
redirects of :mod:`nemo_xtoken.cpu.megatron`).  Bridge's ``pretrain()`` loop itself asserts
CUDA and is not run here (``scripts/gpu_check_distill.py`` is the GPU check).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("megatron.bridge")  # importable through tests/conftest.py's scoped TE hook

from bridge_tiny import VOCAB, run_config, write_config, write_docs, write_tiny  # noqa: E402

from nemo_xtoken.integration import bridge as B  # noqa: E402
from nemo_xtoken.cpu.megatron import spawn  # noqa: E402

pytestmark = pytest.mark.slow


# ---- fixtures: tiny checkpoints, W files, configs ------------------------------------------------------


# tiny (the checkpoints) and w_files: session fixtures of tests/conftest.py, shared with tests/test_rehearse.py


def _configs(root: Path, tiny, w_files, llama3_path, qwen3_path, o200k_path, tp: int) -> dict[str, Path]:
    """The paper's runs on tiny models: Qwen3 with P-KL; Phi-4-mini-type (H-KL, 0.8) + same-tokenizer Llama (KL, 0.2)."""
    out = {}
    qwen = [{"name": "qwen3", "tokenizer": qwen3_path, "model": str(tiny["qwen3"]), "projection": w_files["qwen3"],
             "loss": "p_kl", "seq_length": 32}]
    mix = [{"name": "phi4_mini", "tokenizer": o200k_path, "model": str(tiny["phi3"]), "projection": w_files["phi3"],
            "loss": "h_kl", "weight": 0.8, "seq_length": 32},
           {"name": "llama_t", "tokenizer": llama3_path, "model": str(tiny["llama_t"]), "loss": "kl", "weight": 0.2}]
    for name, teachers in (("qwen3", qwen), ("mix", mix)):
        folder = root / f"{name}_tp{tp}"
        folder.mkdir(parents=True)
        write_docs(folder)
        out[name] = write_config(folder, run_config(student=tiny["student"], llama_tok=llama3_path, teachers=teachers, tp=tp, steps=6))
    return out


# ---- the run's path, one rank ---------------------------------------------------------------------------


def _build(cfg_path: str, rank: int, world: int):
    """Config → providers → conversion → Bridge's provide_distributed_model (pre-wrap hook) → DistillationModel."""
    from nemo_xtoken.integration.config import load_config, validate_resources
    from nemo_xtoken.cpu.bridge_te_shim import without_te
    from nemo_xtoken.cpu.megatron import init_megatron_cpu

    base = Path(cfg_path).parent
    cfg = load_config(cfg_path)
    init_megatron_cpu(rank, world, tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size, seed=cfg.train.seed)
    res = validate_resources(cfg, base_dir=base)
    student, teachers = B.build_providers(cfg, base_dir=base)
    for p in (student, *teachers):
        without_te(p)  # no transformer_engine here: Bridge's local layer spec
    B.convert_to_xtoken_distillation_provider(student, teachers, cfg, resources=res, base_dir=base)
    student.finalize()  # ConfigContainer.validate() finalizes cfg.model in a run
    (model,) = student.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None)
    return cfg, res, base, model


def _hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits.float()


def _distill(rank: int, world: int, cfg_path: str, references: dict[str, str], save: bool = False) -> dict:
    """Train a few steps through forward_step/loss_func; check teachers and student against Hugging Face on step 0.

    ``references[name]``: the HF folder whose logits a teacher must reproduce (its own model, or the
    export of the checkpoint it loads).  ``save``: afterwards save the distillation model with Bridge's
    checkpoint writer under ``checkpoint.save`` and return the student's logits on probe ids.
    """
    import modelopt.torch.distill as mtd

    from nemo_xtoken.integration.distill import TeacherBundle, XTokenLogitsLoss, xtoken_criterion
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, gather_vocab_parallel_logits

    with cpu_megatron_patches():
        cfg, res, base, model = _build(cfg_path, rank, world)
        bundle = model.teacher_model
        crit = xtoken_criterion(model)
        teachers = list(bundle.teachers)
        facts = {
            "distillation_model": isinstance(model, mtd.DistillationModel),
            "model_class": type(model).__name__,
            "bundle": isinstance(bundle, TeacherBundle),
            "criterion": isinstance(crit, XTokenLogitsLoss),
            "crit_tp": crit.tp,
            "teacher_trainable": sum(p.requires_grad for t in teachers for p in t.parameters()),
            "teacher_seq": [t.config.seq_length for t in teachers],
            "teacher_finalized": [t.config.init_method is not None for t in teachers],
            "student_ce_impl": model.config.cross_entropy_fusion_impl,
            "state_dict_has_teacher": any("teacher" in k for k in model.state_dict()),
            "teacher_padded": crit.teacher_padded,
        }
        captured: dict = {}
        model.output_layer.register_forward_hook(lambda m, i, o: captured.__setitem__("s", o[0]))
        bundle.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))
        mb = cfg.train.micro_batch_size
        ds = B.build_dataset(cfg, cfg.train.train_iters * mb, resources=res, base_dir=base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=0.0)
        model.train()
        logs = []
        for step in range(cfg.train.train_iters):
            batch = ds.collate_fn([ds[step * mb + j] for j in range(mb)])
            output, loss_fn = B.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
            if step == 0:
                tbs = B.teacher_batches_from_batch(batch, [t.loss for t in cfg.teachers])
                diffs = []
                for m, t in enumerate(cfg.teachers):
                    got = gather_vocab_parallel_logits(captured["t"][m])
                    ref = _hf_logits(references.get(t.name, t.model), tbs[m]["teacher_tokens"])
                    diffs.append(float((got[..., : ref.shape[-1]] - ref).abs().max()))
                facts["teacher_vs_hf"] = diffs
                s = gather_vocab_parallel_logits(captured["s"]).transpose(0, 1)
                ref = _hf_logits(cfg.student.model, batch["tokens"])
                facts["student_vs_hf"] = float((s[..., : ref.shape[-1]] - ref).abs().max())
            loss, n, report = loss_fn(output)
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            logs.append({k: float(v[0] / v[1]) for k, v in report.items()} | {"loss/n": float(loss / n)})
        facts["teacher_grads"] = sum(p.grad is not None for t in teachers for p in t.parameters())
        facts["logs"] = logs
        if save:
            from megatron.bridge.training.model_load_save import save_megatron_model

            model.eval()
            with torch.no_grad(), model.only_student_forward():
                model(PROBE, torch.arange(PROBE.shape[1]).expand_as(PROBE), None)
            facts["probe_logits"] = gather_vocab_parallel_logits(captured["s"]).transpose(0, 1)
            # Bridge's checkpoint writer records torch.cuda.get_rng_state() even with save_rng=False: on this
            # CPU it gets the CPU generator's state (the one redirect a save needs beyond cpu_megatron_patches)
            cuda_rng, torch.cuda.get_rng_state = torch.cuda.get_rng_state, lambda device="cuda": torch.get_rng_state()
            try:
                save_megatron_model([model], B.resolve_run_path(cfg.checkpoint.save, base))  # Bridge's save_checkpoint
            finally:
                torch.cuda.get_rng_state = cuda_rng
        return facts


PROBE = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(7))


def _export(rank: int, world: int, checkpoint: str, hf_model: str, out: str) -> int:
    """``xtoken export-hf`` as a user runs it (Bridge's export_ckpt on gloo, CPU)."""
    from nemo_xtoken.cli.main import main
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches

    with cpu_megatron_patches():
        return main(["export-hf", "--checkpoint", checkpoint, "--hf-model", hf_model, "--output", out])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny, w_files, llama3_path, qwen3_path, o200k_path):
    """Both paper-style runs at TP 1 and 2.  The Qwen3 TP = 2 run saves its checkpoint, which is exported to a
    Hugging Face folder (``xtoken export-hf``) and then loaded by the mixed run's same-tokenizer teacher
    (``teachers.1.checkpoint``): its logits must equal the exported model's, not its own HF weights'."""
    root = tmp_path_factory.mktemp("runs")
    cfgs = {tp: _configs(root, tiny, w_files, llama3_path, qwen3_path, o200k_path, tp) for tp in (1, 2)}
    out = {("qwen3", 1): spawn(_distill, 1, str(cfgs[1]["qwen3"]), {}, timeout=900)}
    out[("qwen3", 2)] = spawn(_distill, 2, str(cfgs[2]["qwen3"]), {}, True, timeout=900)
    ckpt = cfgs[2]["qwen3"].parent / "checkpoints" / "run"
    exported = root / "exported_student"
    out["export_rc"] = spawn(_export, 1, str(ckpt), str(tiny["student"]), str(exported))[0]
    out["checkpoint"], out["exported"] = ckpt, exported
    for tp in (1, 2):
        data = yaml.safe_load(cfgs[tp]["mix"].read_text())
        data["teachers"][1]["checkpoint"] = str(ckpt)  # the distilled student as a teacher
        data["teachers"][1]["model"] = str(tiny["student"])  # its architecture (tied Llama)
        write_config(cfgs[tp]["mix"].parent, data)
        out[("mix", tp)] = spawn(_distill, tp, str(cfgs[tp]["mix"]), {"llama_t": str(exported)}, timeout=900)
    return out


@pytest.mark.parametrize("name", ["qwen3", "mix"])
@pytest.mark.parametrize("tp", [1, 2])
def test_real_providers_build_the_distillation_model(runs, name, tp):
    for r in runs[(name, tp)]:
        assert r["distillation_model"] and r["model_class"] == "DistillGPTModel" and r["bundle"] and r["criterion"]
        assert r["crit_tp"] == tp
        assert r["teacher_trainable"] == 0 and r["teacher_grads"] == 0 and not r["state_dict_has_teacher"]
        # every teacher finalized (Bridge finalizes only cfg.model) and built at its own sequence length
        assert all(r["teacher_finalized"])
        assert r["teacher_seq"] == ([32] if name == "qwen3" else [32, 24])
        assert r["student_ce_impl"] == "native"
        # Bridge keeps the checkpoint's vocabulary width when the TP size divides it (else pads); ids beyond are padding
        for padded, v in zip(r["teacher_padded"], [VOCAB["qwen3"]] if name == "qwen3" else [VOCAB["phi3"], VOCAB["llama"]]):
            assert padded >= v and padded % tp == 0


@pytest.mark.parametrize("name", ["qwen3", "mix"])
@pytest.mark.parametrize("tp", [1, 2])
def test_teachers_and_student_equal_hugging_face(runs, name, tp):
    """Bridge loaded the HF weights into every model (the Phi3 teacher through the plugin's bridge, LongRoPE included)."""
    for r in runs[(name, tp)]:
        assert max(r["teacher_vs_hf"]) < 1e-5, r["teacher_vs_hf"]
        assert r["student_vs_hf"] < 1e-5


@pytest.mark.parametrize("name", ["qwen3", "mix"])
def test_training_steps_report_and_agree_across_tp(runs, name):
    logs1, logs2 = runs[(name, 1)][0]["logs"], runs[(name, 2)][0]["logs"]
    teachers = ["qwen3"] if name == "qwen3" else ["phi4_mini", "llama_t"]
    for log in logs1 + logs2:
        for key in (*B.REPORT_KEYS, *[f"kd/{t}" for t in teachers]):
            assert math.isfinite(log[key]), (key, log)
        assert log["total loss"] == pytest.approx(log["loss/n"], rel=1e-5)
        assert log["dynamic scale"] == pytest.approx(log["ce loss"] / log["logits distillation loss"], rel=1e-4)
    # same HF weights, same data: TP = 2 reproduces TP = 1 step by step
    assert [x["total loss"] for x in logs2] == pytest.approx([x["total loss"] for x in logs1], rel=2e-4)
    assert [x["logits distillation loss"] for x in logs2] == pytest.approx([x["logits distillation loss"] for x in logs1], rel=2e-4)
    if name == "mix":
        assert (logs1[0]["alpha/phi4_mini"], logs1[0]["alpha/llama_t"]) == pytest.approx((0.8, 0.2))
    first, last = sum(x["total loss"] for x in logs1[:3]), sum(x["total loss"] for x in logs1[-3:])
    assert last < first, (first, last)
    for r0, r1 in zip(*(runs[(name, 2)][k]["logs"] for k in (0, 1))):
        assert r0["total loss"] == pytest.approx(r1["total loss"], rel=1e-6)  # both TP ranks report the same loss


def test_export_hf_gives_the_trained_student(runs):
    """A checkpoint saved by Bridge's writer from the distillation model (student only) → ``xtoken export-hf`` →
    a folder transformers loads, whose logits equal the Megatron student's (saved at TP = 2, exported at TP = 1)."""
    assert runs["export_rc"] == 0
    ck = runs["checkpoint"]
    its = sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_"))
    assert its and (ck / its[-1] / "metadata.json").is_file() and (ck / its[-1] / "run_config.yaml").is_file()
    ref = runs[("qwen3", 2)][0]["probe_logits"]
    got = _hf_logits(str(runs["exported"]), PROBE)
    assert got.shape[-1] == VOCAB["llama"]
    assert (got - ref[..., : got.shape[-1]]).abs().max() < 1e-5


def test_teacher_checkpoint_is_loaded_instead_of_hf_weights(runs, tiny):
    """``teachers.N.checkpoint``: the teacher's weights come from that Megatron checkpoint (here: the distilled student)."""
    for tp in (1, 2):
        r = runs[("mix", tp)][0]
        assert r["teacher_vs_hf"][1] < 1e-5  # equal to the exported checkpoint
    trained = _hf_logits(str(runs["exported"]), PROBE)
    initial = _hf_logits(str(tiny["student"]), PROBE)
    assert (trained - initial).abs().max() > 1e-3  # the checkpoint differs from the HF weights: the test can fail


# ---- the Phi3 bridge: parity with Hugging Face and the round trip, TP 1 and 2 ----------------------------


def _phi3(rank: int, world: int, folders: dict, lengths: tuple) -> list[dict]:
    """Each Phi3 checkpoint at each configured length: logits vs HF (fp32), then Megatron → HF weights."""
    from megatron.bridge import AutoBridge

    from nemo_xtoken.integration.bridge import provider_from_hf, settle_precision
    from nemo_xtoken.cpu.bridge_te_shim import without_te
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, gather_vocab_parallel_logits, init_megatron_cpu

    init_megatron_cpu(rank, world, tensor_model_parallel_size=world, seed=0)
    out = []
    with cpu_megatron_patches():
        for tied, folder in folders.items():
            hf_sd = {k: v for k, v in torch.load(Path(folder) / "sd.pt").items()}
            for length in lengths:
                for longrope in (True, False) if tied and length == lengths[-1] else (True,):
                    prov = without_te(provider_from_hf(folder))
                    settle_precision(prov, False)
                    prov.tensor_model_parallel_size, prov.seq_length = world, length
                    if not longrope:  # what a plain-RoPE conversion would compute: must NOT match
                        prov.longrope_short_factor = prov.longrope_long_factor = None
                    prov.finalize()
                    (m,) = prov.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None)
                    m.eval()
                    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(length))
                    with torch.no_grad():
                        got = gather_vocab_parallel_logits(m(ids, torch.arange(length).expand_as(ids), None))
                    ref = _hf_logits(folder, ids)
                    r = {"tied": tied, "length": length, "longrope": longrope,
                         "diff": float((got[..., :300] - ref).abs().max()),
                         "argmax": float((got[..., :300].argmax(-1) == ref.argmax(-1)).float().mean())}
                    if longrope and length == lengths[0]:
                        exported = dict(AutoBridge.from_hf_pretrained(folder).export_hf_weights([m], cpu=True, show_progress=False))
                        r["exported"] = sorted(exported)
                        r["roundtrip_max"] = max(float((exported[k] - hf_sd[k]).abs().max()) for k in exported)
                        r["hf_keys"] = sorted(k for k in hf_sd if not (tied and k == "lm_head.weight"))
                    out.append(r)
    return out


@pytest.fixture(scope="module")
def phi3_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi3")
    folders = {}
    for tied in (True, False):
        f = write_tiny("phi3", d / f"phi3_{'tied' if tied else 'untied'}", seed=5, tied=tied, vocab=300, with_tokenizer=False)
        from transformers import AutoModelForCausalLM

        torch.save(AutoModelForCausalLM.from_pretrained(f).state_dict(), f / "sd.pt")
        folders[tied] = str(f)
    # 12 ≤ 16 = original_max_position_embeddings: short factors; 40 > 16: long factors
    return {tp: spawn(_phi3, tp, folders, (12, 40), timeout=900) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_phi3_logits_equal_hugging_face(phi3_runs, tp):
    """Fused QKV / gate-up split per TP rank, partial rotary 0.75, LongRoPE short and long, tied and untied: 1e-5 in fp32."""
    assert sum(not r["longrope"] for r in phi3_runs[tp][0]) == 1 and len(phi3_runs[tp][0]) == 5
    for r in phi3_runs[tp][0]:
        if r["longrope"]:
            assert r["diff"] < 1e-5 and r["argmax"] == 1.0, r
        else:
            assert r["diff"] > 1e-3, r  # the LongRoPE frequencies and scale matter: the test can fail


@pytest.mark.parametrize("tp", [1, 2])
def test_phi3_round_trip_is_exact(phi3_runs, tp):
    """HF → Megatron → HF gives every tensor back bit for bit (gathered from the TP shards)."""
    rows = [r for r in phi3_runs[tp][0] if "exported" in r]
    assert len(rows) == 2  # tied and untied
    for r in rows:
        assert r["exported"] == r["hf_keys"] and r["roundtrip_max"] == 0.0, r


# ---- xtoken check-model -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["student", "qwen3"])
def test_check_model_reports_parity(tiny, kind):
    from nemo_xtoken.integration.check_model import check_model

    r = check_model(str(tiny[kind]), tp=1, sequences=2, seq_length=24)
    assert r.supported and r.max_abs_logit_diff < 1e-5 and r.argmax_agreement == 1.0
    assert r.architecture == {"student": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    assert r.vocab_size == VOCAB["llama" if kind == "student" else "qwen3"] and r.padded_vocab_size >= r.vocab_size


def test_check_model_cli_json_phi3_tp2(tiny, capfd):
    from nemo_xtoken.cli.main import main

    assert main(["check-model", "--hf-model", str(tiny["phi3"]), "--tp", "2", "--sequences", "2", "--seq-length", "24", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)  # stdout holds only the JSON (Bridge's prints go to stderr)
    assert {"architecture", "supported", "max_abs_logit_diff", "argmax_agreement", "vocab_size", "padded_vocab_size"} <= set(out)
    assert out["architecture"] == "Phi3ForCausalLM" and out["bridge"] == "Phi3Bridge" and out["supported"] and out["parity"]
    assert out["max_abs_logit_diff"] < 1e-5 and out["argmax_agreement"] == 1.0 and out["vocab_size"] == VOCAB["phi3"]
    assert out["tolerance"] == pytest.approx(1e-4 + 1e-4 * out["max_abs_reference_logit"]) and out["max_abs_reference_logit"] > 0


def test_check_model_refuses_a_tp_that_does_not_divide_the_heads(tiny, capfd):
    """4 heads, 2 key/value heads, MLP 64: --tp 3 is one line and exit 2 before any model is built (was a rank's
    traceback, as SmolLM2's 9 heads at --tp 2 were); --tp 4 is valid (Megatron replicates the 2 key/value heads)."""
    from nemo_xtoken.cli.main import main
    from nemo_xtoken.integration.check_model import check_tp_divides_heads
    from transformers import AutoConfig

    assert main(["check-model", "--hf-model", str(tiny["student"]), "--tp", "3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xtoken check-model: error: --tp 3: ") and "4 attention heads, 2 key/value heads" in err[-1]
    assert err[-1].endswith("use --tp 1, 2 or 4")
    check_tp_divides_heads(AutoConfig.from_pretrained(tiny["student"]), 4, "student")  # no error


def test_check_model_unsupported_architecture_is_one_line_exit_2(tmp_path, capfd):
    from transformers import OPTConfig

    from nemo_xtoken.cli.main import main

    OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
              architectures=["OPTForCausalLM"]).save_pretrained(tmp_path / "opt")
    assert main(["check-model", "--hf-model", str(tmp_path / "opt")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xtoken check-model: error: ") and "OPTForCausalLM is not supported" in err[-1]


# ---- xtoken distill --check asks Bridge about every model ------------------------------------------------


def test_distill_check_reports_every_model_and_refuses_an_unconvertible_teacher(tiny, w_files, llama3_path, o200k_path,
                                                                                 tmp_path, capfd):
    """With resources, ``--check`` names each model's bridge (Phi3 through the plugin's); a teacher whose architecture
    Bridge cannot convert (OPT: ``AutoBridge.supports()`` says yes) is one line naming its key, exit 2."""
    from transformers import OPTConfig

    from nemo_xtoken.cli.main import main

    teachers = [{"name": "phi4_mini", "tokenizer": o200k_path, "model": str(tiny["phi3"]), "projection": w_files["phi3"],
                 "loss": "h_kl", "weight": 0.8},
                {"name": "llama_t", "tokenizer": llama3_path, "model": str(tiny["llama_t"]), "loss": "kl", "weight": 0.2}]
    write_docs(tmp_path)
    conf = write_config(tmp_path, run_config(student=tiny["student"], llama_tok=llama3_path, teachers=teachers))
    assert main(["distill", "--config", str(conf), "--check"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert {k: (v["architecture"], v["bridge"]) for k, v in report["models"].items()} == {
        "student.model": ("LlamaForCausalLM", "LlamaBridge"),
        "teachers.0.model": ("Phi3ForCausalLM", "Phi3Bridge"),
        "teachers.1.model": ("LlamaForCausalLM", "LlamaBridge"),
    }
    OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
              architectures=["OPTForCausalLM"]).save_pretrained(tmp_path / "opt")
    assert main(["distill", "--config", str(conf), "--check", "teachers.0.model=opt"]) == 2  # relative: the config's folder
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xtoken distill: error: teachers.0.model=opt: OPTForCausalLM cannot be converted by Megatron-Bridge")


# ---- resubmission: the checkpoint is found from any working directory ------------------------------------


def test_resubmitted_run_finds_its_checkpoint_from_another_working_directory(runs, tmp_path, monkeypatch):
    """Slurm starts every experiment in a new working directory: relative folders resolve against the config's."""
    from megatron.bridge.training.utils.checkpoint_utils import checkpoint_exists

    from nemo_xtoken.integration.config import load_config

    cfg_path = runs["checkpoint"].parent.parent / "run.yaml"
    cfg = load_config(cfg_path)
    assert cfg.checkpoint.save == "checkpoints/run"  # relative in the file
    monkeypatch.chdir(tmp_path)  # the next job's working directory
    kw = B.bridge_config_kwargs(cfg, base_dir=cfg_path.parent)
    assert checkpoint_exists(kw["checkpoint"]["load"])  # Bridge's resume test: it resumes
    assert not checkpoint_exists(cfg.checkpoint.save)  # the unresolved path (before the fix): it would restart at step 0
