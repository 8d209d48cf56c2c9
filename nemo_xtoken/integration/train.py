"""Entry point of a distillation run: ``python -m nemo_xtoken.integration.train --config FILE [key=value ...]``.

What every rank runs (under ``torchrun`` or ``srun``, launched by ``examples/``): load the YAML
config with host-style overrides, validate it strictly, load tokenizers and W and run the coverage
audit (a warning when the configured loss contradicts it) — all before any GPU time is spent —
then build Megatron-Bridge's ``ConfigContainer`` and call ``pretrain`` with X-Token's forward
step.  ``--check`` stops after validation (no Bridge needed: usable on a login node or in CI); it also
reads, aligns and packs the first documents of ``data.paths`` at the configured lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_xtoken.errors import XTokenError

__all__ = ["build_parser", "main", "prepare"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nemo_xtoken.integration.train",
        description="X-Token cross-tokenizer distillation with Megatron-Bridge (one process per GPU).",
    )
    p.add_argument("--config", "-c", required=True, help="YAML run config (see conf/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.train_iters=100 teachers.0.weight=0.8")
    p.add_argument("--check", action="store_true", help="validate config, tokenizers, W files and audit, print the Bridge settings, exit")
    p.add_argument("--no-resources", action="store_true", help="with --check: skip loading tokenizers, W files and data")
    return p


def prepare(config: str, overrides: list[str], *, load_resources: bool = True):
    """Load + validate the config (strict) and, if asked, its tokenizers and W files (audit warnings)."""
    from nemo_xtoken.integration.config import load_config, validate_resources

    cfg = load_config(config, overrides)
    resources = validate_resources(cfg, base_dir=Path(config).resolve().parent) if load_resources else None
    return cfg, resources


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
        cfg, resources = prepare(args.config, args.overrides, load_resources=not (args.check and args.no_resources))
        if resources is not None:
            for w in resources.warnings:
                print(f"[xtoken] audit warning: {w}", file=sys.stderr)
        if args.check:
            from nemo_xtoken.integration.bridge import bridge_config_kwargs

            _check_data(cfg, resources, Path(args.config).resolve().parent)
            print(json.dumps(bridge_config_kwargs(cfg), indent=2, default=str))
            return 0
        from nemo_xtoken.integration.bridge import build_config_container, run_pretrain

        container = build_config_container(cfg, base_dir=Path(args.config).resolve().parent)
        run_pretrain(container)
        return 0
    except XTokenError as e:
        print(f"xtoken distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
