"""The ``layerskip`` command: each sub-command is a module of commands/ (NAME, HELP, add_args, run)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .commands import analyze, check_lossless, demo, draft_vocab, generate, info, reproduce, sweep, train
from .errors import LayerSkipError

COMMANDS = (info, generate, check_lossless, demo, sweep, draft_vocab, train, analyze, reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerskip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP)
        command.add_args(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayerSkipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
