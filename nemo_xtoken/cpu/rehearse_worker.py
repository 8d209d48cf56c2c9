"""One rank of ``xtoken rehearse``: the run's own entry (config → ``build_config_container`` → Bridge ``pretrain()``
with the plugin's ``forward_step``) on the CPU, under :func:`~nemo_xtoken.cpu.cuda_shim.cuda_on_cpu`.

Started by :mod:`nemo_xtoken.cpu.rehearse` (one process per rank, ``RANK``/``WORLD_SIZE``/``MASTER_*``
set), never by hand.  The only CPU-specific settings are the ones a machine without a GPU forces and
that the rehearsal prints: gloo instead of NCCL, Bridge's local (non-TE) layer spec for every model,
the fused TE/Apex kernels off, and the checkpoint writer's result queue started with ``fork`` (as Bridge's
asynchronous saves start it) instead of ``spawn``.  A callback records every step's reduced losses (rank 0), and at
``--stop-after-save S`` marks the checkpoint of step ``S`` as written and waits to be killed; at the
end of training it writes the student's logits on a probe (all TP ranks gathered) for the export check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemo_xtoken.cpu.rehearse_worker")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, help="folder for losses/markers/probe logits")
    p.add_argument("--stop-after-save", type=int, default=0)
    p.add_argument("--probe", default=None, help="JSON list of student token ids: logits written at the end")
    return p


def _cpu_settings(container) -> None:
    """What a CPU forces on the run (printed by the parent as changes): gloo, local layer spec, no TE fusions."""
    from nemo_xtoken.cpu.bridge_te_shim import without_te

    container.dist.distributed_backend = "gloo"
    student = container.model
    for prov in [student, *(t for t in getattr(student, "xtoken_teachers", []) if t is not None)]:
        without_te(prov)


def _callbacks(out: Path, stop_after_save: int, probe: list[int] | None):
    from megatron.bridge.training.callbacks import Callback

    rank = int(os.environ.get("RANK", "0"))

    class Rehearsal(Callback):
        def on_train_step_end(self, context):  # noqa: D102
            if rank != 0 or context.loss_dict is None:
                return
            row = {"step": int(context.state.train_state.step) + 1,  # the iteration just finished (1-based, as logged)
                   **{k: float(v) for k, v in context.loss_dict.items() if getattr(v, "numel", lambda: 1)() == 1}}
            row["skipped"] = bool(context.skipped_iter)
            with open(out / "losses.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

        def on_checkpoint_save(self, context):  # noqa: D102
            step = int(context.state.train_state.step)
            (out / f"saved_{step}.rank{rank}").write_text("ok")
            if stop_after_save and step == stop_after_save:
                import torch.distributed as dist

                dist.barrier()
                (out / f"stopped_{step}.rank{rank}").write_text("ok")
                while True:  # the parent kills every rank here, as a cluster would
                    time.sleep(1)

        def on_train_end(self, context):  # noqa: D102
            if probe is None:
                return
            import torch

            from nemo_xtoken.cpu.megatron import gather_vocab_parallel_logits

            (chunk,) = context.model
            m = chunk
            while not hasattr(m, "only_student_forward") and hasattr(m, "module"):
                m = m.module
            fp16 = chunk.module if hasattr(chunk, "module") else chunk  # Float16Module casts the input
            ids = torch.tensor([probe], dtype=torch.long)
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            chunk.eval()
            with torch.no_grad(), m.only_student_forward():
                logits = fp16(ids, pos, None)
            full = gather_vocab_parallel_logits(logits.float())
            if rank == 0:
                torch.save(full.cpu(), out / "probe_logits.pt")

    return [Rehearsal()]


def _forked_write_results_queue() -> None:
    """Start the checkpoint writer's result queue with ``fork``, as Bridge's async saves do, not ``spawn``.

    megatron-core's writer (``dist_checkpointing/strategies/filesystem_async.py``, ``get_write_results_queue``)
    collects its threads' results through a ``multiprocessing`` manager that it starts at the first save with
    the ``spawn`` method unless one exists: a fresh interpreter that imports torch to unpickle them, about 10
    CPU-seconds per rank and launch on this 2-core machine (a rehearsal pays it six times).  Bridge starts the
    same queue with ``checkpoint.async_write_results_mp_mode`` (default ``"fork"``) when saves are
    asynchronous; the rehearsal starts it that way for every save (printed as a change).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue("fork")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from nemo_xtoken.cpu.imports import install_pretrain_hook
    from nemo_xtoken.cpu import bridge_te_shim

    bridge_te_shim.install()
    install_pretrain_hook()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (out / f"env.rank{rank}.json").write_text(json.dumps({"cwd": os.getcwd(), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")}))
    from nemo_xtoken.cpu.cuda_shim import cuda_on_cpu

    with cuda_on_cpu():
        from megatron.bridge.training.pretrain import pretrain

        from nemo_xtoken.integration.bridge import build_config_container, forward_step
        from nemo_xtoken.integration.config import load_config

        cfg = load_config(args.config, args.overrides)
        container = build_config_container(cfg, base_dir=Path(args.config).resolve().parent)
        _cpu_settings(container)
        _forked_write_results_queue()
        probe = json.loads(args.probe) if args.probe else None
        pretrain(container, forward_step, callbacks=_callbacks(out, args.stop_after_save, probe))
    (out / f"done.rank{os.environ.get('RANK', '0')}").write_text("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
