"""deltaserve: an inference engine for hybrid Gated-DeltaNet / attention language models."""

from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .llm import LLM
from .sampling.params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
