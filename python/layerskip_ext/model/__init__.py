from ..config import LlamaConfig
from .decoder import Decoder, DecoderError
from .kv_cache import StaticKVCache
from .llama import LlamaForCausalLM
from .loading import load_model

__all__ = ["LlamaConfig", "LlamaForCausalLM", "StaticKVCache", "Decoder", "DecoderError", "load_model"]
