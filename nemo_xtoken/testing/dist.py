"""Run a function on ``world_size`` gloo processes (CPU), as tensor-parallel tests need.

Each child (forked from a fork server that imported torch and the losses once: :func:`_context`) initialises
``torch.distributed`` with a file store (no TCP port to race for), calls
``fn(rank, world_size, *args)`` and reports back through a queue: its return value (plain
data, tensors and containers of them; tensors travel by value as numpy arrays) or its formatted traceback.  The
parent re-raises the first failure as an ``AssertionError`` carrying the child's traceback, so
a failed assertion inside a child fails the calling test with the real message.
"""

from __future__ import annotations

import os
import queue as queue_mod
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_distributed"]


def _to_plain(x: Any, to_numpy: bool) -> Any:
    """Tensors ↔ numpy arrays, recursively: results cross the process boundary by value."""
    import numpy as np
    import torch

    if to_numpy and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return ("__tensor__", str(t.dtype), t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    if not to_numpy and isinstance(x, tuple) and len(x) == 3 and x[0] == "__tensor__":
        t = torch.from_numpy(np.asarray(x[2]))
        return t.to(getattr(torch, x[1].replace("torch.", "")))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_plain(v, to_numpy) for v in x)
    if isinstance(x, dict):
        return {k: _to_plain(v, to_numpy) for k, v in x.items()}
    return x


def _child(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple, q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
            q.put((rank, True, _to_plain(result, True)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        q.put((rank, False, traceback.format_exc()))


#: What the fork server imports once (and every rank then has): torch, numpy and the loss packages, plus the module of
#: the first function run (a test module and what it imports).
_PRELOAD = ["torch", "torch.distributed", "numpy", "nemo_xtoken.losses", "nemo_xtoken.parallel"]


def _context(fn: Callable[..., Any]):
    """A fork-server context: the ranks are forked from one clean single-threaded server process that imported
    ``_PRELOAD`` and the first caller's module once, instead of each rank importing them again (a spawned rank: 2-16
    CPU-seconds of imports; a test module that imports modelopt: ~10 more per rank and call).  The server is not
    restarted for later modules: restarting costs ~2.5 CPU-seconds of imports, a light test module ~0.1 per rank (in
    file order, ``test_integration_tp_exchange``, the one heavy module, comes first).  The server never runs a
    parallel op, so no OpenMP pool is forked."""
    ctx = mp.get_context("forkserver")
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is None:  # not started yet: name what it imports, and from where
        module = getattr(fn, "__module__", None)
        ctx.set_forkserver_preload(["nemo_xtoken.testing._forkserver_path"] + _PRELOAD + [m for m in (module,) if m and m != "__main__"])
        os.environ["XTOKEN_FORKSERVER_SYS_PATH"] = os.pathsep.join(sys.path)  # where pytest found the test module
        try:
            server.ensure_running()
        finally:
            del os.environ["XTOKEN_FORKSERVER_SYS_PATH"]
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``fn`` must be importable (a module-level function).  A child's exception or assertion
    failure is re-raised in the parent with the child's traceback; a hang past ``timeout``
    seconds raises too (and the children are terminated).
    """
    ctx = _context(fn)
    q = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="xtoken_dist_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    procs = [ctx.Process(target=_child, args=(r, world_size, init_file, fn, args, q), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = q.get(timeout=timeout)
            except queue_mod.Empty:
                raise AssertionError(f"run_distributed: no answer from a rank within {timeout}s (deadlock in a collective?)") from None
            if ok:
                results[rank] = _to_plain(payload, False)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks may now hang in a collective: stop them below
    finally:
        if failures or len(results) < world_size:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
        if os.path.exists(init_file):
            os.unlink(init_file)
    if failures:
        raise AssertionError("a distributed rank failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
