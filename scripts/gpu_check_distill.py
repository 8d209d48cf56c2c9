#!/usr/bin/env python
"""One-shot GPU check of X-Token distillation on the real host path: Megatron-Bridge providers → ModelOpt → CUDA.

    python scripts/gpu_check_distill.py                       # CUDA run + CPU reference, compare (one GPU)
    python scripts/gpu_check_distill.py --device cpu --steps 2  # the CPU path only (what the test-suite runs)

Everything it needs is made here, offline: two byte-level BPE tokenizers trained on generated text
(a 400-id student vocabulary and a 560-id teacher one: real, different tokenizers), W built by
``build_projection``, tiny random Hugging Face checkpoints (Llama student; Qwen3 teacher with P-KL;
Phi3 teacher with partial rotary + LongRoPE and H-KL) and a run config.  Then, in one process per
device, the run's own path: ``validate_resources`` → ``build_providers`` (AutoBridge; the plugin's
Phi3 bridge) → ``convert_to_xtoken_distillation_provider`` → Bridge's ``provide_distributed_model``
(the pre-wrap hook builds the teachers, on the GPU) → ModelOpt's ``DistillationModel`` → the
plugin's dataset builder, ``forward_step`` and ``loss_func`` → AdamW steps.  The CUDA run (fp32,
TF32 off, nccl, TP = 1) must reproduce the CPU run's losses step by step (``--rtol``).

Without transformer_engine (the lent H200 has torch and Triton but no TE), Bridge is imported through
the plugin's scoped import hook (``nemo_xtoken/cpu/bridge_te_shim.py``) and uses its local layer
spec.  With TE installed (the NeMo container) the CUDA run takes the path a GPU run meets: Bridge's
TE layer spec, TE's attention reading each packed sample as one THD sequence (``PackedSeqParams``),
hence one sample per micro-batch (``micro_batch_size: 1``, 4 micro-batches accumulated per step,
packing on, as in the shipped configs); the CPU reference always builds the local spec
(:func:`layer_spec`: TE layers need CUDA).  Missing packages travel as wheels: ``make gpu-wheels``
downloads them into ``.whl/`` (see docs/megatron-bridge.md).

Exit 0 when every loss is finite and (with CUDA) within ``--rtol`` of the CPU reference; 1 otherwise.
The result is printed as a table and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are not have had but were which one all "
    "their there can been if more when will would who so no her out up said what its about than into them only other "
    "time new some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right used take three"
).split()
HIDDEN, LAYERS, HEADS, KV, FFN = 64, 2, 4, 2, 128


def corpus(n: int, seed: int) -> list[str]:
    """Generated English-like sentences with numerals (so numerals split differently per tokenizer)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(r.randint(8, 24)):
            x = r.random()
            words.append(str(r.randint(0, 2500)) if x < 0.15 else r.choice(WORDS).capitalize() if x < 0.25 else r.choice(WORDS))
        out.append(" ".join(words) + r.choice([".", "!", "?", ";"]))
    return out


def train_bpe(vocab: int, texts: list[str], specials: list[str]):
    """A byte-level BPE tokenizer (the Llama-3 / Qwen3 family) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_model(kind: str, folder: Path, vocab: int, tokenizer, seed: int) -> Path:
    """A tiny random HF checkpoint of ``kind`` with its tokenizer (``save_pretrained``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, PreTrainedTokenizerFast, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256)
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "qwen3":
        cfg = Qwen3Config(**common, head_dim=HIDDEN // HEADS, tie_word_embeddings=False)
    else:
        n = int(HIDDEN // HEADS * 0.75) // 2
        cfg = Phi3Config(**common, original_max_position_embeddings=32, partial_rotary_factor=0.75, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(n)],
                                       "long_factor": [2.0 + 1.5 * i for i in range(n)]})
    AutoModelForCausalLM.from_config(cfg).float().eval().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


def make_assets(root: Path, steps: int, teachers: tuple[str, ...] = ("qwen3", "phi3")) -> Path:
    """Tokenizers, W files, tiny checkpoints, data and one run config per teacher in ``teachers`` under ``root``
    (only what those runs read: ``--teachers phi3`` builds no Qwen3 tokenizer, model or W); returns ``root``."""
    import yaml

    from nemo_xtoken.vocab import build_projection

    texts = corpus(3000, 0)
    spec = {  # each tokenizer's vocabulary, corpus slice, special tokens; each model's architecture and seed
        "student": (400, texts, ["<|begin_of_text|>", "<|end_of_text|>"], "llama", 1),
        "qwen3": (560, texts[1000:], ["<|endoftext|>", "<|im_start|>"], "qwen3", 2),
        "phi3": (480, texts[:2000], ["<|endoftext|>", "<|end|>"], "phi3", 3),
    }
    paths, models = {}, {}
    for name in ("student", *teachers):
        vocab, part, specials, kind, seed = spec[name]
        tok = train_bpe(vocab, part, specials)
        paths[name] = root / f"{name}_tokenizer.json"
        tok.save(str(paths[name]))
        models[name] = write_model(kind, root / f"{'student' if name == 'student' else 'teacher'}_{kind}", tok.get_vocab_size(), tok, seed)
    for name in teachers:
        build_projection(str(paths["student"]), str(paths[name])).save(root / f"W_{name}.safetensors")
    with open(root / "docs.jsonl", "w") as fh:
        for t in corpus(64, 1):
            fh.write(json.dumps({"text": t}) + "\n")
    cfg = {
        "student": {"name": "student", "tokenizer": str(paths["student"]), "model": str(models["student"]), "seq_length": 48},
        "teachers": [],
        "distill": {"audit": False},
        "data": {"paths": ["docs.jsonl"], "on_too_long": "split", "seed": 0},
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_fraction": 0.0},
        # one packed sample per micro-batch (what TE's THD attention reads; `xtoken distill --check` refuses more), 4 per step
        "train": {"train_iters": steps, "global_batch_size": 4, "micro_batch_size": 1, "bf16": False, "seed": 1},
        "parallel": {"tensor_model_parallel_size": 1},
    }
    # one config per cross-tokenizer teacher (the dataset builder aligns the student with one teacher tokenizer)
    loss = {"qwen3": ("p_kl", 0.6), "phi3": ("h_kl", 1.0)}
    for name in teachers:
        cfg["teachers"] = [{"name": name, "tokenizer": str(paths[name]), "model": str(models[name]),
                            "projection": str(root / f"W_{name}.safetensors"), "loss": loss[name][0], "weight": loss[name][1],
                            "seq_length": 48}]
        (root / f"run_{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def layer_spec(device: str, te: bool) -> str:
    """``"te"`` (Bridge's transformer_engine spec) for a CUDA run where TE is installed, else ``"local"``.

    The CPU reference always builds the local spec: TE's layers need CUDA.
    """
    return "te" if device == "cuda" and te else "local"


def _run(device: str, cfg_path: str) -> dict:
    """One device: the run's path from config to AdamW steps; the reported losses per step."""
    import torch
    import torch.distributed as dist

    from nemo_xtoken.cpu import bridge_te_shim

    te = bridge_te_shim.te_available()
    bridge_te_shim.install()  # no-op with transformer_engine
    from megatron.core import parallel_state as ps
    from types import SimpleNamespace

    from nemo_xtoken.integration import bridge as B
    from nemo_xtoken.integration.config import load_config, validate_resources

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    t0 = time.time()
    base = Path(cfg_path).parent
    cfg = load_config(cfg_path)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)
        ctx = _nullcontext()
    else:
        from nemo_xtoken.cpu.megatron import cpu_megatron_patches, init_megatron_cpu

        torch.cuda.is_available = lambda: False  # this process is the CPU reference, even on a GPU machine
        init_megatron_cpu(0, 1, tensor_model_parallel_size=1, seed=cfg.train.seed)
        ctx = cpu_megatron_patches()
    with ctx:
        res = validate_resources(cfg, base_dir=base)
        student, teachers = B.build_providers(cfg, base_dir=base)
        spec = layer_spec(device, te)
        if spec == "local":
            for p in (student, *teachers):
                bridge_te_shim.without_te(p)
        B.convert_to_xtoken_distillation_provider(student, teachers, cfg, resources=res, base_dir=base)
        student.finalize()
        (model,) = student.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=device == "cpu",
                                                      mixed_precision_wrapper=None)
        build_s = time.time() - t0
        mb, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
        ds = B.build_dataset(cfg, cfg.train.train_iters * gbs, resources=res, base_dir=base)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr, weight_decay=0.0)
        model.train()
        from nemo_xtoken.data.batch import attention_kind

        attention = attention_kind(model)
        steps = []
        for step in range(cfg.train.train_iters):
            opt.zero_grad()
            sums: dict = {}
            for m in range(gbs // mb):  # micro-batches accumulated into one step, as Bridge does
                start = step * gbs + m * mb
                batch = ds.collate_fn([ds[start + j] for j in range(mb)])
                output, loss_fn = B.forward_step(SimpleNamespace(timers=None), iter([batch]), model)
                loss, n, report = loss_fn(output)
                (loss / n / (gbs // mb)).backward()
                for k, v in report.items():
                    a, b = sums.get(k, (0.0, 0.0))
                    sums[k] = (a + float(v[0]), b + float(v[1]))
            opt.step()
            steps.append({k: a / b for k, (a, b) in sums.items()})
        if device == "cuda":
            torch.cuda.synchronize()
        param_device = str(next(model.parameters()).device)
        teacher_device = str(next(model.teacher_model.parameters()).device)
    return {
        "device": device, "param_device": param_device, "teacher_device": teacher_device, "transformer_engine": te,
        "layer_spec": spec, "attention": attention, "micro_batch_size": mb, "packing": cfg.data.packing,
        "model_class": type(model).__name__, "steps": steps, "build_s": build_s, "total_s": time.time() - t0,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "torch": torch.__version__,
    }


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _child(device: str, cfg_path: str, q) -> None:
    try:
        q.put(("ok", _run(device, cfg_path)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run_in_process(device: str, cfg_path: str, timeout: float) -> dict:
    """``_run`` in a fresh, spawned process; raises with the child's traceback.

    Spawned, not forked, for the CPU run too: a fork of a process whose torch already ran a parallel
    CPU op (an OpenMP pool) can hang in the child's first parallel op.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(device, cfg_path, q))
    proc.start()
    try:
        status, payload = q.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
    if status != "ok":
        raise RuntimeError(f"the {device} run failed:\n{payload}")
    return payload


def compare(cpu: dict, dev: dict, rtol: float) -> tuple[float, bool]:
    """Largest relative difference of every reported loss over the steps, and whether it is within ``rtol``."""
    worst = 0.0
    for a, b in zip(cpu["steps"], dev["steps"]):
        for k in a:
            if k.startswith(("total loss", "lm loss", "logits distillation loss", "kd/")):
                worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
    return worst, worst <= rtol and len(cpu["steps"]) == len(dev["steps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda: CUDA run + CPU reference; cpu: CPU only")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative loss difference CUDA vs CPU (default 1e-4)")
    p.add_argument("--workdir", default=None, help="where the tokenizers, checkpoints and configs go (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--timeout", type=float, default=420, help="seconds per run (default 420)")
    p.add_argument("--teachers", default="qwen3,phi3", help="which runs: qwen3 (P-KL), phi3 (H-KL, LongRoPE); default both")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="xtoken-gpu-check-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        names = [n for n in args.teachers.split(",") if n]
        if not names or set(names) - {"qwen3", "phi3"}:
            p.error(f"--teachers: choose from qwen3, phi3, got {args.teachers!r}")
        make_assets(root, args.steps, tuple(names))
        result: dict = {"device": args.device, "assets_s": time.time() - t0, "runs": {}}
        ok = True
        for name in names:
            cfg = str(root / f"run_{name}.yaml")
            cpu = run_in_process("cpu", cfg, args.timeout)
            entry = {"cpu": cpu}
            finite = all(math.isfinite(v) for s in cpu["steps"] for v in s.values())
            if args.device == "cuda":
                dev = run_in_process("cuda", cfg, args.timeout)
                worst, same = compare(cpu, dev, args.rtol)
                finite = finite and all(math.isfinite(v) for s in dev["steps"] for v in s.values())
                entry.update(cuda=dev, max_rel_diff=worst, parity=same)
                ok = ok and same and dev["param_device"].startswith("cuda") and dev["teacher_device"].startswith("cuda")
            entry["finite"] = finite
            ok = ok and finite
            result["runs"][name] = entry
            _print(name, entry, args.rtol)
        result.update(passed=ok, total_s=time.time() - t0)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'PASS' if ok else 'FAIL'} in {result['total_s']:.0f} s")
    return 0 if ok else 1


def _print(name: str, entry: dict, rtol: float) -> None:
    cpu, dev = entry["cpu"], entry.get("cuda")
    teacher = next(k for k in cpu["steps"][0] if k.startswith("kd/"))
    print(f"\n== teacher {name} ({cpu['model_class']}; CPU build {cpu['build_s']:.1f} s"
          + (f", CUDA build {dev['build_s']:.1f} s on {dev['gpu']}, TE {dev['transformer_engine']}, {dev['layer_spec']} spec, "
             f"{dev['attention']} attention" if dev else "") + ")")
    head = f"{'step':>4} {'total (cpu)':>12} {'CE (cpu)':>10} {teacher + ' (cpu)':>16}"
    if dev:
        head += f" {'total (cuda)':>13} {'rel diff':>9}"
    print(head)
    for i, a in enumerate(cpu["steps"]):
        line = f"{i:>4} {a['total loss']:>12.6f} {a['lm loss']:>10.6f} {a[teacher]:>16.6f}"
        if dev:
            b = dev["steps"][i]
            line += f" {b['total loss']:>13.6f} {abs(a['total loss'] - b['total loss']) / abs(a['total loss']):>9.2e}"
        print(line)
    if dev:
        print(f"max relative difference over all reported losses: {entry['max_rel_diff']:.2e} (rtol {rtol:g}) -> "
              f"{'parity' if entry['parity'] else 'MISMATCH'}")


if __name__ == "__main__":
    sys.exit(main())
