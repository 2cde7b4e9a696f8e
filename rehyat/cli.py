"""Command-line interface: ``rehyat <command> ...``.

Each command lives in ``rehyat.commands.<name>`` with ``add_parser(subparsers)`` and ``run(args) -> int``; this
module only dispatches, and imports a command's module (and so diffusers) only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands._checks import USER_ERRORS

# command name -> module under rehyat.commands
COMMANDS = {
    "generate": "generate",
    "convert": "convert",
    "distill": "distill",
    "finetune": "finetune",
    "prepare-data": "prepare_data",
    "world": "world",
    "eval": "evaluate",
    "demo": "demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehyat", description="ReHyAt: recurrent hybrid attention for Wan video models")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rehyat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(run `rehyat {name} --help`)")
            continue
        try:
            mod = importlib.import_module(f"rehyat.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"rehyat.commands.{module}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        # Bad input (exit status 2), or a run whose output held NaN / Inf and was refused (FloatingPointError, e.g.
        # rehyat.pipelines.NonFiniteOutputError; exit status 1): one clear line, no traceback (set REHYAT_DEBUG=1
        # to see it).
        if os.environ.get("REHYAT_DEBUG"):
            raise
        print(f"rehyat {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2


if __name__ == "__main__":
    sys.exit(main())
