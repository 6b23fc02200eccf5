from .config import LlamaConfig
from .kv_cache import StaticKVCache
from .llama import LlamaForCausalLM
from .loading import load_model

__all__ = ["LlamaConfig", "LlamaForCausalLM", "StaticKVCache", "load_model"]
