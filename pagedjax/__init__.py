"""pagedjax: a pure-JAX LLM inference engine with a paged KV cache and continuous batching."""

from pagedjax.models.forward import forward

from . import distributed
from .api import EngineCache, clear_engine_cache, generate
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .checkpoint import load_params, save_params
from .config import EngineConfig
from .flax_params import params_from_flax
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .rollout import Rollout, completion_logprobs, rollout
from .sampling_params import SamplingParams
from .structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence",
           "CompletionOutput", "EngineCache", "EngineConfig", "Logprob", "RequestMetrics",
           "RequestOutput", "Rollout", "SamplingParams", "StructuredOutputsParams",
           "clear_engine_cache", "completion_logprobs", "distributed", "forward", "generate",
           "load_params", "params_from_flax", "rollout", "save_params"]
