"""layerskip_ext: LayerSkip (early-exit training, early exit, self-speculative decoding) for Llama-family models."""
from .errors import CheckpointError, GenerationError, LayerSkipError

__version__ = "0.1.0"


def build_info() -> dict:
    """Version, torch version built against, CUDA compiled (and archs), CPU ISA chosen at run time."""
    from ._native import build_info as _build_info

    return _build_info()
