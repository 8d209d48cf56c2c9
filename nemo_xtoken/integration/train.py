"""Entry point of a distillation run: ``python -m nemo_xtoken.integration.train --config FILE [key=value ...]``.

What every rank runs (under ``torchrun`` or ``srun``, launched by ``examples/``): load the YAML
config with host-style overrides, validate it strictly, load tokenizers and W and run the coverage
audit (a warning when the configured loss contradicts it) — all before any GPU time is spent —
then build Megatron-Bridge's ``ConfigContainer`` and call ``pretrain`` with X-Token's forward
step.  ``--check`` stops after validation: it also reads, aligns and packs the first documents of
``data.paths`` at the configured lengths, and asks Megatron-Bridge whether it can convert the
student and every teacher (their ``config.json`` only; :func:`~nemo_xtoken.integration.bridge.model_support`),
so a teacher Bridge cannot load (before the plugin's Phi3 bridge: Phi-4-mini) fails here, not after
the job has started.  On a machine without transformer_engine (a login node, CI) ``--check`` imports
Bridge through the scoped import hook of :mod:`nemo_xtoken.testing.bridge_te_shim`; training itself
never does.  ``--no-resources`` skips every file: tokenizers, W files, data and model configs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_xtoken.errors import XTokenError

__all__ = ["build_parser", "main", "prepare", "check_models"]


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
    """Load + validate the config (strict) and, if asked, its tokenizers and W files (audit warnings)."""
    from nemo_xtoken.integration.config import load_config, validate_resources

    cfg = load_config(config, overrides)
    resources = validate_resources(cfg, base_dir=Path(config).resolve().parent) if load_resources else None
    return cfg, resources


def check_models(cfg, base_dir: Path) -> dict:
    """Megatron-Bridge support of the student and every teacher (``{key: {model, architecture, supported, bridge}}``).

    Raises :class:`~nemo_xtoken.integration.config.ConfigError` naming the first model that Bridge cannot convert.
    """
    from nemo_xtoken.integration.bridge import _resolve_model, model_support
    from nemo_xtoken.integration.config import ConfigError
    from nemo_xtoken.testing import bridge_te_shim

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

            _check_data(cfg, resources, base_dir)
            report = bridge_config_kwargs(cfg, base_dir=base_dir)
            if not args.no_resources:
                report = {"models": check_models(cfg, base_dir), **report}
            print(json.dumps(report, indent=2, default=str))
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
