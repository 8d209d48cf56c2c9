"""The CPU runtime that product commands use (``xtoken rehearse``): CUDA redirected to the CPU, scoped.

Nothing here is imported by the GPU code path (``nemo_xtoken.integration``, ``nemo_xtoken.parallel``),
and importing it changes nothing: every redirect is applied inside a ``with`` block and undone on exit
(:func:`~nemo_xtoken.cpu.cuda_shim.cuda_on_cpu`).
"""

from __future__ import annotations

__all__ = ["cuda_on_cpu", "REDIRECTS"]


def __getattr__(name: str):  # lazy: importing the package imports nothing heavy
    if name in __all__:
        from nemo_xtoken.cpu import cuda_shim

        return getattr(cuda_shim, name)
    raise AttributeError(name)
