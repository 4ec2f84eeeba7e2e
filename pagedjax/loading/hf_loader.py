"""Loading an HF transformers checkpoint directory (config.json + safetensors) into params.

HF keeps one tensor per projection per layer; params fuse q/k/v and gate/up and stack the
layers (`models/params.py`). Each tensor is read, converted to the requested dtype and
copied into its slice of the preallocated stacked arrays.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

from pagedjax.models.config import ModelConfig

from .dtypes import resolve_dtype
from .params_builder import ParamsBuilder
from .safetensors_files import checkpoint_files, iter_tensors
from .tokenizer import Tokenizer

DEFAULT_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# HF per-layer tensor name (after "model.layers.N.") -> (params leaf, fused part).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("wqkv", "q"),
    "self_attn.k_proj.weight": ("wqkv", "k"),
    "self_attn.v_proj.weight": ("wqkv", "v"),
    "self_attn.q_proj.bias": ("bqkv", "q"),
    "self_attn.k_proj.bias": ("bqkv", "k"),
    "self_attn.v_proj.bias": ("bqkv", "v"),
    "self_attn.o_proj.weight": ("wo", None),
    "self_attn.o_proj.bias": ("bo", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_proj.weight": ("w_gate_up", "gate"),
    "mlp.up_proj.weight": ("w_gate_up", "up"),
    "mlp.down_proj.weight": ("w_down", None),
}
_TOP_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
                "lm_head.weight": "lm_head"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints saved; they are recomputed from the config.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def read_hf_config(model_dir: str | os.PathLike) -> ModelConfig:
    """ModelConfig from `model_dir`/config.json; ValueError naming a missing field."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(model_dir)} has no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    try:
        return ModelConfig.from_hf_dict(hf)
    except KeyError as err:
        raise ValueError(f"{path} is missing field {err.args[0]!r}") from err


def load_hf_checkpoint(
    model_dir: str | os.PathLike,
    dtype: Any = None,
    supported_architectures: Sequence[str] = DEFAULT_SUPPORTED_ARCHITECTURES,
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Load (config, params as numpy arrays of `dtype` (default float32), tokenizer)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir} does not exist")
    np_dtype = resolve_dtype(dtype)
    config = read_hf_config(model_dir)
    if config.architecture not in supported_architectures:
        raise ValueError(
            f"architecture {config.architecture} is not supported; supported: "
            f"{', '.join(supported_architectures)}"
        )
    files = checkpoint_files(model_dir)
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    params = _load_params(files, config, np_dtype)
    return config, params, tokenizer


def _slot_for(name: str, config: ModelConfig) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    """The params slot of HF tensor `name`; None for tensors that are skipped."""
    if _IGNORED.fullmatch(name):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # tied: the output projection is the embedding
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name], None, None
    match = _LAYER_NAME.fullmatch(name)
    if match and match.group(2) in _LAYER_TENSORS:
        leaf, part = _LAYER_TENSORS[match.group(2)]
        if leaf in ("bqkv", "bo") and not config.attention_bias:
            raise ValueError(f"checkpoint has tensor {name} but config.json does not set "
                             "attention_bias")
        return leaf, int(match.group(1)), part
    raise ValueError(f"checkpoint has tensor {name}, which this architecture does not use")


def _hf_name(leaf: str, layer: Optional[int], part: Optional[str]) -> str:
    """The HF tensor name for a params slot (for error messages)."""
    for name, top_leaf in _TOP_TENSORS.items():
        if layer is None and top_leaf == leaf:
            return name
    for suffix, (l, p) in _LAYER_TENSORS.items():
        if l == leaf and p == part:
            return f"model.layers.{layer}.{suffix}"
    return f"{leaf}[{layer}].{part}"


def _load_params(files: dict[str, list[str]], config: ModelConfig, dtype) -> dict[str, Any]:
    builder = ParamsBuilder(config, dtype)
    for path, names in files.items():
        wanted = {name: _slot_for(name, config) for name in names}
        to_read = [name for name, slot in wanted.items() if slot is not None]
        for name, array in iter_tensors(path, to_read):
            builder.put(name, array, *wanted[name])
            del array  # keep at most one checkpoint tensor alive
    return builder.build(_hf_name)
