"""Import Megatron-Bridge on a machine without transformer_engine: an import hook scoped to one module.

``import megatron.bridge`` (0.6.2) fails on a CPU at exactly one unguarded module-level line,
``import transformer_engine.pytorch as te`` in ``megatron/bridge/peft/lora_layers.py`` (LoRA's
fused TE branches; nothing the distillation path calls).  :func:`install` adds a ``sys.meta_path``
finder that, for that one module only, compiles its source with that one line replaced by an inert
placeholder (:data:`ABSENT_TE`: attribute chains and ``isinstance`` work, calling anything raises
an error naming transformer_engine).  Line numbers are kept.  Nothing else changes:

* no ``transformer_engine`` module is created, so megatron-core's ~120 guarded
  ``try: import transformer_engine`` still see that TE is absent (a global fake package would make
  them take TE code paths);
* the hook asserts that the line is present (a Bridge upgrade that moves or guards it fails loudly
  instead of silently importing something else);
* with a real transformer_engine installed, :func:`install` does nothing.

Used by the CPU test-suite (``tests/conftest.py``) and by ``xtoken check-model`` when
transformer_engine is absent; never by the training path (a GPU run imports Bridge normally).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from typing import Any

from nemo_xtoken.cpu.imports import LineFinder, LineLoader

__all__ = ["TARGET_MODULE", "TE_IMPORT_LINE", "ABSENT_TE", "TE_FUSIONS", "install", "uninstall", "installed", "te_available", "without_te"]

TARGET_MODULE = "megatron.bridge.peft.lora_layers"
TE_IMPORT_LINE = "import transformer_engine.pytorch as te"
_REPLACEMENT = "from nemo_xtoken.cpu.bridge_te_shim import ABSENT_TE as te  # xtoken: TE absent (CPU)"


class _AbsentMeta(type):
    """Metaclass of the placeholders: ``Absent.x.y`` is another placeholder class; calling one raises."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _AbsentMeta(name, (), {"_path": f"{cls._path}.{name}"})
        type.__setattr__(cls, name, sub)  # cache: the same object on every access
        return sub

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{cls._path} is not available: transformer_engine is not installed (Megatron-Bridge was imported on a CPU "
            f"through nemo_xtoken's scoped import hook; LoRA's fused TE branches need a GPU machine with transformer_engine)"
        )

    def __repr__(cls) -> str:
        return f"<absent {cls._path}>"


#: What ``te`` is inside ``megatron.bridge.peft.lora_layers`` when transformer_engine is absent.
ABSENT_TE = _AbsentMeta("pytorch", (), {"_path": "transformer_engine.pytorch"})


def te_available() -> bool:
    """True when a real ``transformer_engine`` package is installed (then the hook is never needed)."""
    return importlib.util.find_spec("transformer_engine") is not None


_OWNER = "nemo_xtoken/cpu/bridge_te_shim.py"


def _Loader(inner: importlib.machinery.SourceFileLoader) -> LineLoader:
    """``lora_layers.py``'s source with its one TE import line replaced (the shared one-line hook)."""
    return LineLoader(inner, TE_IMPORT_LINE, _REPLACEMENT, _OWNER)


_FINDER = LineFinder(TARGET_MODULE, TE_IMPORT_LINE, _REPLACEMENT, _OWNER)


def installed() -> bool:
    """Whether the hook is on ``sys.meta_path``."""
    return _FINDER in sys.meta_path


def install() -> bool:
    """Put the hook first on ``sys.meta_path`` unless transformer_engine is installed; True if it is active.

    Must run before ``megatron.bridge`` is first imported; idempotent.
    """
    if te_available():
        return False
    if TARGET_MODULE in sys.modules and not installed():
        return False  # already imported some other way: leave it alone
    if not installed():
        sys.meta_path.insert(0, _FINDER)
    return True


def uninstall() -> None:
    """Remove the hook (modules already imported stay as they are)."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


#: Provider flags whose fused kernels need transformer_engine or Apex (or CUDA): off without TE.
TE_FUSIONS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
)


def without_te(provider: Any) -> Any:
    """Make a Bridge GPT provider build without transformer_engine: the local layer spec, TE/Apex fusions off.

    Bridge's default spec is transformer_engine's; its local spec (``gpt_provider.local_layer_spec``,
    megatron-core's ``get_gpt_layer_local_spec``) computes the same functions with torch modules.
    Returns the provider.
    """
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    for name in TE_FUSIONS:
        if hasattr(provider, name):
            setattr(provider, name, False)
    return provider
