"""Weight and tokenizer loading: GGUF files, HF safetensors checkpoints, model resolution.

Loaders return `(ModelConfig, params, Tokenizer)` with params as numpy arrays in the
layout of `models/params.py`; the engine moves them to the device.
"""

from .dtypes import resolve_dtype
from .gguf_loader import load_gguf
from .hf_loader import DEFAULT_SUPPORTED_ARCHITECTURES, load_hf_checkpoint, read_hf_config
from .model_source import default_gguf_path, load_model, resolve_model
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SUPPORTED_ARCHITECTURES",
    "Tokenizer",
    "default_gguf_path",
    "load_gguf",
    "load_hf_checkpoint",
    "load_model",
    "read_hf_config",
    "resolve_dtype",
    "resolve_model",
]
