"""`zsad` command line: one module per command under zsad_core/commands/.

Each module there defines `add_parser(subparsers)`, which adds its sub-command and sets
`run(args) -> exit code`; modules are found automatically.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .errors import ZsadError



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zsad", description="CLIP-based zero-shot anomaly detection: reproduce, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"zsad_core.commands.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ZsadError as err:
        print(f"zsad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zsad {args.command}: interrupted; finished results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
