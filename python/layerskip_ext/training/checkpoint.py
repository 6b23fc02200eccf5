"""Resumable training state, written atomically.

``save_state`` pickles to ``<path>.tmp.<pid>`` in the same folder, flushes and fsyncs it, renames it over
``<path>`` (``os.replace``: atomic on POSIX) and fsyncs the folder. A crash (even kill -9) at any point leaves
either the previous complete file or the new complete file at ``<path>``; a leftover ``.tmp.*`` file is
ignored and removed by the next ``load_state``/``clean_stale``.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from .common import fsync_dir

STATE_VERSION = 1


def save_state(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def clean_stale(path: str) -> list[str]:
    """Remove leftover temp files of interrupted saves of ``path``; returns what was removed."""
    removed = []
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        try:
            os.unlink(stale)
            removed.append(stale)
        except OSError:
            pass
    return removed


def load_state(path: str) -> Optional[dict]:
    """The saved state, or None when there is none. A damaged file is a CheckpointError (never silently
    replaced)."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"training state {path} is damaged ({msg}); remove it or the output folder "
                              f"to start over") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a layerskip training state (version {STATE_VERSION})")
    return state
