"""``layerskip info``: how the extension was built and what runs here."""
from __future__ import annotations

import argparse
import json

from .._native import build_info

NAME = "info"
HELP = "print build information (version, CUDA, CPU ISA)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
