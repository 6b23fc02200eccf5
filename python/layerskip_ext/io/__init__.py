"""Checkpoint and tokenizer I/O: Hugging Face folders, GGUF files, packaged models."""
from .checkpoint import Checkpoint, expected_shapes
from .hf_folder import save_hf_folder
from .loader import load_checkpoint
from .packaged import PACKAGED_MODELS, resolve_model_path
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["Checkpoint", "load_checkpoint", "save_hf_folder", "resolve_model_path", "Tokenizer",
           "StreamDecoder", "expected_shapes", "PACKAGED_MODELS"]
