"""Model configuration for Llama-family decoders.

Field names follow Hugging Face's ``LlamaConfig`` so a ``config.json`` round-trips unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3 style: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None means plain RoPE.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int or list of ints, as in HF configs
    torch_dtype: str = "float32"
    # Our own block in config.json: the tuned self-speculation setting {"exit_layer": E, "num_speculations": d}
    # of a LayerSkip-trained model, used when the caller does not choose.
    layerskip: Optional[dict] = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise CheckpointError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise CheckpointError(f"rms_norm_eps must be a positive finite number, got {self.rms_norm_eps}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise CheckpointError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's projections (q, k, v, o, gate, up, down): what each token multiplies."""
        H, D = self.hidden_size, self.head_dim
        return H * D * 2 * (self.num_attention_heads + self.num_key_value_heads) + 3 * H * self.intermediate_size

    @property
    def num_parameters(self) -> int:
        """Every parameter of the model: embedding, layers (projections and two norms), final norm, and the LM head
        unless it is tied to the embedding (no biases in Llama)."""
        H = self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return self.vocab_size * H + self.num_hidden_layers * (self.layer_matmul_params + 2 * H) + H + head

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, (list, tuple)):
            return [int(t) for t in self.eos_token_id]
        return [int(self.eos_token_id)]

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"unknown architecture: model_type={model_type!r}, architectures={archs!r}; "
                f"supported: model_type 'llama' / LlamaForCausalLM")
        d = dict(d)
        params = d.pop("rope_parameters", None)  # transformers >= 5 nests theta and scaling here
        if isinstance(params, dict):
            params = dict(params)
            if "rope_theta" in params:
                d.setdefault("rope_theta", params.pop("rope_theta"))
            if params.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", params)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if n not in d]
        if missing:
            raise CheckpointError(f"config.json is missing required fields: {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        if isinstance(kwargs.get("rope_scaling"), dict):
            kind = kwargs["rope_scaling"].get("rope_type", kwargs["rope_scaling"].get("type"))
            if kind == "default":
                kwargs["rope_scaling"] = None
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = list(SUPPORTED_ARCHITECTURES)
        d["model_type"] = "llama"
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        d["mlp_bias"] = False
        return d
