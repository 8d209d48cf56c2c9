"""Megatron-Bridge glue: models from Hugging Face, provider conversion, forward step and loss function.

Every Bridge import here is lazy (:func:`require_bridge`, which also registers the plugin's own
model bridges: Phi3 for Phi-4-mini, :mod:`nemo_xtoken.integration.phi3_bridge`); what needs no
Bridge — batch handling, the loss function, the config → Bridge argument mapping — is plain code.

**Models.** :func:`build_providers` turns the config's Hugging Face models into Bridge providers
through ``AutoBridge`` (:func:`provider_from_hf`): it refuses an architecture that Bridge (with the
plugin's bridges) cannot convert, naming the key (:func:`model_support`: the dispatch registry, not
``AutoBridge.supports()``, which answers True for any ``*ForCausalLM``); sets one precision on every
model from ``train.bf16`` (a fp16 checkpoint would otherwise leave ``fp16`` and ``bf16`` both set);
loads a teacher's Megatron checkpoint (``teachers.N.checkpoint``) instead of its Hugging Face
weights; and makes the student's LM loss Megatron's native cross-entropy (TE's fused one writes
its gradient into the logits buffer, which the KD criterion reads).

Why not Bridge's ``DistillationProvider`` (HOST_NOTES "Extension points and traps"): it requires
equal ``seq_length`` for student and teacher (cross-tokenizer teachers read a different number of
tokens for the same text), its ``__setattr__`` mirrors every attribute onto the teacher (Bridge's
setup sets ``vocab_size`` and would overwrite the teacher's vocabulary), and
``convert_to_distillation_provider`` rewrites ``DistillationProvider.__bases__`` for the whole
process.  :func:`convert_to_xtoken_distillation_provider` leaves the student provider's class alone
and registers one pre-wrap hook: it runs inside ``provide_distributed_model`` after model-parallel
initialization and after Bridge's weight-loading hooks, builds every teacher from its own provider
(own vocabulary, own sequence length; each teacher provider is finalized there, as Bridge's own flows
do, since ``ConfigContainer.validate()`` finalizes only the student), builds the criterion and balancer
(:func:`~nemo_xtoken.integration.distill.criterion_from_config`, on the tensor-parallel group) and
returns ModelOpt's ``DistillationModel`` from
:func:`~nemo_xtoken.integration.distill.convert_to_xtoken_distillation_model` — the one model type
of the plugin.  Being ModelOpt's ``Distill<GPTModel>``, it already has what Megatron's wrappers and
Bridge's loops look up on the unwrapped chunk: ``config``, ``set_input_tensor``, ``state_dict`` /
``sharded_state_dict`` / ``load_state_dict`` of the student only (teacher hidden).

Bridge's ``get_batch_from_iterator`` keeps only ``tokens``/``labels``/``loss_mask``/
``position_ids``/``attention_mask`` and drops the teacher ids and alignment, so :func:`forward_step`
reads the batch itself (:func:`get_xtoken_batch`) and passes the teachers' ids to the model as
``teacher_inputs``.  :func:`loss_func` calls the model's ``compute_kd_loss`` with the alignments
(:func:`~nemo_xtoken.integration.distill.xtoken_loss`) and returns Bridge's
``(loss_sum, num_tokens, report)`` triple; every report entry is ``[value·tokens, tokens]``, which
Bridge averages over the global batch and writes to TensorBoard / W&B under the key's name.

Batch layout for several teachers: teacher 0's fields use the plain keys of
:data:`~nemo_xtoken.data.packing.SAMPLE_KEYS`; teacher ``m ≥ 1`` reads ``"<key>@<m>"`` when
present.  A same-tokenizer teacher (loss ``kl``) without its own fields reads the student's ids
with a one-token-per-chunk alignment (:func:`identity_teacher_batch`).
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from nemo_xtoken.errors import XTokenError
from nemo_xtoken.integration.config import CONTEXT_REFUSAL, PIPELINE_REFUSAL, ConfigError, XTokenDistillConfig
from nemo_xtoken.data.packing import SAMPLE_KEYS, TEACHER_KEYS

__all__ = [
    "BridgeUnavailableError",
    "require_bridge",
    "ModelSupport",
    "model_support",
    "provider_from_hf",
    "settle_precision",
    "build_providers",
    "resolve_checkpoint",
    "resolve_run_path",
    "TEACHER_FIELDS",
    "REPORT_KEYS",
    "get_xtoken_batch",
    "identity_teacher_batch",
    "teacher_batches_from_batch",
    "loss_and_report",
    "loss_func",
    "forward_step",
    "check_parallel_sizes",
    "convert_to_xtoken_distillation_provider",
    "bridge_config_kwargs",
    "build_dataset",
    "make_dataset_provider",
    "build_config_container",
]

#: Fields a teacher reads from the batch (teacher ``m ≥ 1``: ``"<field>@<m>"``).
TEACHER_FIELDS = TEACHER_KEYS

#: Report keys of :func:`loss_func` besides the per-teacher ``kd/<name>``, ``alpha/<name>`` and
#: ``aligned chunk fraction/<name>``.  The first four are the keys Bridge's ``loss_func_kd`` reports.
REPORT_KEYS = (
    "lm loss",
    "total loss",
    "logits distillation loss",
    "intermediate distillation loss",
    "ce loss",
    "dynamic scale",
)


class BridgeUnavailableError(XTokenError):
    """Megatron-Bridge (or transformer_engine, which it imports) cannot be imported here."""


def require_bridge() -> Any:
    """Import ``megatron.bridge`` (and register the plugin's model bridges) or raise :class:`BridgeUnavailableError`."""
    try:
        import megatron.bridge as mb  # noqa: F401
    except Exception as e:  # ImportError, or TE's own errors when CUDA libraries are missing
        te = "transformer_engine" in str(e) or isinstance(e, ImportError) and (e.name or "").startswith("transformer_engine")
        hint = (
            "Megatron-Bridge imports transformer_engine, which needs CUDA: run on a GPU machine, e.g. in the NeMo "
            "container (docker/Dockerfile); on a CPU, `xtoken check-model` and `xtoken distill --check` import it "
            "without transformer_engine"
            if te
            else "install it with `pip install -c requirements/constraints.txt 'nemo-xtoken[bridge]'` or use the "
            "NeMo container (docker/Dockerfile)"
        )
        raise BridgeUnavailableError(f"Megatron-Bridge is not importable ({type(e).__name__}: {e}); {hint}") from e
    import nemo_xtoken.integration.phi3_bridge  # noqa: F401  (registers Phi3ForCausalLM with AutoBridge)

    return mb


# ---- models from Hugging Face ---------------------------------------------------------------------


@dataclasses.dataclass
class ModelSupport:
    """Whether Megatron-Bridge (with the plugin's bridges) converts a Hugging Face model, and why not."""

    model: str
    architecture: str | None
    supported: bool
    reason: str = ""
    bridge: str | None = None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip(" ✗") for ln in str(e).splitlines() if ln.strip(" ✗")]
    return lines[0] if lines else type(e).__name__


def _hf_config(model: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as local_error:  # not a folder / not cached: try the hub unless offline
        if Path(model).exists():
            raise XTokenError(f"cannot read the Hugging Face config in {model} ({_first_line(local_error)})") from None
        try:
            return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise XTokenError(
                f"cannot read the Hugging Face config of {model!r} ({type(e).__name__}: {_first_line(e)}): give a local "
                "folder with config.json, or a hub id that is cached or downloadable here"
            ) from None


def model_support(model: str, *, trust_remote_code: bool = False) -> ModelSupport:
    """Can Megatron-Bridge (plus the plugin's Phi3 bridge) convert ``model``?  Reads only its ``config.json``.

    Uses AutoBridge's dispatch registry (what ``to_megatron_provider`` will need), not
    ``AutoBridge.supports()``, which accepts any architecture name ending in ``ForCausalLM``.
    """
    require_bridge()
    from megatron.bridge import AutoBridge

    config = _hf_config(model, trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else None
    try:
        auto = AutoBridge.from_hf_config(config)
        bridge = type(auto._model_bridge).__name__
    except (ValueError, TypeError) as e:
        return ModelSupport(model, arch, False, _first_line(e))
    return ModelSupport(model, arch, True, "", bridge)


def _resolve_model(model: str, base_dir: str | Path | None, key: str = "model") -> str:
    """A model folder relative to the config's folder, or a hub id as given (:func:`~nemo_xtoken.integration.config.resolve_input`)."""
    from nemo_xtoken.integration.config import resolve_input

    return resolve_input(model, base_dir, key, hub_ok=True)


def provider_from_hf(model: str, *, load_weights: bool = True, trust_remote_code: bool = False, key: str = "model") -> Any:
    """A Bridge model provider for a Hugging Face id or folder (weights loaded by a pre-wrap hook if asked).

    An architecture Bridge cannot convert raises :class:`ConfigError` naming ``key`` and the supported list's source.
    """
    require_bridge()
    from megatron.bridge import AutoBridge

    support = model_support(model, trust_remote_code=trust_remote_code)
    if not support.supported:
        raise ConfigError(
            f"{key}: {model} is a {support.architecture}, which Megatron-Bridge cannot convert ({support.reason}); "
            "supported: AutoBridge.list_supported_models() plus Phi3ForCausalLM (nemo_xtoken)"
        )
    if load_weights:
        auto = AutoBridge.from_hf_pretrained(model, trust_remote_code=trust_remote_code)
    else:
        auto = AutoBridge.from_hf_config(_hf_config(model, trust_remote_code))
    return auto.to_megatron_provider(load_weights=load_weights)


def settle_precision(provider: Any, bf16: bool) -> None:
    """One precision for a provider: bf16 (``train.bf16``) or fp32, never fp16 (whatever the checkpoint's dtype)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    provider.bf16 = bool(bf16)
    provider.fp16 = False
    for name in ("params_dtype", "pipeline_dtype", "autocast_dtype"):
        if hasattr(provider, name):
            setattr(provider, name, dtype)


def _megatron_checkpoint_hook(path: str, who: str):
    """A pre-wrap hook loading a Megatron ``torch_dist`` checkpoint (``DIR`` or ``DIR/iter_N``) into the model."""

    def load_megatron_checkpoint(model_chunks: list) -> list:
        from megatron.bridge.training.checkpointing import _load_model_weights_from_checkpoint

        ckpt = resolve_checkpoint(path, key=who)
        _load_model_weights_from_checkpoint(str(ckpt), model_chunks)
        return model_chunks

    return load_megatron_checkpoint


def build_providers(cfg: XTokenDistillConfig, *, base_dir: str | Path | None = None, load_weights: bool = True) -> tuple[Any, list[Any]]:
    """The student's and every teacher's Bridge provider for a run (see the module doc: support, precision, checkpoints, CE).

    ``load_weights=False`` builds the models with random weights (a dry build).  A teacher with
    ``checkpoint`` loads that Megatron checkpoint instead of its Hugging Face weights; a student with
    ``checkpoint`` is loaded by Bridge (``CheckpointConfig.pretrained_checkpoint``).
    """
    for who, m in [("student", cfg.student.model)] + [
        (f"teachers.{i} ({t.name})", t.model) for i, t in enumerate(cfg.teachers) if t.cache is None
    ]:
        if not m:
            raise ConfigError(f"{who}.model is required to build Megatron-Bridge models (a Hugging Face id or folder)")
    student = provider_from_hf(
        _resolve_model(cfg.student.model, base_dir, "student.model"), load_weights=load_weights and not cfg.student.checkpoint, key="student.model",
    )
    teachers = []
    for i, t in enumerate(cfg.teachers):
        if t.cache is not None:  # a cached teacher (teachers.N.cache) has no model: None
            teachers.append(None)
            continue
        key = f"teachers.{i} ({t.name})"
        prov = provider_from_hf(_resolve_model(t.model, base_dir, f"teachers.{i}.model"), load_weights=load_weights and not t.checkpoint, key=f"{key}.model")
        if t.checkpoint:
            ckpt = resolve_run_path(t.checkpoint, base_dir)
            resolve_checkpoint(ckpt, key=f"{key}.checkpoint")  # fail now, not after the student is built
            prov.perform_initialization = False
            prov.register_pre_wrap_hook(_megatron_checkpoint_hook(ckpt, f"{key}.checkpoint"))
        teachers.append(prov)
    for prov in [student, *(t for t in teachers if t is not None)]:
        settle_precision(prov, cfg.train.bf16)
    return student, teachers


# ---- batches ------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True) if device is not None else v
        out[k] = v
    return out


def get_xtoken_batch(data_iterator: Iterator[dict[str, Any]] | None, device: Any = None) -> dict[str, torch.Tensor]:
    """Next dual-tokenized batch with *all* its fields (student, teacher ids, alignment), on ``device``.

    Bridge's ``get_batch_from_iterator`` would set every unknown key to ``None``; here nothing is
    dropped.  Missing student or teacher-0 fields raise, naming them.
    """
    if data_iterator is None:
        raise XTokenError("forward_step got no data iterator: X-Token needs the batch on every rank (pipeline parallel size 1)")
    batch = next(data_iterator)
    if not isinstance(batch, dict):
        raise XTokenError(f"X-Token batches are dicts of tensors (DualTokenizedDataset + collate), got {type(batch).__name__}")
    missing = [k for k in SAMPLE_KEYS if batch.get(k) is None]
    if missing:
        raise XTokenError(
            f"the batch lacks {missing} (has {sorted(batch)}): X-Token needs a DualTokenizedDataset batch "
            "(nemo_xtoken.data.packing); Bridge's GPT datasets carry no teacher ids or alignment"
        )
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _to_device(batch, device)


def identity_teacher_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher fields for a same-tokenizer teacher: the student's ids, one chunk per predicting position.

    A packed batch's ``segment_ids`` become the teacher's (same documents, same positions).
    """
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).expand(b, s)
    ids = torch.where(mask > 0, pos, torch.full_like(pos, -1))
    targets = torch.where(mask > 0, labels, torch.zeros_like(labels))
    out = {
        "teacher_tokens": tokens,
        "teacher_position_ids": batch["position_ids"],
        "student_chunk_ids": ids,
        "teacher_chunk_ids": ids.clone(),
        "student_targets": targets,
        "teacher_targets": targets.clone(),
        "n_chunks": torch.full((b,), s, dtype=torch.long, device=tokens.device),
    }
    if batch.get("segment_ids") is not None:
        out["teacher_segment_ids"] = batch["segment_ids"]
    return out


def teacher_batches_from_batch(batch: dict[str, torch.Tensor], losses: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """One field dict per teacher (see module doc for the ``@m`` keys and same-tokenizer teachers).

    The plain teacher keys belong to the first cross-tokenizer teacher (the first teacher if all are
    same-tokenizer but the batch carries teacher fields).
    """
    out: list[dict[str, torch.Tensor]] = []
    plain_owner = next((i for i, l in enumerate(losses) if l != "kl"), None)
    for m, loss in enumerate(losses):
        # every "<key>@m" field is teacher m's (TEACHER_FIELDS, its segment ids, cached-teacher fields)
        own = {k.rpartition("@")[0]: v for k, v in batch.items() if "@" in k and k.rpartition("@")[2] == str(m)}
        if own:
            lacking = [k for k in TEACHER_FIELDS if k not in own]
            if lacking:
                raise XTokenError(f"teacher {m}: the batch has some '@{m}' fields but lacks {[f'{k}@{m}' for k in lacking]}")
            out.append({**batch, **own})
        elif m == plain_owner:
            out.append(batch)
        elif loss == "kl":
            out.append({**batch, **identity_teacher_batch(batch)})
        else:
            raise XTokenError(
                f"teacher {m} (loss {loss}) has no fields in the batch: a second cross-tokenizer teacher needs its own "
                f"teacher ids and alignment under the keys '<field>@{m}' ({list(TEACHER_FIELDS)})"
            )
    return out


# ---- loss function and forward step --------------------------------------------------------------


def _pair(value: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    n = num_tokens.to(torch.float32)
    v = value.detach().float().reshape(()).to(n.device)
    return torch.cat([(v * n).reshape(1), n.reshape(1)])


def loss_and_report(
    loss_mask: torch.Tensor,
    total: torch.Tensor,
    logs: dict[str, torch.Tensor],
    *,
    teacher_names: Sequence[str],
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Bridge's ``(loss, num_tokens, report)`` from :func:`~nemo_xtoken.integration.distill.xtoken_loss`'s result.

    ``loss = total · num_tokens`` (Megatron divides by ``num_tokens`` and the number of
    micro-batches, or by the global token count with ``calculate_per_token_loss``), so gradient
    accumulation and data parallelism average exactly as for Bridge's own ``masked_next_token_loss``.
    Validation (``training=False``) uses CE only, as Bridge's ``loss_func_kd``.  Every report entry
    is ``[value·tokens, tokens]``; every teacher gets ``kd/``, ``alpha/`` and ``aligned chunk
    fraction/`` entries on every micro-batch (Bridge requires equal key sets), and a teacher on the
    low-traffic exchange (``distill.tp_exchange``) its error bound ``kd bound/`` (present on every
    micro-batch of such a run).
    """
    num_tokens = loss_mask.detach().reshape(-1).float().sum().to(torch.int)
    n = num_tokens.to(total.device, total.dtype)
    zero = torch.zeros((), device=total.device)
    ce = logs.get("ce_loss", zero)
    loss = total * n if training else ce.to(total.device, total.dtype) * n
    report: dict[str, torch.Tensor] = {
        "lm loss": _pair(ce, num_tokens),
        "total loss": _pair(total, num_tokens),
        "logits distillation loss": _pair(logs.get("logits_loss", zero), num_tokens),
        "intermediate distillation loss": _pair(logs.get("intermediate_loss", zero), num_tokens),
        "ce loss": _pair(ce, num_tokens),
        "dynamic scale": _pair(logs.get("dynamic_scale", zero), num_tokens),
    }
    for name in teacher_names:
        report[f"kd/{name}"] = _pair(logs.get(f"kd/{name}", zero), num_tokens)
        report[f"alpha/{name}"] = _pair(logs.get(f"alpha/{name}", zero), num_tokens)
        report[f"aligned chunk fraction/{name}"] = _pair(logs.get(f"aligned_chunk_fraction/{name}", zero), num_tokens)
        if f"kd_bound/{name}" in logs:  # |exact − kd/<name>| ≤ this (the summary exchange's computed bound)
            report[f"kd bound/{name}"] = _pair(logs[f"kd_bound/{name}"], num_tokens)
    return loss, num_tokens, report


def loss_func(
    model: Any,
    batch: dict[str, torch.Tensor],
    teacher_batches: Sequence[dict[str, torch.Tensor]],
    output_tensor: torch.Tensor,
    *,
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Bridge's loss function: the distillation model's ``compute_kd_loss`` (through
    :func:`~nemo_xtoken.integration.distill.xtoken_loss`) on the student's per-token CE
    ``output_tensor``, as Bridge's ``(loss·num_tokens, num_tokens, report)`` (:func:`loss_and_report`).

    ``model`` is the unwrapped ModelOpt ``DistillationModel``; :func:`forward_step` binds it, the
    batch and the per-teacher alignment fields.
    """
    from nemo_xtoken.integration.distill import xtoken_criterion, xtoken_loss

    total, logs = xtoken_loss(model, batch, output_tensor, teacher_batches)
    names = [s.name for s in xtoken_criterion(model).specs]
    return loss_and_report(batch["loss_mask"], total, logs, teacher_names=names, training=training)


def _unwrap(model: Any) -> Any:
    """The ModelOpt ``DistillationModel`` inside Megatron's DDP / ``Float16Module`` wrappers."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    while not hasattr(m, "compute_kd_loss") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "compute_kd_loss"):
        raise XTokenError(
            f"forward_step got a {type(m).__name__}, not a distillation model: build the model through "
            "convert_to_xtoken_distillation_provider"
        )
    return m


def forward_step(state: Any, data_iterator: Iterator[dict[str, Any]], model: Any, return_schedule_plan: bool = False):
    """Bridge forward step for X-Token KD: ``pretrain(config, forward_step)``.

    Reads the whole dual-tokenized batch, calls the (wrapped) ModelOpt distillation model with the
    student's ids and ``teacher_inputs`` (each teacher on its own ids, see
    :func:`~nemo_xtoken.integration.distill.convert_to_xtoken_distillation_model`) and returns the
    student's per-token CE with :func:`loss_func` bound to the model, the batch and the alignments.
    """
    from nemo_xtoken.integration.distill import xtoken_criterion

    if return_schedule_plan:
        raise XTokenError("X-Token KD does not support overlap_moe_expert_parallel_comm (return_schedule_plan=True)")
    timers = getattr(state, "timers", None)
    if timers is not None:
        timers("batch-generator", log_level=2).start()
    batch = get_xtoken_batch(data_iterator)
    if timers is not None:
        timers("batch-generator").stop()
    inner = _unwrap(model)
    teacher_batches = teacher_batches_from_batch(batch, [s.loss for s in xtoken_criterion(inner).specs])
    s_in, t_in = packed_model_inputs(inner, batch, teacher_batches)
    output = model(s_in.pop("input_ids"), s_in.pop("position_ids"), s_in.pop("attention_mask"), labels=batch["labels"],
                   teacher_inputs=t_in, **s_in)
    return output, partial(loss_func, inner, batch, teacher_batches, training=bool(inner.training))


def packed_model_inputs(
    inner: Any, batch: dict[str, torch.Tensor], teacher_batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The student's and every teacher's forward inputs, with the attention of packed samples.

    Each model gets its own ids, position ids (restarting per document in a packed sample) and the
    attention that keeps documents apart: an attention mask for Megatron's local attention, Megatron's
    ``PackedSeqParams`` (``cu_seqlens``) for Transformer Engine's (:mod:`nemo_xtoken.data.batch`).
    """
    from nemo_xtoken.data.batch import attention_kind, student_model_inputs, teacher_model_inputs

    teachers = list(getattr(getattr(inner, "_teacher_model", None), "teachers", []))
    kinds = [attention_kind(t) for t in teachers] or ["mask"] * len(teacher_batches)
    if len(kinds) != len(teacher_batches):
        raise XTokenError(f"{len(teacher_batches)} teacher batches for {len(kinds)} teacher models")
    from nemo_xtoken.offline.teachers import cached_teacher_inputs, is_cached_teacher

    t_in = [  # a cached teacher (CachedTeacher) reads its rows from the batch
        cached_teacher_inputs(tb, teachers[m].name) if teachers and is_cached_teacher(teachers[m]) else teacher_model_inputs(tb, k)
        for m, (tb, k) in enumerate(zip(teacher_batches, kinds))
    ]
    return student_model_inputs(batch, attention_kind(inner)), t_in


# ---- checkpoints --------------------------------------------------------------------------------------

_ITER = re.compile(r"^iter_(\d+)$")


def resolve_checkpoint(path: str | Path, *, key: str = "--checkpoint") -> Path:
    """The iteration folder of a Megatron distributed checkpoint (``DIR/iter_N``, or ``DIR``'s latest).

    Raises :class:`XTokenError` naming ``key`` when the folder is missing or holds no ``torch_dist`` checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise XTokenError(f"{key} {p} does not exist (give a checkpoint.save folder or one of its iter_N folders)")
    if not p.is_dir():
        raise XTokenError(f"{key} {p} is a file; a Megatron distributed checkpoint is a folder (…/iter_0030000)")
    if not _ITER.match(p.name):
        iters = sorted((int(m.group(1)), c) for c in p.iterdir() if c.is_dir() and (m := _ITER.match(c.name)))
        if not iters:
            raise XTokenError(
                f"{key} {p} has no iter_N folders and is not one: give a checkpoint.save folder or "
                f"…/iter_N (found {sorted(c.name for c in p.iterdir())[:8]})"
            )
        p = iters[-1][1]
    if not (p / "metadata.json").is_file():
        raise XTokenError(
            f"{p} is not a Megatron distributed (torch_dist) checkpoint: no metadata.json; was the save interrupted? "
            "Pick an earlier iter_N folder"
        )
    return p


# ---- provider conversion ---------------------------------------------------------------------------

_PARALLEL_ATTRS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")


def check_parallel_sizes(student: Any, teachers: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Refuse teachers whose TP/PP/CP differ from the student's, PP/CP > 1 and virtual pipelines.

    ``student``/``teachers`` are Bridge model providers (any objects with the Megatron attributes).
    """
    names = list(names) if names is not None else [f"teacher {i}" for i in range(len(teachers))]
    for name, t in zip(names, teachers):
        if t is None:  # a cached teacher: no model
            continue
        for attr in _PARALLEL_ATTRS:
            s_v, t_v = getattr(student, attr, 1) or 1, getattr(t, attr, 1) or 1
            if s_v != t_v:
                raise ConfigError(
                    f"{name}: {attr} is {t_v} but the student's is {s_v}: teachers run on the student's ranks, "
                    "so their tensor/pipeline/context parallel sizes must be equal"
                )
    if (getattr(student, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise ConfigError(PIPELINE_REFUSAL.format(pp=student.pipeline_model_parallel_size))
    if (getattr(student, "virtual_pipeline_model_parallel_size", None) or 1) > 1:
        raise ConfigError("virtual pipeline parallelism is not supported by X-Token KD (nor by ModelOpt KD)")
    if (getattr(student, "context_parallel_size", 1) or 1) > 1:
        raise ConfigError(CONTEXT_REFUSAL.format(cp=student.context_parallel_size))


def _cached_teacher(t: Any, resources: Any, tp: int) -> Any:
    """A :class:`~nemo_xtoken.offline.teachers.CachedTeacher` for a ``teachers.N.cache`` teacher (no model)."""
    from nemo_xtoken.offline import padded_vocab_size
    from nemo_xtoken.offline.teachers import CachedTeacher

    v = resources.caches[t.name].vocab_size
    return CachedTeacher(v, padded_vocab_size(v, tp), name=t.name)


def _padded_vocab(model: torch.nn.Module, tp: int) -> int:
    """Global padded output width of a Megatron GPT model (its output layer holds ``V'/tp`` rows)."""
    w = getattr(getattr(model, "output_layer", None), "weight", None)
    if w is None and hasattr(model, "shared_embedding_or_output_weight"):
        w = model.shared_embedding_or_output_weight()
    if w is None:
        raise XTokenError(f"cannot read the output width of {type(model).__name__} (no output_layer.weight)")
    return int(w.shape[0]) * int(tp)


def convert_to_xtoken_distillation_provider(
    student_provider: Any,
    teacher_providers: Sequence[Any],
    cfg: XTokenDistillConfig,
    *,
    resources: Any = None,
    base_dir: str | Path | None = None,
) -> Any:
    """Make ``student_provider`` build an X-Token student+teachers model; returns the same provider.

    Sets the run's TP/PP/CP/SP and each model's own ``seq_length`` on the providers, checks them
    (:func:`check_parallel_sizes`), makes the student's LM loss Megatron's native cross-entropy
    (``cross_entropy_fusion_impl="native"``, whatever its provider says: TE's fused cross-entropy
    overwrites the logits the KD criterion reads), loads tokenizers and W (:func:`validate_resources`,
    audit warnings included) unless ``resources`` is given, and appends a pre-wrap hook (after
    Bridge's weight-loading hooks) that, once parallel state exists, finalizes and builds the
    teachers (on the CPU if the student is initialized there, otherwise on the current GPU), the
    criterion and the balancer, and returns ``[convert_to_xtoken_distillation_model(student,
    teachers, ...)]``.  The provider's class is not changed; no global state is touched.
    """
    from nemo_xtoken.integration.config import validate_resources

    cfg.validate()
    if len(teacher_providers) != len(cfg.teachers):
        raise ConfigError(f"{len(teacher_providers)} teacher providers for {len(cfg.teachers)} configured teachers")
    p = cfg.parallel
    for i, (prov, t) in enumerate(zip(teacher_providers, cfg.teachers)):
        if (prov is None) != (t.cache is not None):
            raise ConfigError(f"teachers.{i} ({t.name}): give a provider for a live teacher and None for a cached one (teachers.N.cache)")
    for prov, seq in [(student_provider, cfg.student.seq_length)] + [
        (tp_, cfg.teacher_seq_length(t)) for tp_, t in zip(teacher_providers, cfg.teachers) if tp_ is not None
    ]:
        prov.tensor_model_parallel_size = p.tensor_model_parallel_size
        prov.pipeline_model_parallel_size = p.pipeline_model_parallel_size
        prov.context_parallel_size = p.context_parallel_size
        prov.sequence_parallel = p.sequence_parallel
        prov.seq_length = int(seq)
    check_parallel_sizes(student_provider, teacher_providers, [f"teachers.{i} ({t.name})" for i, t in enumerate(cfg.teachers)])
    student_provider.cross_entropy_fusion_impl = "native"
    if cfg.data.packing:
        # Packed documents reach Megatron's local (non-TE) attention as an explicit mask; its fused causal
        # softmax (masked_softmax_fusion, on in Bridge's GPT providers) ignores that mask in fp16/bf16
        # (megatron/core/fusions/fused_softmax.py: ScaledUpperTriangMaskedSoftmax): documents would attend
        # across each other.  TE's attention reads cu_seqlens instead and never uses this flag.
        for prov in [student_provider, *(t for t in teacher_providers if t is not None)]:
            prov.masked_softmax_fusion = False
    if resources is None:
        resources = validate_resources(cfg, base_dir=base_dir)
    teachers = list(teacher_providers)

    def xtoken_pre_wrap_hook(model_chunks: list) -> list:
        from megatron.core import parallel_state
        from megatron.core.utils import unwrap_model

        from nemo_xtoken.integration.distill import convert_to_xtoken_distillation_model, criterion_from_config

        if len(model_chunks) != 1:
            raise XTokenError(f"X-Token KD builds one model chunk (no virtual pipeline), got {len(model_chunks)}")
        student = unwrap_model(model_chunks[0])
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group()
        on_cpu = bool(getattr(student.config, "use_cpu_initialization", False))
        built = []
        for m, prov in enumerate(teachers):
            if prov is None:  # a cached teacher: its rows come with the batch
                built.append(_cached_teacher(cfg.teachers[m], resources, tp))
                continue
            # Bridge's TransformerConfig.__post_init__ is a no-op: finalize() fills init methods etc.;
            # Bridge finalizes only cfg.model (the student), so every teacher is finalized here.
            prov.finalize()
            (chunk,) = prov.provide_distributed_model(wrap_with_ddp=False, mixed_precision_wrapper=None, use_cpu_initialization=on_cpu)
            built.append(unwrap_model(chunk))
        criterion, balancer = criterion_from_config(
            cfg, resources, tp=tp, student_padded=_padded_vocab(student, tp),
            teacher_padded=[getattr(t, "vocab_size") if prov is None else _padded_vocab(t, tp) for t, prov in zip(built, teachers)],
            group=group,
        )
        # ModelOpt's DistillationModel (a Distill<GPTModel>): Megatron's config, state dicts and
        # Float16Module's cast (teachers included: they are submodules) come with the student class.
        return [convert_to_xtoken_distillation_model(student, built, criterion, balancer)]

    student_provider.register_pre_wrap_hook(xtoken_pre_wrap_hook)
    student_provider.xtoken_teachers = teachers  # for inspection; a plain attribute, no mirroring
    return student_provider


# ---- config mapping --------------------------------------------------------------------------------


def resolve_run_path(path: str | None, base_dir: str | Path | None) -> str | None:
    """A run's folder (checkpoints, TensorBoard) as an absolute path: relative ones are under ``base_dir``.

    ``base_dir`` is the config file's folder: under Slurm every experiment starts in a new working
    directory (``/nemo_run/code``), so a path relative to it would send a resubmitted run's
    ``checkpoint.load`` to an empty folder and restart it from step 0.
    """
    if path is None or base_dir is None:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(base_dir).resolve() / p))


def bridge_config_kwargs(cfg: XTokenDistillConfig, *, base_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Keyword arguments of Bridge's config classes for ``cfg`` (plain data; no Bridge import).

    Keys: ``train`` (TrainingConfig), ``validation``, ``optimizer`` (OptimizerConfig),
    ``scheduler``, ``checkpoint``, ``logger``, ``rng``, ``ddp``.  Field names are those of
    megatron-core 0.19's ``megatron.training.config`` classes, which Bridge 0.6 subclasses.
    Relative checkpoint, TensorBoard and student-checkpoint paths are resolved against ``base_dir``
    (the config's folder; :func:`resolve_run_path`).
    """
    o, tr, ck, lg = cfg.optimizer, cfg.train, cfg.checkpoint, cfg.logging
    save, load = resolve_run_path(ck.save, base_dir), resolve_run_path(ck.load, base_dir)
    return {
        "train": {
            "train_iters": tr.train_iters,
            "global_batch_size": tr.global_batch_size,
            "micro_batch_size": tr.micro_batch_size,
            "exit_duration_in_mins": tr.exit_duration_in_mins,  # a checkpoint and a clean exit before Slurm's time limit
        },
        "validation": {"eval_interval": tr.eval_interval, "eval_iters": 0},
        "optimizer": {
            "optimizer": "adam",  # Megatron's Adam with decoupled weight decay = AdamW
            "lr": o.lr,
            "min_lr": o.min_lr,
            "weight_decay": o.weight_decay,
            "adam_beta1": o.adam_beta1,
            "adam_beta2": o.adam_beta2,
            "adam_eps": o.adam_eps,
            "clip_grad": o.clip_grad,
            "bf16": tr.bf16,
            "fp16": False,
            "params_dtype": torch.bfloat16 if tr.bf16 else torch.float32,
            "use_distributed_optimizer": True,
        },
        "scheduler": {
            "lr_decay_style": o.lr_decay_style,
            "lr_warmup_iters": cfg.warmup_iters,
            "lr_decay_iters": tr.train_iters,
            "start_weight_decay": o.weight_decay,
            "end_weight_decay": o.weight_decay,
            "weight_decay_incr_style": "constant",
        },
        "checkpoint": {
            "save": save,
            "load": load if load is not None else save,  # resume from the save folder when it has one
            "save_interval": ck.save_interval,
            "ckpt_format": ck.ckpt_format,
            "async_save": ck.async_save,
            "pretrained_checkpoint": resolve_run_path(cfg.student.checkpoint, base_dir),
        },
        "logger": {
            "log_interval": lg.log_interval,
            "tensorboard_dir": resolve_run_path(lg.tensorboard_dir, base_dir),
            "wandb_project": lg.wandb_project or "",
            "wandb_exp_name": cfg.student.name if lg.wandb_project else "",
        },
        "rng": {"seed": tr.seed},
        "ddp": {
            "grad_reduce_in_fp32": True,
            "overlap_grad_reduce": True,
            "overlap_param_gather": True,
            "use_distributed_optimizer": True,
            "check_for_nan_in_grad": True,
        },
    }


# ---- data ------------------------------------------------------------------------------------------


class _StreamView(torch.utils.data.Dataset):
    """``n`` samples of a :class:`DualTokenizedDataset` stream (Megatron samplers index ``0 … n-1``)."""

    def __init__(self, ds: Any, n: int, offset: int = 0) -> None:
        from nemo_xtoken.data.batch import collate

        self.ds, self.n, self.offset = ds, int(n), int(offset)
        self.collate_fn = collate

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.ds[self.offset + int(i)]


def build_dataset(cfg: XTokenDistillConfig, num_samples: int, *, resources: Any = None, base_dir: str | Path | None = None):
    """The training stream: ``num_samples`` collatable samples of the run's :class:`DualTokenizedDataset`.

    Built by :func:`~nemo_xtoken.integration.data.dataset_from_config`: one side per cross-tokenizer
    teacher (teacher ``m ≥ 1``'s fields under ``"<key>@<m>"``), same-tokenizer teachers read the
    student side (:func:`teacher_batches_from_batch`), packed unless ``data.packing: false``.
    """
    from nemo_xtoken.integration.config import validate_resources
    from nemo_xtoken.integration.data import dataset_from_config

    if resources is None:
        resources = validate_resources(cfg, base_dir=base_dir)
    return _StreamView(dataset_from_config(cfg, resources, base_dir=base_dir), num_samples)


def make_dataset_provider(cfg: XTokenDistillConfig, *, base_dir: str | Path | None = None, resources: Any = None):
    """A Bridge ``DatasetProvider`` (dataclass) whose ``build_datasets`` calls :func:`build_dataset` (needs Bridge)."""
    require_bridge()
    from megatron.bridge.data.base import DatasetProvider

    @dataclasses.dataclass(kw_only=True)
    class XTokenDatasetProvider(DatasetProvider):
        """Dual-tokenized X-Token data (train split only; validation is off)."""

        xtoken_config: dict = dataclasses.field(default_factory=dict)
        base_dir: str | None = None
        seq_length: int = 0

        def build_datasets(self, context):  # noqa: D102
            return build_dataset(cfg, context.train_samples, resources=resources, base_dir=self.base_dir), None, None

    from nemo_xtoken.integration.config import config_to_dict

    return XTokenDatasetProvider(
        xtoken_config=config_to_dict(cfg), base_dir=str(base_dir) if base_dir else None, seq_length=cfg.student.seq_length,
        dataloader_type="single", num_workers=2, persistent_workers=True,
    )


def build_config_container(cfg: XTokenDistillConfig, *, base_dir: str | Path | None = None, load_weights: bool = True):
    """The Bridge ``ConfigContainer`` of a run: HF models through ``AutoBridge``, X-Token provider, data, schedule."""
    require_bridge()
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )

    from nemo_xtoken.integration.config import validate_resources

    resources = validate_resources(cfg, base_dir=base_dir)
    student, teachers = build_providers(cfg, base_dir=base_dir, load_weights=load_weights)
    convert_to_xtoken_distillation_provider(student, teachers, cfg, resources=resources, base_dir=base_dir)
    kw = bridge_config_kwargs(cfg, base_dir=base_dir)
    extra = {}
    if any(t.learnable_w for t in cfg.teachers):
        extra["optimizer_config_override_provider"] = _learnable_w_own_group(cfg)
    return ConfigContainer(**extra,
        model=student,
        train=TrainingConfig(**kw["train"]),
        validation=ValidationConfig(**kw["validation"]),
        optimizer=OptimizerConfig(**kw["optimizer"]),
        scheduler=SchedulerConfig(**kw["scheduler"]),
        dataset=make_dataset_provider(cfg, base_dir=base_dir, resources=resources),
        logger=LoggerConfig(**kw["logger"]),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=_resolve_model(cfg.student.model, base_dir)),
        checkpoint=CheckpointConfig(**kw["checkpoint"]),
        rng=RNGConfig(**kw["rng"]),
        ddp=DistributedDataParallelConfig(**kw["ddp"]),
    )


def _learnable_w_own_group(cfg: XTokenDistillConfig) -> Any:
    """Bridge's optimizer-override provider with a learnable W in a parameter group of its own.

    A learnable W stays fp32 in a bf16 model (``_keep_in_float32_parameter_names``); megatron-core
    0.19.2's distributed optimizer lists a group's fp32 shards before its bf16 ones
    (``distrib_optimizer.py:486-489``) but maps parameters to their position in the unsorted group,
    so a group mixing both looks up another parameter's state: the first checkpoint save fails
    (``:1958``).  W (1-D: no weight decay, like the norms, ``wd_mult`` 0) gets its own group through
    ``start_wd = end_wd = 0``: the same (zero) weight decay, but a group identifier of its own (groups
    with equal identifiers are merged when a checkpoint is loaded, ``optimizer.py:139``).
    """
    from megatron.bridge.training.config import OptimizerConfigOverrideProvider
    from megatron.core.optimizer.optimizer_config import ParamKey

    @dataclasses.dataclass
    class XTokenOptimizerOverrides(OptimizerConfigOverrideProvider):
        def build_config_overrides(self, context):  # noqa: D102
            out = dict(super().build_config_overrides(context) or {})
            out[ParamKey(name="*learnable_w.*")] = {"start_wd": 0.0, "end_wd": 0.0}
            return out

    return XTokenOptimizerOverrides()


def run_pretrain(container: Any) -> None:
    """``megatron.bridge.training.pretrain.pretrain(container, forward_step)``."""
    require_bridge()
    from megatron.bridge.training.pretrain import pretrain

    pretrain(container, forward_step)

