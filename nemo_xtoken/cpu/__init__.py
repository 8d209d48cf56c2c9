"""The CPU runtime that product commands use: Megatron-core, Megatron-Bridge and their CUDA assumptions on a CPU.

* :mod:`~nemo_xtoken.cpu.megatron`: gloo process groups and tensor parallelism, Megatron-core's CUDA
  assumptions redirected (``cpu_megatron_patches``), tiny ``GPTModel`` instances, the multi-process ``spawn``,
  optimizer checkpoints (``xtoken demo``, ``xtoken check-model``, ``xtoken distill --check``, the tests);
* :mod:`~nemo_xtoken.cpu.bridge_te_shim`: importing Megatron-Bridge without transformer_engine (a
  scoped one-line import hook), :mod:`~nemo_xtoken.cpu.imports`: the same for Bridge's ``pretrain``;
* :mod:`~nemo_xtoken.cpu.cuda_shim`: ``cuda_on_cpu()``, CUDA redirected to the CPU and NCCL to gloo for
  Bridge's own ``pretrain()``; :mod:`~nemo_xtoken.cpu.rehearse` and its worker: ``xtoken rehearse``.

The GPU training path never imports it, and importing it changes nothing: every redirect is applied
inside a ``with`` block and undone on exit (:func:`~nemo_xtoken.cpu.cuda_shim.cuda_on_cpu`).
"""

from __future__ import annotations

__all__ = ["cuda_on_cpu", "REDIRECTS"]


def __getattr__(name: str):  # lazy: importing the package imports nothing heavy
    if name in __all__:
        from nemo_xtoken.cpu import cuda_shim

        return getattr(cuda_shim, name)
    raise AttributeError(name)
