"""layerskip_ext: LayerSkip (early-exit training, early exit, self-speculative decoding) for Llama-family models."""
from ._native import build_info
from ._version import __version__
from .errors import CheckpointError, GenerationError, LayerSkipError

__all__ = ["build_info", "__version__", "CheckpointError", "GenerationError", "LayerSkipError"]
