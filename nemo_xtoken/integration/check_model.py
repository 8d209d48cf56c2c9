"""``xtoken check-model``: does a Hugging Face model convert to Megatron as a run would convert it?  On the CPU.

The model goes through the run's own path (:func:`~nemo_xtoken.integration.bridge.provider_from_hf`:
AutoBridge with the plugin's Phi3 bridge, weights loaded by Bridge's pre-wrap hook) on ``tp`` gloo
processes, and its logits on a few random sequences are compared with Hugging Face's
(``AutoModelForCausalLM``, fp32).  The comparison needs no GPU, so it is a CPU tool: Bridge is
imported through :mod:`nemo_xtoken.cpu.bridge_te_shim`'s scoped import hook when
transformer_engine is absent, the model uses Bridge's local (non-TE) layer spec
(:func:`~nemo_xtoken.cpu.bridge_te_shim.without_te`) and Megatron-core's two CUDA assumptions
are redirected (:func:`~nemo_xtoken.cpu.megatron.cpu_megatron_patches`).  A GPU run builds
the same weights into TE layers; what this checks is the conversion (names, fused/split tensors,
rotary embedding, vocabulary padding, tied embeddings), not TE.

Memory: the Hugging Face model (freed before Megatron builds) and then one fp32 copy of the model
split over the ``tp`` processes, so about 4 bytes per parameter plus the logits.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nemo_xtoken.errors import XTokenError

__all__ = ["UnsupportedModelError", "ModelCheck", "check_model", "check_tp_divides_heads", "tolerance"]


class UnsupportedModelError(XTokenError):
    """The model's architecture has no Megatron-Bridge conversion (the plugin's included)."""


@dataclass
class ModelCheck:
    """``xtoken check-model``'s result (its ``--json`` output)."""

    model: str
    architecture: str | None
    supported: bool
    bridge: str | None
    max_abs_logit_diff: float
    argmax_agreement: float
    vocab_size: int
    padded_vocab_size: int
    max_abs_reference_logit: float
    tp: int
    sequences: int
    seq_length: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the JSON keys)."""
        return asdict(self)


def _megatron_logits(rank: int, world: int, model: str, tp: int, ids: torch.Tensor, ref: torch.Tensor, trust: bool) -> dict:
    """One rank: build the Megatron model through the run's path, compare its gathered logits with ``ref``."""
    from nemo_xtoken.integration.bridge import provider_from_hf, settle_precision
    from nemo_xtoken.cpu.bridge_te_shim import without_te
    from nemo_xtoken.cpu.megatron import cpu_megatron_patches, gather_vocab_parallel_logits, init_megatron_cpu

    init_megatron_cpu(rank, world, tensor_model_parallel_size=tp, seed=0)
    with cpu_megatron_patches():
        prov = without_te(provider_from_hf(model, load_weights=True, trust_remote_code=trust))
        settle_precision(prov, False)
        prov.tensor_model_parallel_size = tp
        prov.sequence_parallel = False
        prov.seq_length = int(ids.shape[1])
        prov.finalize()
        (m,) = prov.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None)
        m.eval()
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = gather_vocab_parallel_logits(m(ids, pos, None))
    v = ref.shape[-1]
    got = logits[..., :v].float()
    return {
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "padded_vocab_size": int(logits.shape[-1]),
    }


def tolerance(check: ModelCheck, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """The accepted largest absolute logit difference: ``atol + rtol · max(abs(reference logits))``.

    fp32 sums in another order differ in proportion to the logits' size: a pretrained model's logits
    (tens) differ more than a tiny random model's (below one), while a conversion error is of the
    logits' own order.
    """
    return atol + rtol * check.max_abs_reference_logit


def check_tp_divides_heads(hf_config: Any, tp: int, model: str) -> None:
    """Refuse (one line, before any model is built) a ``tp`` Megatron cannot split the model over.

    Megatron needs ``tp`` to divide the attention heads and the MLP width, and the key/value heads to
    be a multiple or a divisor of ``tp`` (fewer key/value heads than ranks are replicated).
    """
    heads = int(getattr(hf_config, "num_attention_heads", 0) or 0)
    groups = int(getattr(hf_config, "num_key_value_heads", 0) or heads)
    ffn = int(getattr(hf_config, "intermediate_size", 0) or 0)
    if not heads:
        return

    def fits(d: int) -> bool:
        return heads % d == 0 and (groups % d == 0 or d % groups == 0) and (not ffn or ffn % d == 0)

    if not fits(tp):
        ok = [str(d) for d in range(1, heads + 1) if fits(d)]
        valid = ", ".join(ok[:-1]) + " or " + ok[-1] if len(ok) > 1 else ok[0]
        raise XTokenError(f"--tp {tp}: {model} has {heads} attention heads, {groups} key/value heads and MLP width {ffn}; "
                          f"Megatron needs --tp to divide the heads and the MLP width and the key/value heads to be a "
                          f"multiple or divisor of it: use --tp {valid}")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what Bridge and Megatron print (parameter counts, progress, log lines) to stderr: stdout is the result's."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # C-level and child-process writes to fd 1
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Python-level writes, also where sys.stdout is not fd 1
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def check_model(model: str, *, tp: int = 1, sequences: int = 3, seq_length: int = 32, seed: int = 0,
                trust_remote_code: bool = False) -> ModelCheck:
    """Convert ``model`` (HF id or folder) as a run does and compare its logits with Hugging Face's (see the module doc).

    Raises :class:`UnsupportedModelError` (one line) for an architecture Bridge cannot convert.  Whatever
    Bridge and Megatron print goes to stderr.
    """
    if tp < 1 or sequences < 1 or seq_length < 2:
        raise XTokenError(f"need --tp ≥ 1, --sequences ≥ 1 and --seq-length ≥ 2, got {tp}, {sequences}, {seq_length}")
    with _stdout_to_stderr():
        return _check_model(model, tp, sequences, seq_length, seed, trust_remote_code)


def _check_model(model: str, tp: int, sequences: int, seq_length: int, seed: int, trust_remote_code: bool) -> ModelCheck:
    from nemo_xtoken.cpu import bridge_te_shim

    bridge_te_shim.install()  # no-op where transformer_engine is installed
    from nemo_xtoken.integration.bridge import model_support, require_bridge
    from nemo_xtoken.cpu.megatron import spawn

    require_bridge()
    support = model_support(model, trust_remote_code=trust_remote_code)
    if not support.supported:
        raise UnsupportedModelError(f"{model}: architecture {support.architecture} is not supported ({support.reason})")
    from transformers import AutoConfig, AutoModelForCausalLM

    check_tp_divides_heads(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), tp, model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    vocab = int(hf.config.vocab_size)
    max_pos = int(getattr(hf.config, "max_position_embeddings", seq_length) or seq_length)
    seq_length = min(seq_length, max_pos)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, seq_length), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    del hf
    results = spawn(_megatron_logits, tp, model, tp, ids, ref, trust_remote_code, timeout=3600)
    r0 = results[0]
    if not math.isfinite(r0["max_abs_logit_diff"]):
        raise XTokenError(f"{model}: the Megatron model's logits are not finite")
    return ModelCheck(
        model=model, architecture=support.architecture, supported=True, bridge=support.bridge,
        max_abs_logit_diff=r0["max_abs_logit_diff"], argmax_agreement=r0["argmax_agreement"], vocab_size=vocab,
        padded_vocab_size=r0["padded_vocab_size"], max_abs_reference_logit=float(ref.abs().max()), tp=tp, sequences=sequences, seq_length=seq_length,
    )
