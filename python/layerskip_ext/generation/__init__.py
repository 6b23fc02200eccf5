from .api import STRATEGIES, generate
from .core import GenerationResult, SequenceOutput
from .sampling import SamplingParams

__all__ = ["generate", "GenerationResult", "SequenceOutput", "SamplingParams", "STRATEGIES"]
