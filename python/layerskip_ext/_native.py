"""Loader of the compiled extension ``layerskip_ext._C``.

Importing ``_C`` registers the native ops as ``torch.ops.layerskip.*`` (static initialisers in csrc/). A source
checkout that was never built has no ``_C``: the package still imports, the ``*_reference`` ops work, and the
native ops raise :data:`NOT_BUILT_MESSAGE`.
"""
from __future__ import annotations

from typing import Any

import torch  # libtorch must be loaded before _C

from ._version import __version__

NOT_BUILT_MESSAGE = ("layerskip_ext native extension is not built: pip install --no-build-isolation -e . "
                     "(from the repository root; needs a C++20 compiler, CMake >= 3.25 and ninja; "
                     "LAYERSKIP_CUDA=0 for a CPU-only build)")

_C: Any = None
_load_error: str | None = None
try:
    from . import _C  # type: ignore[attr-defined, no-redef]  # noqa: F811
except ModuleNotFoundError as e:  # not built
    _load_error = f"{NOT_BUILT_MESSAGE} [{e}]"
except ImportError as e:  # built, but cannot be loaded (e.g. built against another torch)
    _load_error = (f"layerskip_ext native extension failed to load: {e}. Rebuild it against the installed torch "
                   f"{torch.__version__}: pip install --no-build-isolation -e .")


def native_available() -> bool:
    """True when the compiled extension is loaded and its ops are registered."""
    return _C is not None


def require_native() -> None:
    """Raise a RuntimeError that says how to build the extension, unless it is loaded."""
    if _C is None:
        raise RuntimeError(_load_error or NOT_BUILT_MESSAGE)


def load_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    return _load_error


def build_info() -> dict[str, Any]:
    """How the extension was built and what runs here.

    Keys: native (bool), version, torch (version built against), cuda_compiled, cuda_archs (list of str),
    cpu_isa (CPU kernel variant chosen at load time: "avx512", "avx2" or "generic"), cpu_features (dict),
    max_head_dim, gemm_isa (the linear / attention kernel table in use: "avx512bf16", "avx512", "avx2" or
    "generic") and gemm_isas (the tables this CPU can run, best first), and at run time: torch_runtime (installed
    torch), cuda_available (torch.cuda.is_available()).
    """
    if _C is not None:
        info: dict[str, Any] = dict(_C.build_info())
        info["native"] = True
    else:

        info = {"native": False, "version": __version__, "torch": None, "cuda_compiled": False, "cuda_archs": [],
                "cpu_isa": None, "cpu_features": {}, "max_head_dim": None, "error": _load_error}
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
