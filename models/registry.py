"""Model registry: HF `architectures` name -> functional Flax model class."""

from __future__ import annotations

import flax.linen as nn

from .config import ModelConfig
from .gemma import GemmaForCausalLM
from .gpt2 import GPT2LMHeadModel, OPTForCausalLM
from .llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Llama variants: flags on the Llama model (see models/llama.py).
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(MODEL_CLASSES))


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class registered for `config.architecture` (its `hidden_states` and
    `output_logits` are the family's pure functions)."""
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the model class registered for `config.architecture`."""
    return model_class(config)(config)
