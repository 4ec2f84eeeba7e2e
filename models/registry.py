"""Model registry: HF `architectures` name -> functional Flax model class."""

from __future__ import annotations

import flax.linen as nn

from .config import ModelConfig
from .llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(MODEL_CLASSES))


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the model class registered for `config.architecture`."""
    try:
        model_class = MODEL_CLASSES[config.architecture]
    except KeyError:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}") from None
    return model_class(config)
