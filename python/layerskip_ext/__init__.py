"""layerskip_ext: LayerSkip (early-exit training, early exit, self-speculative decoding) for Llama-family models."""
from .errors import CheckpointError, GenerationError, LayerSkipError

__version__ = "0.1.0"
