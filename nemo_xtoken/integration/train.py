"""Entry point of a distillation run: ``python -m nemo_xtoken.integration.train --config FILE [key=value ...]``.

What every rank runs (under ``torchrun`` or ``srun``, launched by ``examples/``): load the YAML
config with host-style overrides, validate it strictly, load tokenizers and W and run the coverage
audit (a warning when the configured loss contradicts it) — all before any GPU time is spent —
then build Megatron-Bridge's ``ConfigContainer`` and call ``pretrain`` with X-Token's forward
step.  ``--check`` stops after validation: it also reads, aligns and packs the first documents of
``data.paths`` at the configured lengths, and asks Megatron-Bridge whether it can convert the
student and every teacher (their ``config.json`` only; :func:`~nemo_xtoken.integration.bridge.model_support`),
so a teacher Bridge cannot load (before the plugin's Phi3 bridge: Phi-4-mini) fails here, not after
the job has started.  It also builds the run's criterion at the configured tensor-parallel size
(:func:`exchange_report`) and reports how each teacher's loss crosses the TP ranks (P-KL plan,
low-traffic summary or exact all-gather: ``distill.tp_exchange``) and the bytes per token per
rank.  On a machine without transformer_engine (a login node, CI) ``--check`` imports Bridge
through the scoped import hook of :mod:`nemo_xtoken.cpu.bridge_te_shim`; training itself
never does.  ``--no-resources`` skips every file: tokenizers, W files, data and model configs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_xtoken.errors import XTokenError

__all__ = [
    "build_parser", "main", "prepare", "check_models", "check_tensor_parallel", "check_packed_micro_batch", "finished_iteration",
    "exchange_report", "format_exchange_report",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nemo_xtoken.integration.train",
        description="X-Token cross-tokenizer distillation with Megatron-Bridge (one process per GPU).",
    )
    p.add_argument("--config", "-c", required=True, help="YAML run config (see conf/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.train_iters=100 teachers.0.weight=0.8")
    p.add_argument("--check", action="store_true", help="validate config, tokenizers, W files and audit, print the Bridge settings, exit")
    p.add_argument("--no-resources", action="store_true", help="with --check: skip tokenizers, W files, data and model configs")
    return p


def prepare(config: str, overrides: list[str], *, load_resources: bool = True):
    """Load + validate the config (strict) and, if asked, its tokenizers and W files (audit warnings).

    Before any file is read, hub ids the run needs must be in the local Hugging Face cache when the
    hub is offline (:func:`~nemo_xtoken.integration.hub.check_hub_cache`: fails at once, naming them).
    """
    from nemo_xtoken.integration.config import load_config, validate_resources
    from nemo_xtoken.integration.hub import check_hub_cache

    cfg = load_config(config, overrides)
    base_dir = Path(config).resolve().parent
    if load_resources:
        check_hub_cache(cfg, base_dir)
    resources = validate_resources(cfg, base_dir=base_dir) if load_resources else None
    return cfg, resources


#: Hugging Face config fields Megatron splits over the tensor-parallel ranks (name in the message, attribute).
_TP_SPLIT = (
    ("attention heads", "num_attention_heads"),
    ("KV heads (query groups)", "num_key_value_heads"),
    ("MLP width", "intermediate_size"),
    ("vocabulary (output layer, unpadded by Bridge)", "vocab_size"),
)


def check_tensor_parallel(cfg, base_dir: Path) -> dict:
    """Refuse a ``parallel.tensor_model_parallel_size`` that one of the run's models cannot be split by.

    Megatron divides each model's attention heads, KV heads (query groups), MLP width and (Bridge
    keeps the Hugging Face size unpadded) vocabulary by TP; the run would stop in model construction.
    Checked from every live model's ``config.json``; the error names the model, the field and the
    nearest TP valid for *every* model of the run.  Returns ``{key: {field: size}}`` and the valid sizes.
    """
    from nemo_xtoken.integration.bridge import _hf_config, _resolve_model
    from nemo_xtoken.integration.config import ConfigError

    tp = cfg.parallel.tensor_model_parallel_size
    sizes = {}
    for key, model in [("student.model", cfg.student.model)] + [
        (f"teachers.{i}.model", t.model) for i, t in enumerate(cfg.teachers) if t.cache is None
    ]:
        if not model:
            continue
        c = _hf_config(_resolve_model(model, base_dir, key))
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        row = {}
        for what, attr in _TP_SPLIT:
            v = getattr(c, attr, None)
            if v is None and attr == "num_key_value_heads":
                v = getattr(c, "num_attention_heads", None)
            if isinstance(v, int) and v > 0:
                row[attr] = v
        sizes[key] = (model, row)
    limit = min([v for _, row in sizes.values() for v in row.values()] or [max(tp, 1)])
    valid = [d for d in range(1, limit + 1) if all(v % d == 0 for _, row in sizes.values() for v in row.values())]
    for key, (model, row) in sizes.items():
        for what, attr in _TP_SPLIT:
            if attr in row and row[attr] % tp:
                best = min(abs(d - tp) for d in valid)
                near = " or ".join(str(d) for d in valid if abs(d - tp) == best)
                raise ConfigError(
                    f"parallel.tensor_model_parallel_size={tp}: {key}={model} has {row[attr]} {what} ({attr}), which "
                    f"Megatron splits over the TP ranks and {tp} does not divide; the nearest size valid for every model "
                    f"of this run is {near} (valid: {valid})"
                )
    return {"models": {k: row for k, (_, row) in sizes.items()}, "valid_tensor_model_parallel_sizes": valid}


def check_packed_micro_batch(cfg) -> None:
    """Refuse ``train.micro_batch_size`` > 1 with packing, as the GPU run does at its first step (docs/data.md)."""
    from nemo_xtoken.integration.config import ConfigError

    mb = cfg.train.micro_batch_size
    if cfg.data.packing and mb > 1:
        raise ConfigError(
            f"train.micro_batch_size={mb} with data.packing=true: Transformer Engine's attention (the layer spec of a "
            "GPU run) reads one packed sequence per micro-batch (THD), so the run would stop at its first step; set "
            "train.micro_batch_size=1 (the nearest valid value; global_batch_size is reached by gradient accumulation), "
            "or data.packing=false"
        )


def finished_iteration(cfg, base_dir: Path) -> int | None:
    """The iteration the run resumes from (``latest_checkpointed_iteration.txt`` of its load folder), or None."""
    from nemo_xtoken.integration.bridge import bridge_config_kwargs

    load = bridge_config_kwargs(cfg, base_dir=base_dir)["checkpoint"]["load"]
    f = Path(load) / "latest_checkpointed_iteration.txt" if load else None
    if f is None or not f.is_file():
        return None
    text = f.read_text().strip()
    return int(text) if text.isdigit() else None


def check_models(cfg, base_dir: Path) -> dict:
    """Megatron-Bridge support of the student and every teacher (``{key: {model, architecture, supported, bridge}}``).

    Raises :class:`~nemo_xtoken.integration.config.ConfigError` naming the first model that Bridge cannot convert.
    """
    from nemo_xtoken.integration.bridge import _resolve_model, model_support
    from nemo_xtoken.integration.config import ConfigError
    from nemo_xtoken.cpu import bridge_te_shim

    bridge_te_shim.install()  # no-op where transformer_engine is installed
    out = {}
    entries = [("student.model", cfg.student.model)] + [  # a cached teacher (teachers.N.cache) has no model
        (f"teachers.{i}.model", t.model) for i, t in enumerate(cfg.teachers) if t.cache is None
    ]
    for key, model in entries:
        if not model:
            raise ConfigError(f"{key} is not set: Megatron-Bridge builds every model from a Hugging Face id or folder")
        sup = model_support(_resolve_model(model, base_dir))
        out[key] = {"model": model, "architecture": sup.architecture, "supported": sup.supported, "bridge": sup.bridge}
        if not sup.supported:
            raise ConfigError(f"{key}={model}: {sup.architecture} cannot be converted by Megatron-Bridge: {sup.reason}")
    from nemo_xtoken.integration.bridge import resolve_checkpoint, resolve_run_path

    for i, t in enumerate(cfg.teachers):
        if t.checkpoint:  # loaded instead of the HF weights: it must be a checkpoint now, not after the job starts
            resolve_checkpoint(resolve_run_path(t.checkpoint, base_dir), key=f"teachers.{i}.checkpoint")
    return out


def _output_width(model: str, base_dir: Path) -> int:
    """A model's output width as the run builds it: its Hugging Face config's ``vocab_size``.

    Bridge keeps a preset vocabulary size unpadded (``should_pad_vocab`` is off for it), so this is
    the width of the student's and every live teacher's output layer.
    """
    from nemo_xtoken.integration.bridge import _hf_config, _resolve_model

    c = _hf_config(_resolve_model(model, base_dir))
    v = getattr(c, "vocab_size", None)
    if v is None and hasattr(c, "get_text_config"):
        v = getattr(c.get_text_config(), "vocab_size", None)
    if v is None:
        raise XTokenError(f"{model}: its Hugging Face config has no vocab_size: cannot size the output layer")
    return int(v)


def exchange_report(cfg, resources, base_dir: Path) -> list[dict]:
    """Per teacher: how its loss crosses the tensor-parallel ranks and, with resources, the bytes per token per rank.

    Builds the run's criterion (:func:`~nemo_xtoken.integration.distill.criterion_from_config`) at
    ``parallel.tensor_model_parallel_size`` with the models' output widths read from their Hugging
    Face configs (a cached teacher: its vocabulary padded as the run pads it) and returns its
    :meth:`~nemo_xtoken.integration.distill.XTokenLogitsLoss.traffic`.  Without resources (no W
    read) only the exchange each teacher will use.
    """
    from nemo_xtoken.integration.config import exchange_mode

    tp = cfg.parallel.tensor_model_parallel_size
    if resources is None:
        return [{"teacher": t.name, "loss": t.loss, "exchange": exchange_mode(t.loss, cfg.distill.tp_exchange, tp), "tp": tp}
                for t in cfg.teachers]
    from nemo_xtoken.integration.distill import criterion_from_config
    from nemo_xtoken.offline import padded_vocab_size

    widths = []
    for t in cfg.teachers:
        if t.cache is not None:
            widths.append(padded_vocab_size(resources.caches[t.name].vocab_size, tp))
        else:
            widths.append(_output_width(t.model, base_dir))
    crit, _ = criterion_from_config(cfg, resources, tp=tp, student_padded=_output_width(cfg.student.model, base_dir), teacher_padded=widths)
    return crit.traffic()


def format_exchange_report(rows: list[dict]) -> str:
    """One line per teacher: exchange, bytes per token per rank, share of an all-gather."""
    lines = []
    for r in rows:
        head = f"kd exchange: teacher {r['teacher']} ({r['loss']}, tp {r['tp']}): {r['exchange']}"
        if "summary_bins" in r:
            head += f" ({r['summary_bins']} bins, bounded error logged as kd_bound/{r['teacher']})"
        b = r.get("bytes_per_token_per_rank")
        if b is not None:
            head += f"; {b['mean']:,.0f} bytes per token per rank (busiest rank {b['max']:,.0f})"
            if r.get("fraction_of_all_gather") is not None:
                head += f", {100 * r['fraction_of_all_gather']:.1f} % of an all-gather ({r['all_gather_bytes']:,.0f})"
        if "partition" in r:
            p = r["partition"]
            head += (f"; partition: {p['level1_buckets']:,} level-1 buckets ({p['buckets_with_several_teacher_tokens']:,} join several "
                     f"teacher tokens, {p['buckets_with_several_student_tokens']:,} several student tokens), "
                     f"{p['student_tokens_spelled_by_several_teacher_tokens']:,} student tokens spelled by several teacher tokens "
                     f"(longest {p['longest_student_spelling']}), {p['student_tokens_in_no_bucket']:,} in no bucket")
        lines.append(head)
    return "\n".join(lines)


def _check_data(cfg, resources, base_dir: Path) -> None:
    """``--check``'s data part (docs/data.md): the paths exist, the first documents read, align and pack.

    Skipped with ``--no-resources`` (the config alone is checked then; the data needs the tokenizers).
    """
    from nemo_xtoken.integration.data import check_data, format_data_check

    if resources is not None:
        print(format_data_check(check_data(cfg, resources, base_dir=base_dir)), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base_dir = Path(args.config).resolve().parent
        cfg, resources = prepare(args.config, args.overrides, load_resources=not (args.check and args.no_resources))
        if resources is not None:
            for w in resources.warnings:
                print(f"[xtoken] audit warning: {w}", file=sys.stderr)
        if args.check:
            from nemo_xtoken.integration.bridge import bridge_config_kwargs

            check_packed_micro_batch(cfg)
            _check_data(cfg, resources, base_dir)
            report = bridge_config_kwargs(cfg, base_dir=base_dir)
            if not args.no_resources:
                report = {"models": check_models(cfg, base_dir), "tensor_parallel": check_tensor_parallel(cfg, base_dir), **report}
            cfg.check_sequence_parallel(args.config)
            exchange = exchange_report(cfg, resources, base_dir)
            print(format_exchange_report(exchange), file=sys.stderr)
            report = {"kd_exchange": exchange, **report}
            from nemo_xtoken.integration.config import format_loss_options, loss_options

            print(format_loss_options(cfg), file=sys.stderr)
            report = {"kd_options": {"kd_scale_max": cfg.distill.kd_scale_max,
                                     "teachers": {t.name: loss_options(cfg.distill, t.loss) for t in cfg.teachers}}, **report}
            print(json.dumps(report, indent=2, default=str))
            return 0
        cfg.check_sequence_parallel(args.config)
        done = finished_iteration(cfg, base_dir)
        if done is not None and done >= cfg.train.train_iters:  # a later part of a Slurm resubmission chain
            print(f"[xtoken] the checkpoint holds iteration {done} ≥ train.train_iters={cfg.train.train_iters}: "
                  "nothing left to train; exiting", file=sys.stderr)
            return 0
        from nemo_xtoken.integration.bridge import build_config_container, run_pretrain

        container = build_config_container(cfg, base_dir=base_dir)
        run_pretrain(container)
        return 0
    except XTokenError as e:
        print(f"xtoken distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
