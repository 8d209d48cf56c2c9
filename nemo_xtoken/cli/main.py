"""``xtoken``: entry point.  Sub-commands live in one module per layer, each with ``register(sub)``.

User errors (:class:`~nemo_xtoken.errors.XTokenError`) print one line and exit 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nemo_xtoken import __version__
from nemo_xtoken.errors import XTokenError

# Each module defines register(subparsers) and sets `func` on its parsers.
COMMAND_MODULES = [
    "nemo_xtoken.cli.vocab_cmds",
    "nemo_xtoken.cli.align_cmds",
    "nemo_xtoken.cli.demo_cmds",
    "nemo_xtoken.cli.integration_cmds",
    "nemo_xtoken.cli.offline_cmds",
    "nemo_xtoken.cli.rehearse_cmds",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtoken", description="Cross-tokenizer knowledge distillation (X-Token).")
    parser.add_argument("--version", action="version", version=f"nemo_xtoken {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except XTokenError as e:
        if args.debug:
            raise
        print(f"xtoken {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
