"""``xtoken rehearse``: a run config through Megatron-Bridge's own training loop on this CPU, as the Slurm job runs it.

What it does (docs/megatron-bridge.md, "Rehearsing a run on a CPU"):

1. reads the config and the ``KEY=VALUE`` overrides exactly as a run does
   (:func:`~nemo_xtoken.integration.config.load_config`);
2. shrinks only what must shrink, and prints every change: each model becomes a random model of
   the same architecture built from its own ``config.json`` (vocabulary, attention layout — query
   heads per KV head —, rotary scaling, tied embeddings kept; layers, heads, head and hidden size
   smaller: :func:`shrink_hf_config`), sequence lengths, batch sizes, steps, save interval, the
   run's folders (checkpoints, TensorBoard) and the data (the config's first documents, or a small
   real corpus when its data is not on this machine; ``data.format: preprocessed`` runs the real
   ``xtoken preprocess`` on it);
3. starts ``--nproc`` processes (gloo) from a working directory that is neither the config's nor the
   repository's, with the Hugging Face hub offline (forked, each in its own session, by one launcher process
   that imported the ranks' modules once: :mod:`nemo_xtoken.cpu.rehearse_zygote`); each runs the run's entry —
   ``build_config_container`` → Bridge's ``pretrain()`` with the plugin's ``forward_step``
   (:mod:`nemo_xtoken.cpu.rehearse_worker`) — under the scoped CUDA→CPU shim
   (:mod:`nemo_xtoken.cpu.cuda_shim`);
4. kills every rank right after the checkpoint of step ``K/2``, relaunches (the run resumes from its
   ``checkpoint.save``), finishes ``K`` steps; runs the same ``K`` steps uninterrupted and compares
   losses, weights and optimizer state (``resume_equal``);
5. exports the last checkpoint with ``xtoken export-hf`` (the command line's ``main``, forked by the same
   launcher) and compares the Hugging Face model's
   logits with the Megatron student's on a probe text.

Never run here: CUDA kernels, transformer-engine layers, NCCL (the shim replaces them).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nemo_xtoken.errors import XTokenError

__all__ = ["RehearsalError", "Change", "shrink_hf_config", "rehearse", "SHRUNK", "PROBE_TEXT"]

#: Target sizes of a rehearsal model (upper bounds; a smaller model keeps its own).
SHRUNK = {"layers": 2, "head_dim": 8, "seq_length": 64}

PROBE_TEXT = "In 2024 the 365-day plan cost $1,299.99; by 1987 only 42 people knew it."

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class RehearsalError(XTokenError):
    """A rehearsal step failed (the message names the step and, for a rank, the end of its log)."""


@dataclass
class Change:
    """One setting the rehearsal changed: the config key, the run's value, the rehearsal's, and why."""

    key: str
    run: Any
    rehearsal: Any
    why: str

    def line(self) -> str:
        return f"{self.key}: {self.run} -> {self.rehearsal} ({self.why})"

    def to_dict(self) -> dict:
        return {"key": self.key, "run": str(self.run), "rehearsal": str(self.rehearsal), "why": self.why}


# ---- models -----------------------------------------------------------------------------------------


def shrink_hf_config(hf_config: Any, tp: int) -> tuple[Any, list[str]]:
    """A copy of a Hugging Face config with the same architecture, small: returns ``(config, notes)``.

    Kept: ``model_type``/architecture, ``vocab_size``, ``tie_word_embeddings``, the attention layout
    (query heads per KV head), ``rope_scaling`` (type and values; per-dimension factor lists such as
    LongRoPE's cut to the new rotary width), ``partial_rotary_factor``, norms and activations.
    Smaller: ``num_hidden_layers`` (≤ 2), KV heads (the tensor-parallel size, or fewer if the model
    has fewer), head dimension (≤ 8), hidden and MLP sizes (derived).
    """
    c = copy.deepcopy(hf_config)
    notes: list[str] = []

    def setv(name: str, value: Any) -> None:
        old = getattr(c, name, None)
        if old != value:
            notes.append(f"{name} {old}->{value}")
            setattr(c, name, value)

    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    group = max(1, heads // kv)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    new_kv = min(kv, max(1, tp))
    new_heads = new_kv * group
    new_head_dim = min(head_dim, SHRUNK["head_dim"])
    partial = float(getattr(c, "partial_rotary_factor", 1.0) or 1.0)
    if int(new_head_dim * partial) % 2:  # the rotary width must stay even
        new_head_dim = head_dim
    setv("num_hidden_layers", min(int(c.num_hidden_layers), SHRUNK["layers"]))
    setv("num_attention_heads", new_heads)
    setv("num_key_value_heads", new_kv)
    if getattr(c, "head_dim", None) is not None:
        setv("head_dim", new_head_dim)
    if (new_heads, new_head_dim) != (heads, head_dim):
        setv("hidden_size", new_heads * new_head_dim)
    setv("intermediate_size", min(int(c.intermediate_size), 2 * int(c.hidden_size)))
    rs = getattr(c, "rope_scaling", None)
    if isinstance(rs, dict):
        n = int(new_head_dim * partial) // 2
        new_rs = dict(rs)
        for k, v in rs.items():
            if isinstance(v, (list, tuple)) and len(v) > n:
                new_rs[k] = list(v)[:n]
                notes.append(f"rope_scaling.{k}: first {n} of {len(v)} factors (rotary width {2 * n})")
        if new_rs != rs:
            c.rope_scaling = new_rs
            if hasattr(c, "rope_parameters") and isinstance(getattr(c, "rope_parameters"), dict):
                rp = dict(c.rope_parameters)
                for k in new_rs:
                    if k in rp:
                        rp[k] = new_rs[k]
                c.rope_parameters = rp
    layer_types = getattr(c, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != c.num_hidden_layers:
        c.layer_types = layer_types[: c.num_hidden_layers]
    return c, notes


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return str(p)


def _read_hf_config(model: str, key: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the message names the model and the fix
        raise RehearsalError(
            f"{key}: cannot read the config.json of {model!r} from a folder or the local Hugging Face cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the rehearsal runs offline: give a local "
            f"folder ({key}=DIR) or download the model's config.json into the cache first"
        ) from None


def _copy_tokenizer(model_src: str, tokenizer_spec: str, base: Path, out: Path) -> None:
    """Put the student's tokenizer into its rehearsal model folder (Bridge's tokenizer and the export read it there)."""
    src = Path(model_src)
    if src.is_dir() and (src / "tokenizer.json").is_file():
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
        return
    tok = Path(_resolve(tokenizer_spec, base))
    if tok.is_file():
        shutil.copy(tok, out / "tokenizer.json")
        for name in _TOKENIZER_FILES[1:]:
            if (tok.parent / name).is_file():
                shutil.copy(tok.parent / name, out / name)
    elif tok.is_dir():
        for name in _TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy(tok / name, out / name)
    else:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(tokenizer_spec, local_files_only=True).save_pretrained(out)
        except Exception as e:  # noqa: BLE001
            raise RehearsalError(f"student.tokenizer: {tokenizer_spec!r} is not a file, folder or cached hub tokenizer ({e})") from None
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def _write_model(hf_config: Any, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(out)


# ---- data ---------------------------------------------------------------------------------------------


def _data_here(path: str, base: Path) -> Path | None:
    """A ``data.paths`` entry resolved as the run resolves it (the config's folder), or None where it is not on this machine."""
    from nemo_xtoken.integration.config import ConfigError
    from nemo_xtoken.integration.data import _resolve_path

    try:
        return _resolve_path(path, base)
    except ConfigError:  # missing, or found only from the working directory: the run would not find it either
        return None


def _rehearsal_texts(cfg: Any, base: Path, n: int) -> tuple[list[str], str]:
    """Up to ``n`` documents: the config's own (jsonl) if they are here, else a real corpus from the asset cache."""
    if cfg.data.format == "jsonl":
        texts: list[str] = []
        for p in filter(None, (_data_here(x, base) for x in cfg.data.paths)):
            files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p] if p.is_file() else []
            for f in files:
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        if line.strip():
                            t = json.loads(line).get(cfg.data.text_key)
                            if isinstance(t, str) and t.strip():
                                texts.append(t)
                        if len(texts) >= n:
                            return texts, f"the first {n} documents of data.paths"
        if texts:
            return texts, f"the {len(texts)} documents of data.paths"
    from nemo_xtoken.assets import cache_dir

    corpus = cache_dir() / "text" / "sotu.jsonl"
    if corpus.is_file():
        from nemo_xtoken.data.corpus import short_passages

        return short_passages(corpus, n, max_chars=600), f"{n} passages of {corpus} (data.paths is not on this machine)"
    return [PROBE_TEXT + f" Document {i}: " + "The quick brown fox jumps over the lazy dog. " * 6 for i in range(n)], (
        f"{n} built-in sentences (data.paths is not on this machine and no text corpus is cached)")


def _prepare_data(cfg: Any, base: Path, work: Path, student_tok: str, overrides: list[str], changes: list[Change]) -> None:
    from nemo_xtoken.data.corpus import write_jsonl

    d = cfg.data
    here = bool(d.paths) and all(_data_here(p, base) is not None for p in d.paths)
    if d.format == "preprocessed" and here:
        return  # memory-mapped `xtoken preprocess` folders: read as the run reads them
    texts, what = _rehearsal_texts(cfg, base, 48)
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(texts, folder / "rehearsal.jsonl")
    if d.format == "preprocessed":
        from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess

        outs = []
        seen: dict[str, Path] = {}
        for i, t in enumerate(cfg.teachers):
            if t.loss == "kl" or t.cache is not None:
                continue
            tok = _resolve(t.tokenizer, base)
            if tok in seen:
                continue
            out = folder / f"preprocessed_{i}"
            preprocess(src, out, PreprocessOptions(student_tokenizer=student_tok, teacher_tokenizer=tok, field="text"),
                       workers=1, progress=False, overwrite=True)
            seen[tok] = out
            outs.append(str(out))
        overrides.append(f"data.paths={json.dumps(outs)}")
        changes.append(Change("data.paths", d.paths, outs, f"`xtoken preprocess` of {what}"))
    else:
        overrides += [f"data.paths={json.dumps([str(src)])}", "data.format=jsonl", "data.text_key=text"]
        changes.append(Change("data.paths", d.paths, [str(src)], what))
        if d.format != "jsonl":
            changes.append(Change("data.format", d.format, "jsonl", "the rehearsal's documents are a jsonl file"))


# ---- processes ----------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(nproc: int, port: int, rank: int) -> dict[str, str]:
    import nemo_xtoken

    pkg_root = str(Path(nemo_xtoken.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    keep = [ln for ln in lines if ln.strip()]
    return "\n".join(keep[-n:])


def _first_error(path: Path) -> str:
    """The exception line of a rank's log (``XError: …``), for a one-line failure.

    torch's elastic error handler prefixes the failing exception's lines with ``[rankN]:``; those win
    over later exit-time noise (a DataLoader shutting down its workers).
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"

    def is_error(s: str) -> bool:
        head = s.split(":", 1)[0]
        return bool(s) and (head.endswith(("Error", "Exception")) or head.startswith(("AssertionError", "XTokenError")))

    for prefixed in (True, False):
        for ln in reversed(lines):
            if prefixed and not ln.startswith("[rank"):
                continue
            s = ln.split("]: ", 1)[-1].strip() if prefixed else ln.strip()
            if is_error(s):
                return s
    return lines[-1].strip() if lines else "empty log"


class _Launcher:
    """The rehearsal's :mod:`~nemo_xtoken.cpu.rehearse_zygote`: started once (in ``cwd``, with the ranks' environment),
    it imports what a rank imports and forks each rank (its own session, environment and log)."""

    def __init__(self, nproc: int, cwd: Path, log_path: Path, timeout: float) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self.cwd = log_path, cwd
        self._log = open(log_path, "w")
        env = _env(nproc, 0, 0)
        self.proc = subprocess.Popen([sys.executable, "-m", "nemo_xtoken.cpu.rehearse_zygote"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        self._timeout, self._ready, self._pending = timeout, False, 0  # it imports while the caller prepares; start() waits

    def wait_ready(self) -> None:
        """Wait until the launcher has imported the ranks' modules (raises with its log if it failed)."""
        if not self._ready:
            self._expect("ready", self._timeout)
            self._ready = True
        while self._pending:  # the answers to load_tokenizer ("loaded", or "failed": the ranks load it themselves)
            self._expect("loaded", self._timeout)
            self._pending -= 1

    def _expect(self, what: str, timeout: float) -> str:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line or (what in ("ready", "loaded") and line not in ("ready", "loaded", "failed")):
            self.close()
            raise RehearsalError(f"the rank launcher (python -m nemo_xtoken.cpu.rehearse_zygote) "
                                 f"{'did not start' if what == 'ready' else f'did not answer ({what})'}: "
                                 f"{_first_error(self.log_path)}\n--- end of its log ({self.log_path}) ---\n{_tail(self.log_path)}")
        return line

    def start(self, argv: list[str], env: dict[str, str], log: Path, status: Path, module: str | None = None,
              cwd: Path | None = None) -> int:
        """Fork a rank (or, with ``module``, ``module.main(argv)`` as ``python -m module`` runs it) with ``argv`` in
        ``cwd`` (default: the launcher's); returns its pid."""
        self.wait_ready()
        cmd = {"argv": argv, "env": env, "log": str(log), "status": str(status), "cwd": str(cwd or self.cwd),
               **({"entry": "module", "module": module} if module else {"entry": "worker"})}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return int(self._expect("pid", 120.0))

    def load_tokenizer(self, **kwargs: Any) -> None:
        """Have the launcher load ``AutoTokenizer.from_pretrained(**kwargs)`` once (while the caller goes on); a rank
        making exactly that call takes the launcher's copy (:func:`nemo_xtoken.cpu.rehearse_zygote._share_tokenizers`)."""
        self.proc.stdin.write((json.dumps({"entry": "tokenizer", "kwargs": kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        self._pending += 1

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _launch(label: str, nproc: int, config: str, overrides: list[str], out: Path, cwd: Path, *, launcher: _Launcher,
            stop_after_save: int = 0, probe: list[int] | None = None, timeout: float, log: Callable[[str], None]) -> float:
    """Run the worker on ``nproc`` ranks; with ``stop_after_save`` kill them all once that checkpoint is written."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    t0 = time.time()
    cmd_tail = ["--config", config, "--out", str(out)]
    if stop_after_save:
        cmd_tail += ["--stop-after-save", str(stop_after_save)]
    if probe is not None:
        cmd_tail += ["--probe", json.dumps(probe)]
    procs: list[tuple[int, Path]] = []

    def code(r: int) -> int | None:
        f = procs[r][1]
        return int(f.read_text()) if f.is_file() else None

    def kill_all() -> None:
        for r, (pid, _) in enumerate(procs):
            if code(r) is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        t_kill = time.time()
        while any(code(r) is None for r in range(len(procs))) and time.time() - t_kill < 60:
            time.sleep(0.05)  # the launcher reaps them

    try:
        for r in range(nproc):
            status = out / f"exit.rank{r}"
            status.unlink(missing_ok=True)
            procs.append((launcher.start([*cmd_tail, "--", *overrides], _env(nproc, port, r), out / f"rank{r}.log", status, cwd=cwd),
                          status))
        log(f"[rehearse] {label}: {nproc} ranks started (cwd {cwd})")
        while True:
            time.sleep(0.2)
            codes = [code(r) for r in range(nproc)]
            if stop_after_save and all((out / f"stopped_{stop_after_save}.rank{r}").exists() for r in range(nproc)):
                kill_all()
                log(f"[rehearse] {label}: every rank killed after the checkpoint of step {stop_after_save}")
                return time.time() - t0
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                r = bad[0]
                kill_all()
                raise RehearsalError(f"{label}: rank {r} exited with {codes[r]}: {_first_error(out / f'rank{r}.log')}\n"
                                     f"--- end of rank {r}'s log ({out / f'rank{r}.log'}) ---\n{_tail(out / f'rank{r}.log')}")
            if all(c == 0 for c in codes):
                if stop_after_save:
                    raise RehearsalError(f"{label}: the ranks finished before the checkpoint of step {stop_after_save} was written")
                return time.time() - t0
            if time.time() - t0 > timeout:
                kill_all()
                raise RehearsalError(f"{label}: no result after {timeout:.0f} s (raise --timeout); end of rank 0's log:\n"
                                     f"{_tail(out / 'rank0.log')}")
    except BaseException:
        kill_all()
        raise


def _losses(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ---- comparisons --------------------------------------------------------------------------------------


def _checkpoint_state(iter_dir: Path, scratch: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    f = scratch / f"{iter_dir.parent.parent.name}_{iter_dir.name}.pt"
    dcp_to_torch_save(str(iter_dir), str(f))
    return torch.load(f, weights_only=False)


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{key or '<root>'}: keys differ ({sorted(set(a) ^ set(b))[:4]})"
        for k in sorted(a, key=str):
            d = _first_difference(a[k], b[k], f"{key}/{k}" if key else str(k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{key}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{key}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            return f"{key}: values differ (max |diff| {diff})"
        return None
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return None if np.array_equal(np.asarray(a), np.asarray(b)) else f"{key}: arrays differ"
    if a != b:
        return f"{key}: {a!r} vs {b!r}"
    return None


def _export_parity(ckpt: Path, student_dir: Path, probe: list[int], megatron_logits: Path, export_dir: Path, cwd: Path,
                   log: Callable[[str], None], bf16: bool, launcher: _Launcher, timeout: float) -> tuple[float, float, float]:
    """``xtoken export-hf`` of ``ckpt`` (the command line's own ``main``, forked by the launcher with a user's
    environment and working directory), then HF logits vs the Megatron student's."""
    import torch
    from transformers import AutoModelForCausalLM

    argv = ["export-hf", "--checkpoint", str(ckpt), "--hf-model", str(student_dir), "--output", str(export_dir)]
    out_log, status = export_dir.parent / "export.log", export_dir.parent / "export.exit"
    status.unlink(missing_ok=True)
    launcher.start(argv, _env(1, _free_port(), 0), out_log, status, module="nemo_xtoken.cli.main", cwd=cwd)
    t0 = time.time()
    while not status.is_file():
        if time.time() - t0 > timeout:
            raise RehearsalError(f"xtoken export-hf of {ckpt}: no result after {timeout:.0f} s; end of its log ({out_log}):\n"
                                 f"{_tail(out_log)}")
        time.sleep(0.1)
    code = int(status.read_text())
    if code != 0:
        raise RehearsalError(f"xtoken export-hf of {ckpt} failed ({code}): {_first_error(out_log)}\n"
                             f"--- end of its log ({out_log}) ---\n{_tail(out_log)}")
    wrote = [ln for ln in out_log.read_text(errors="replace").splitlines() if ln.startswith("wrote ")]
    log(f"[rehearse] {wrote[-1] if wrote else 'exported'}")
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([probe])).logits.float()[0]
    mg = torch.load(megatron_logits)[0].float()[:, : ref.shape[-1]]
    diff = (mg - ref).abs().max().item()
    scale = ref.abs().max().item()
    # fp32: Megatron's and HF's kernels differ in summation order only; bf16: the Megatron forward runs in bf16
    tol = (0.05 + 0.02 * scale) if bf16 else (1e-4 + 1e-4 * scale)
    return diff, tol, float((mg.argmax(-1) == ref.argmax(-1)).float().mean())


# ---- the rehearsal ------------------------------------------------------------------------------------


def rehearse(config: str, overrides: list[str] | None = None, *, nproc: int = 2, steps: int = 4, workdir: str | None = None,
             timeout: float = 900.0, log: Callable[[str], None] = print, launcher: _Launcher | None = None) -> dict:
    """Rehearse ``config`` (see the module doc); returns the JSON report.  Raises :class:`RehearsalError` on a failure.

    ``launcher``: a running :class:`_Launcher` to fork the ranks from (the caller closes it; several rehearsals, one after
    the other, can share one: tests/test_rehearse.py); default: one started for this rehearsal, in its ``cwd``.
    """
    from nemo_xtoken.integration.config import load_config

    t_start = time.time()
    overrides = list(overrides or [])
    cfg_path = Path(config).resolve()
    cfg = load_config(cfg_path, overrides)
    base = cfg_path.parent
    p = cfg.parallel
    tp = p.tensor_model_parallel_size
    if nproc < 1 or nproc % (tp * p.pipeline_model_parallel_size * p.context_parallel_size):
        raise RehearsalError(f"--nproc {nproc} is not a multiple of the run's model-parallel size (TP {tp} x PP "
                             f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size}): use --nproc {tp} or {2 * tp}")
    if steps < 2 or steps % 2:
        raise RehearsalError(f"--steps {steps}: give an even number >= 2 (the run is killed after step {max(1, steps // 2)})")
    dp = nproc // tp
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="xtoken-rehearse-"))
    work.mkdir(parents=True, exist_ok=True)
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    import nemo_xtoken

    repo = Path(nemo_xtoken.__file__).resolve().parent.parent
    for other, what in ((base, "the config's folder"), (repo, "the repository")):
        if cwd == other or other in cwd.parents:
            raise RehearsalError(f"--workdir {work} is inside {what} ({other}): the ranks must start elsewhere, as under Slurm")
    log(f"[rehearse] {cfg_path} on {nproc} CPU processes (TP {tp} x DP {dp}); work folder {work}")
    # one launcher imports what the ranks import, once (while the models and data are prepared here), and forks
    # every rank of the three launches and the export
    own = launcher is None
    if own:
        launcher = _Launcher(nproc, cwd, work / "runs" / "launcher.log", timeout)
    try:
        return _rehearse(cfg, cfg_path, overrides, base, nproc, tp, dp, steps, work, cwd, launcher, timeout, log, t_start)
    finally:
        if own:
            launcher.close()


def _rehearse(cfg: Any, cfg_path: Path, overrides: list[str], base: Path, nproc: int, tp: int, dp: int, steps: int, work: Path,
              cwd: Path, launcher: _Launcher, timeout: float, log: Callable[[str], None], t_start: float) -> dict:
    from nemo_xtoken.integration.config import load_config

    ov: list[str] = []
    changes: list[Change] = []
    # models: random, same architecture, small
    models = work / "models"
    live = [("student", cfg.student.model, cfg.student.name)] + [
        (f"teachers.{i}", t.model, t.name) for i, t in enumerate(cfg.teachers) if t.cache is None]
    student_dir = None
    for j, (key, spec, name) in enumerate(live):
        if not spec:
            raise RehearsalError(f"{key}.model is not set: the run builds every model from a Hugging Face id or folder")
        src = _resolve(spec, base)
        hfc = _read_hf_config(src, f"{key}.model")
        small, notes = shrink_hf_config(hfc, tp)
        out = models / f"{j}_{name}"
        if out.exists():
            shutil.rmtree(out)
        _write_model(small, out, seed=1000 + j)
        if key == "student":
            _copy_tokenizer(src, cfg.student.tokenizer, base, out)
            student_dir = out
            # the ranks' Megatron tokenizer (HuggingFaceTokenizer's call), loaded once by the launcher
            # (Bridge's TokenizerConfig defaults: use_fast True, trust_remote_code False)
            launcher.load_tokenizer(pretrained_model_name_or_path=str(out), use_fast=True, trust_remote_code=False)
        arch = (getattr(hfc, "architectures", None) or [type(hfc).__name__])[0]
        ov.append(f"{key}.model={out}")
        changes.append(Change(f"{key}.model", spec, out, f"random {arch} of the same architecture: {', '.join(notes) or 'already small'}"))
        if key == "student" and cfg.student.checkpoint:
            ov.append("student.checkpoint=null")
            changes.append(Change("student.checkpoint", cfg.student.checkpoint, None, "the real model's weights do not fit the small one"))
        if key.startswith("teachers.") and cfg.teachers[int(key.split(".")[1])].checkpoint:
            ov.append(f"{key}.checkpoint=null")
            changes.append(Change(f"{key}.checkpoint", cfg.teachers[int(key.split('.')[1])].checkpoint, None,
                                  "the real model's weights do not fit the small one"))
    # lengths, batches, steps, folders
    s_old = cfg.student.seq_length
    s_new = min(s_old, SHRUNK["seq_length"])
    s_new -= s_new % tp
    if s_new != s_old:
        ov.append(f"student.seq_length={s_new}")
        changes.append(Change("student.seq_length", s_old, s_new, "small model, fast steps"))
    for i, t in enumerate(cfg.teachers):
        t_old = cfg.teacher_seq_length(t)
        t_new = max(tp, int(math.ceil(s_new * t_old / s_old / tp)) * tp)
        if t_new != t_old or t.seq_length is None and s_new != s_old:
            ov.append(f"teachers.{i}.seq_length={t_new}")
            changes.append(Change(f"teachers.{i}.seq_length", t_old, t_new, "the student's ratio kept"))
    mbs = cfg.train.micro_batch_size
    gbs = mbs * dp * 2
    for key, old, new, why in (
        ("train.train_iters", cfg.train.train_iters, steps, f"killed after step {steps // 2}, resumed to {steps}"),
        ("train.global_batch_size", cfg.train.global_batch_size, gbs, f"micro-batch {mbs} x DP {dp} x 2 accumulation steps"),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval, steps // 2, "a checkpoint before the kill"),
        ("logging.log_interval", cfg.logging.log_interval, 1, "every step logged"),
    ):
        if old != new:
            ov.append(f"{key}={new}")
            changes.append(Change(key, old, new, why))
    if cfg.checkpoint.load:
        ov.append("checkpoint.load=null")
        changes.append(Change("checkpoint.load", cfg.checkpoint.load, None, "the rehearsal resumes from its own checkpoint.save"))
    if cfg.logging.wandb_project:
        ov.append("logging.wandb_project=null")
        changes.append(Change("logging.wandb_project", cfg.logging.wandb_project, None, "offline"))
    _prepare_data(cfg, base, work, _resolve(cfg.student.tokenizer, base), ov, changes)
    cpu = [
        Change("dist.distributed_backend", "nccl", "gloo", "CPU"),
        Change("model.transformer_layer_spec (every model)", "transformer-engine spec", "Bridge's local spec", "no transformer_engine on a CPU"),
        Change("model fusions (every model)", "provider defaults", "off (bias_activation, masked_softmax, bias_dropout, rope, "
               "gradient_accumulation, cross_entropy, persist_layer_norm)", "TE/Apex/CUDA kernels"),
        Change("CUDA", "GPU", "CPU (nemo_xtoken.cpu.cuda_shim)", "every CUDA allocation, stream, event, RNG and memory query redirected"),
        Change("checkpoint writer's result queue (megatron-core filesystem_async)", "a manager started with spawn at the first save",
               "started with fork before training", "a spawned manager re-imports torch (~10 CPU-s per rank); Bridge's async saves fork it too"),
    ]

    def run_overrides(name: str) -> list[str]:
        d = work / "runs" / name
        return [*overrides, *ov, f"checkpoint.save={d / 'checkpoints'}", f"logging.tensorboard_dir={d / 'tb'}"]

    changes.append(Change("checkpoint.save", cfg.checkpoint.save, work / "runs" / "<run>" / "checkpoints", "rehearsal folders"))
    changes.append(Change("logging.tensorboard_dir", cfg.logging.tensorboard_dir, work / "runs" / "<run>" / "tb", "rehearsal folders"))
    for c in changes + cpu:
        log(f"[rehearse] change: {c.line()}")
    load_config(cfg_path, run_overrides("resumed"))  # the rehearsal's own settings must be a valid config too

    from transformers import AutoTokenizer

    probe = AutoTokenizer.from_pretrained(student_dir).encode(PROBE_TEXT)[: min(32, s_new)]
    half = steps // 2
    seconds: dict[str, float] = {}
    common = dict(timeout=timeout, log=log, launcher=launcher)
    seconds["first launch (killed)"] = _launch("launch 1", nproc, str(cfg_path), run_overrides("resumed"),
                                               work / "runs" / "resumed" / "launch1", cwd, stop_after_save=half, **common)
    ckpt_a = work / "runs" / "resumed" / "checkpoints"
    from nemo_xtoken.integration.bridge import resolve_checkpoint

    killed_at = resolve_checkpoint(ckpt_a, key="rehearsal checkpoint")
    seconds["relaunch (resumes)"] = _launch("launch 2 (resume)", nproc, str(cfg_path), run_overrides("resumed"),
                                            work / "runs" / "resumed" / "launch2", cwd, probe=probe, **common)
    seconds["uninterrupted"] = _launch("uninterrupted run", nproc, str(cfg_path), run_overrides("straight"),
                                       work / "runs" / "straight" / "launch", cwd, **common)
    first = _losses(work / "runs" / "resumed" / "launch1" / "losses.jsonl")
    second = _losses(work / "runs" / "resumed" / "launch2" / "losses.jsonl")
    straight = _losses(work / "runs" / "straight" / "launch" / "losses.jsonl")
    resumed_step = (second[0]["step"] - 1) if second else None
    combined = [r for r in first if r["step"] <= half] + second
    problems = []
    if resumed_step != half:
        problems.append(f"the relaunch started at step {resumed_step}, not after the checkpoint of step {half}")
    if [r["step"] for r in combined] != list(range(1, steps + 1)):
        problems.append(f"steps logged {[r['step'] for r in combined]}, expected 1..{steps}")
    if [r["step"] for r in straight] != list(range(1, steps + 1)):
        problems.append(f"uninterrupted run logged steps {[r['step'] for r in straight]}")
    loss_diff = _first_difference(combined, straight)
    ckpt_b = work / "runs" / "straight" / "checkpoints"
    last_a, last_b = resolve_checkpoint(ckpt_a), resolve_checkpoint(ckpt_b)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    state_a, state_b = _checkpoint_state(last_a, scratch), _checkpoint_state(last_b, scratch)
    # RNG states are reported, not required equal: the relaunch's DataLoader draws its worker seed from the
    # CPU generator (on a GPU too), and under the shim the "CUDA" generator is the CPU one
    rng_diff = _first_difference({k: v for k, v in state_a.items() if k.startswith("rng_state")},
                                 {k: v for k, v in state_b.items() if k.startswith("rng_state")})
    state_diff = _first_difference({k: v for k, v in state_a.items() if not k.startswith("rng_state")},
                                   {k: v for k, v in state_b.items() if not k.startswith("rng_state")})
    resume_equal = loss_diff is None and state_diff is None and not problems
    if loss_diff:
        problems.append(f"losses after resume differ from the uninterrupted run: {loss_diff}")
    if state_diff:
        problems.append(f"the resumed run's last checkpoint differs from the uninterrupted run's: {state_diff}")
    t_exp = time.time()
    diff, tol, argmax = _export_parity(last_a, student_dir, probe, work / "runs" / "resumed" / "launch2" / "probe_logits.pt",
                                       work / "export", cwd, log, cfg.train.bf16, launcher, timeout)
    seconds["export + parity"] = time.time() - t_exp
    if not diff <= tol:
        problems.append(f"exported Hugging Face logits differ from the Megatron student's by {diff:.3g} (tolerance {tol:.3g})")
    kd_keys = sorted(k for k in (combined[0] if combined else {}) if k.startswith("kd/"))
    report = {
        "steps": steps,
        "losses": [r.get("total loss") for r in combined],
        "kd_losses": {k[3:]: [r.get(k) for r in combined] for k in kd_keys},
        "checkpoints": sorted(str(c) for c in ckpt_a.iterdir() if c.is_dir() and c.name.startswith("iter_")),
        "killed_after": str(killed_at),
        "resumed_step": resumed_step,
        "resume_equal": resume_equal,
        "resume_compared": f"{len(state_a) - sum(k.startswith('rng_state') for k in state_a)} checkpoint entries (weights, "
                           f"optimizer state, common state) and {len(combined)} steps of losses",
        "rng_state_difference": rng_diff,
        "export_max_abs_logit_diff": diff,
        "export_tolerance": tol,
        "export_argmax_agreement": argmax,
        "changes": [c.to_dict() for c in changes + cpu],
        "nproc": nproc,
        "tp": tp,
        "dp": dp,
        "workdir": str(work),
        "seconds": round(time.time() - t_start, 1),
        "seconds_by_phase": {k: round(v, 1) for k, v in seconds.items()},
        "problems": problems,
    }
    return report
