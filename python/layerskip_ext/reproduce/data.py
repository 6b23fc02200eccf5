"""The reproduction's data: the running Python's own standard library, split into training code and held-out
packages, and the held-out prompts (function headers with their docstrings, cut from the held-out files).

Every Python install has it, so ``layerskip reproduce`` needs no download: ~10 MB of code after leaving out the
test suites, vendored and GUI packages, and the held-out packages (which no tokenizer or model sees in training).
"""
from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
from typing import Optional

from ..errors import TrainingError
from ..prompts import humaneval_path, read_prompts

# Never read: test suites (huge and repetitive), installed third-party code, GUI and tooling data, build files.
EXCLUDED = ("test", "site-packages", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
            "distutils")
# Held out from the tokenizer and both models: evaluation text and prompts come from here.
HELD_OUT = ("asyncio", "email", "json")


def stdlib_dir() -> str:
    path = sysconfig.get_path("stdlib")
    if not path or not os.path.isdir(path):
        raise TrainingError("cannot find the Python standard library (sysconfig's stdlib path); pass --data")
    return path


def training_exclusions(root: str) -> list[str]:
    """Paths relative to the stdlib folder to leave out of training: EXCLUDED, HELD_OUT and the config-* build
    folder."""
    extra = sorted(n for n in os.listdir(root) if n.startswith("config-"))
    return [n for n in (*EXCLUDED, *HELD_OUT, *extra) if os.path.exists(os.path.join(root, n))]


def held_out_dirs(root: str) -> list[str]:
    return [os.path.join(root, n) for n in HELD_OUT if os.path.isdir(os.path.join(root, n))]


def _source_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def function_prompts(folders: list[str], limit: int, min_doc_chars: int = 40,
                     max_chars: int = 1200) -> list[str]:
    """Prompts that end where a function's body begins: its header (decorators left out) and docstring, dedented
    (methods too), from the folders' .py files in a fixed order; every k-th so they spread over the files."""
    return spread(documented_functions(folders, min_doc_chars, max_chars), limit)


def spread(found: list[str], limit: int) -> list[str]:
    """Every k-th of found, at most limit of them (function_prompts' choice)."""
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def documented_functions(folders: list[str], min_doc_chars: int = 40, max_chars: int = 1200) -> list[str]:
    """Every function_prompts candidate in the folders, in order (each file parsed once)."""
    found: list[str] = []
    for path in (p for f in folders for p in _source_files(f)):
        try:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant)
                    and isinstance(doc.value.value, str)) or len(doc.value.value) < min_doc_chars:
                continue
            if len(node.body) < 2:  # a docstring-only function has no body to predict
                continue
            text = textwrap.dedent("".join(lines[node.lineno - 1:doc.end_lineno]))
            if len(text) <= max_chars:
                found.append(text if text.endswith("\n") else text + "\n")
    if not found:
        raise TrainingError(f"no function with a docstring found under {', '.join(folders)}")
    return found


def held_out_text(folders: list[str], max_bytes: Optional[int] = None) -> list[str]:
    """The held-out packages' source files, as documents (the per-layer evaluation reads these)."""
    docs, total = [], 0
    for path in (p for f in folders for p in _source_files(f)):
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        docs.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return docs


def evaluation_prompts(folders: list[str], functions: int, humaneval: int) -> list[dict]:
    """The prompts a reproduction evaluates on: ``functions`` held-out function headers + docstrings, then the
    first ``humaneval`` HumanEval prompts (an optional extra: ImportError/OSError when it is not installed).
    -> [{"source": ..., "text": ...}]."""
    prompts = [{"source": "held-out functions", "text": t} for t in function_prompts(folders, functions)]
    if humaneval:
        prompts += [{"source": "HumanEval", "text": t} for t in read_prompts(humaneval_path())[:humaneval]]
    return prompts


def stop_fit_prompts(folders: list[str], functions: int, humaneval: int, evaluated: int = 12,
                     evaluated_humaneval: int = 12) -> list[str]:
    """Prompts to fit a draft stop model on (analysis/draft_stop_fit.py), none of them evaluation_prompts'
    (held-out functions spread over the files other than the first ``evaluated``, then HumanEval past the first
    ``evaluated_humaneval``): a stop model is measured on prompts it was not fitted to."""
    found = documented_functions(folders)
    taken = set(spread(found, evaluated))
    others = [t for t in spread(found, 10 * functions) if t not in taken]
    texts = spread(others, functions)
    if humaneval:
        texts += read_prompts(humaneval_path())[evaluated_humaneval:evaluated_humaneval + humaneval]
    return texts
