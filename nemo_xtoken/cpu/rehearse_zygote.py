"""The rehearsal's rank launcher: one process imports what every rank imports, then forks the ranks.

A rank of ``xtoken rehearse`` (:mod:`nemo_xtoken.cpu.rehearse_worker`) spends most of its CPU time importing
Megatron-Bridge, megatron-core, ModelOpt and transformers (about 17 CPU-seconds on a 2-core machine),
and a rehearsal starts ``3 x nproc`` ranks.  :mod:`nemo_xtoken.cpu.rehearse` starts this process once per
rehearsal (or a caller for several in turn: ``rehearse(launcher=…)``), with the ranks' environment (hub offline, one OpenMP thread, ``CUDA_VISIBLE_DEVICES=""``) and
working directory; it imports the worker's modules exactly as a worker does (the import hooks, then
Bridge's training entry under :func:`~nemo_xtoken.cpu.cuda_shim.cuda_on_cpu`) and then reads lines on its
standard input:

- ``{"argv": [...], "env": {...}, "log": path, "status": path, "cwd": path}``: forks a rank — a new session
  (killed as one process group), the rank's own environment, working directory and log — that runs
  ``rehearse_worker.main(argv)``;
- the same with ``"entry": "module", "module": NAME``: forks ``NAME.main(argv)`` as ``python -m NAME`` would run
  it (the rehearsal's ``xtoken export-hf``: ``nemo_xtoken.cli.main``, named by the caller as its command line was
  before), which finds Bridge and transformers imported instead of importing them again (about 15 CPU-seconds);
- ``{"entry": "tokenizer", "kwargs": {...}}``: loads a tokenizer here that the ranks then take instead of each
  loading it (:func:`_share_tokenizers`); the answer is ``loaded`` (or ``failed``: the ranks load it themselves).

For a fork it writes ``<pid>`` back on a line, reaps the child and writes its exit
status (``-signal`` when killed, as ``Popen.returncode``) to ``status``.  End of input: it exits.

Nothing the ranks compute happens before the fork (only imports, with one OpenMP thread), so no thread
pool is forked; the ranks run the same code on the same inputs as separately started processes.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["main"]

_START_CWD = os.getcwd()


def _preload() -> None:
    from nemo_xtoken.cpu.imports import install_pretrain_hook
    from nemo_xtoken.cpu import bridge_te_shim

    bridge_te_shim.install()
    install_pretrain_hook()
    import torch  # noqa: F401

    from nemo_xtoken.cpu.cuda_shim import cuda_on_cpu

    with cuda_on_cpu():
        import megatron.bridge.training.pretrain  # noqa: F401

        import nemo_xtoken.cpu.rehearse_worker  # noqa: F401
        import nemo_xtoken.integration.bridge  # noqa: F401
        import nemo_xtoken.integration.config  # noqa: F401


#: Tokenizers loaded here by a ``{"entry": "tokenizer", "kwargs": {...}}`` line, by their exact
#: ``AutoTokenizer.from_pretrained`` keyword arguments; each rank takes its copy once (see :func:`_share_tokenizers`).
_TOKENIZERS: dict[str, object] = {}


def _tokenizer_key(args: tuple, kwargs: dict) -> str:
    return json.dumps([list(args), sorted(kwargs.items())], default=str)


def _share_tokenizers() -> None:
    """Let a rank take a tokenizer this launcher already loaded instead of loading it again.

    Megatron's ``HuggingFaceTokenizer`` calls ``AutoTokenizer.from_pretrained(pretrained_model_name_or_path=…,
    use_fast=…, trust_remote_code=…)`` once per rank; for a 128k vocabulary (Llama-3) that is about 4
    CPU-seconds per rank here (transformers converts and deep-copies the tokenizer).  The rehearsal asks the
    launcher to load the student's tokenizer with those arguments before the first launch; a forked rank whose
    call has exactly the same arguments gets that object (its own copy-on-write copy; the first call of the
    process only — a second call loads anew) and says so in its log.  Any other call loads as usual.
    """
    from transformers import AutoTokenizer

    load = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        tok = _TOKENIZERS.pop(_tokenizer_key(args, kwargs), None)
        if tok is None:
            return load(cls, *args, **kwargs)
        print(f"[xtoken launcher] AutoTokenizer.from_pretrained({kwargs}): the launcher's copy", file=sys.stderr, flush=True)
        return tok

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)


def _load_tokenizer(cmd: dict) -> None:
    """Load the tokenizer of a line; the ones loaded for an earlier rehearsal are dropped (one rehearsal at a time)."""
    from transformers import AutoTokenizer

    kwargs = cmd["kwargs"]
    key = _tokenizer_key((), kwargs)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(**kwargs)


def _child(cmd: dict) -> None:
    """In the forked rank: its session, environment and log, then the worker; never returns."""
    code = 1
    try:
        os.setsid()
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.environ.clear()
        os.environ.update(cmd["env"])
        if cmd.get("cwd"):  # the rank's working directory (a launcher can serve several rehearsals, one at a time)
            os.chdir(cmd["cwd"])
            sys.path[:] = [cmd["cwd"] if p == _START_CWD else p for p in sys.path]  # `python -m` put the start one first
        if cmd.get("entry", "worker") == "module":  # a command's entry named by the caller, as `python -m MODULE` would
            import importlib

            sys.argv = [cmd["module"], *cmd["argv"]]
            code = importlib.import_module(cmd["module"]).main(cmd["argv"])
        else:
            from nemo_xtoken.cpu import rehearse_worker

            sys.argv = ["python -m nemo_xtoken.cpu.rehearse_worker", *cmd["argv"]]
            code = rehearse_worker.main(cmd["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the rank's traceback goes to its log, as an uncaught exception would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:  # what an interpreter's exit does: join the non-daemon threads, run the atexit functions, flush
            import atexit
            import threading

            getattr(threading, "_shutdown", lambda: None)()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _reap(status: dict[int, str], block: bool) -> None:
    while status:
        try:
            pid, st = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = status.pop(pid, None)
        if path:
            code = os.waitstatus_to_exitcode(st)
            with open(path + ".tmp", "w") as f:
                f.write(str(code))
            os.replace(path + ".tmp", path)


def main() -> int:
    import select

    # the protocol's own copy of stdout; what the imports print goes to the log (stderr)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    _share_tokenizers()
    import gc

    # the imported modules' objects move to a permanent generation: a rank's collections (Bridge runs gc.collect()
    # at the end of training; automatic ones during it) no longer walk them, nor write to their shared pages
    gc.collect()
    gc.freeze()
    status: dict[int, str] = {}
    print("ready", file=out, flush=True)
    stdin = sys.stdin.buffer
    buf = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.2)
        _reap(status, block=False)
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the rehearsal closed the pipe: wait for the ranks still running, then exit
            _reap(status, block=True)
            return 0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd.get("entry") == "tokenizer":
                try:
                    _load_tokenizer(cmd)
                    print("loaded", file=out, flush=True)
                except Exception as e:  # noqa: BLE001 - the ranks load it themselves then
                    print(f"[xtoken launcher] could not load {cmd['kwargs']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    print("failed", file=out, flush=True)
                continue
            pid = os.fork()
            if pid == 0:
                out.close()
                _child(cmd)
            status[pid] = cmd["status"]
            print(pid, file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
