"""``python -m layerskip_ext.training {train,analyze} ...``: the two commands without the main CLI (also what
``torchrun -m layerskip_ext.training train ...`` runs)."""
from __future__ import annotations

import argparse
import sys

from ..errors import LayerSkipError
from .cli_commands import add_analyze_args, add_train_args, cmd_analyze, cmd_train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerskip_ext.training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with layer dropout and early-exit loss")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("analyze", help="per-layer accuracy / perplexity / agreement")
    add_analyze_args(p)
    p.set_defaults(func=cmd_analyze)
    args = parser.parse_args(argv)
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
