"""Import hooks scoped to one line of one module: what Megatron-Bridge's training entry imports but a CPU lacks.

``megatron/bridge/training/pretrain.py`` (0.6.2) imports ``nvidia_resiliency_ext`` at module level for
a type hint only (``CallWrapper``, the in-process restart wrapper, unused unless in-process restart is
configured).  The package is not installable here and its 0.4.1 release breaks megatron-core's
checkpoint strategies (``dist_checkpointing/strategies/nvrx.py:85``).  :func:`install_pretrain_hook`
compiles that one module with that one line replaced by an inert ``CallWrapper = object``; it asserts
the line is there (a Bridge upgrade fails loudly) and does nothing where ``nvidia_resiliency_ext`` is
importable.  Transformer Engine's line in ``peft/lora_layers.py`` has its own hook
(:mod:`nemo_xtoken.cpu.bridge_te_shim`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

__all__ = ["PRETRAIN_MODULE", "NVRX_IMPORT_LINE", "LineFinder", "LineLoader", "install_pretrain_hook", "uninstall_pretrain_hook"]

PRETRAIN_MODULE = "megatron.bridge.training.pretrain"
NVRX_IMPORT_LINE = "from nvidia_resiliency_ext.inprocess import CallWrapper"
_REPLACEMENT = "CallWrapper = object  # xtoken: nvidia_resiliency_ext absent (CPU rehearsal); a type hint only"


class LineLoader(importlib.abc.Loader):
    """Executes a module's source with exactly one line (``line``, stripped) replaced by ``replacement``.

    ``owner`` is the file to update when a Bridge release changes that line (named in the error).
    """

    def __init__(self, inner: importlib.machinery.SourceFileLoader, line: str, replacement: str,
                 owner: str = "nemo_xtoken/cpu/imports.py") -> None:
        self.inner, self.line, self.replacement, self.owner = inner, line, replacement, owner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return None

    def exec_module(self, module: Any) -> None:
        lines = self.inner.get_source(module.__name__).splitlines(keepends=True)
        hits = [i for i, ln in enumerate(lines) if ln.strip() == self.line]
        if len(hits) != 1:
            raise ImportError(
                f"nemo_xtoken's import hook expected exactly one line {self.line!r} in {self.inner.path}, found "
                f"{len(hits)}: this Megatron-Bridge release differs from 0.6.2; update {self.owner}"
            )
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines[i] = indent + self.replacement + "\n"
        exec(compile("".join(lines), self.inner.path, "exec", dont_inherit=True), module.__dict__)


class LineFinder(importlib.abc.MetaPathFinder):
    """Finds ``module`` with the other finders and wraps its loader in a :class:`LineLoader`."""

    def __init__(self, module: str, line: str, replacement: str, owner: str = "nemo_xtoken/cpu/imports.py") -> None:
        self.module, self.line, self.replacement, self.owner = module, line, replacement, owner

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                    raise ImportError(f"{fullname} is not loaded from a source file ({spec.loader!r}); cannot apply the hook")
                spec.loader = LineLoader(spec.loader, self.line, self.replacement, self.owner)
                return spec
        return None


_PRETRAIN_FINDER = LineFinder(PRETRAIN_MODULE, NVRX_IMPORT_LINE, _REPLACEMENT)


def install_pretrain_hook() -> bool:
    """Hook ``pretrain.py``'s ``nvidia_resiliency_ext`` line unless that package is importable; True if active."""
    if importlib.util.find_spec("nvidia_resiliency_ext") is not None:
        return False
    if PRETRAIN_MODULE in sys.modules:
        return _PRETRAIN_FINDER in sys.meta_path
    if _PRETRAIN_FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _PRETRAIN_FINDER)
    return True


def uninstall_pretrain_hook() -> None:
    while _PRETRAIN_FINDER in sys.meta_path:
        sys.meta_path.remove(_PRETRAIN_FINDER)
