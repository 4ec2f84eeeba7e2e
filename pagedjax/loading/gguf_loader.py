"""Loading a llama.cpp GGUF file: config from metadata, dequantized params, tokenizer.

This module maps GGUF tensor names to our params tree and runs the load; the config comes
from gguf_config.py and the dequantization from gguf_tensors.py.

llama.cpp's converter permutes the rows of each q and k projection so that RoPE can rotate
adjacent pairs (GPT-J style): per head, `w.reshape(2, head_dim // 2, in).swapaxes(0, 1)`.
Our models use HF's rotate-half convention, so the loader undoes that permutation (llama
files only: qwen2, qwen3, phi3, gemma and gemma2 files keep HF's order).

gpt2 files hold GPT-2's fused attn_qkv and learned position_embd; llama.cpp's converter
transposes HF's Conv1D weights to [out, in], so they need no transpose here.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import numpy as np
from gguf import GGUFReader

from pagedjax.models.config import ModelConfig

from .dtypes import resolve_dtype
from .gguf_config import _ROPE_FREQS, config_from_gguf
from .gguf_tensors import _dequantize
from .gguf_tokenizer import tokenizer_from_gguf
from .params_builder import ParamsBuilder
from .tokenizer import Tokenizer

# Only llama.cpp's llama converter permutes q/k rows (its "normal" RoPE); qwen2/qwen3 use the
# NEOX (rotate-half) RoPE and keep HF's row order.
_PERMUTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Per-architecture tensor names that differ from the llama ones: Phi-3 keeps q/k/v and
# gate/up fused (ffn_up holds gate rows, then up rows, like params' w_gate_up).
# GPT-2 keeps q/k/v fused too (HF's c_attn rows: q, k, v), has LayerNorm and linear
# biases and a plain (ungated) MLP. Gemma 2 adds norms after attention and the MLP
# (its ffn_norm is the MLP's pre-norm, HF's pre_feedforward_layernorm).
_ARCH_LAYER_TENSORS = {
    "Phi3ForCausalLM": {"attn_qkv.weight": ("wqkv", None), "ffn_up.weight": ("w_gate_up", None)},
    "GPT2LMHeadModel": {
        "attn_norm.bias": ("attn_norm_b", None),
        "attn_qkv.weight": ("wqkv", None), "attn_qkv.bias": ("bqkv", None),
        "ffn_norm.bias": ("mlp_norm_b", None),
        "ffn_up.weight": ("w_up", None), "ffn_up.bias": ("b_up", None),
        "ffn_down.bias": ("b_down", None),
    },
    "Gemma2ForCausalLM": {
        "post_attention_norm.weight": ("post_attn_norm", None),
        "post_ffw_norm.weight": ("post_mlp_norm", None),
    },
}
_ARCH_TOP_TENSORS = {
    "GPT2LMHeadModel": {"position_embd.weight": "pos_embed", "output_norm.bias": "final_norm_b"},
}
# llama.cpp's Gemma converters store norm weights as 1 + w (its RMSNorm multiplies by the
# weight); params keep HF's w, which models/layers.py's rms_norm_plus_one uses.
_NORM_PLUS_ONE_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM")

# GGUF per-layer tensor name -> (params leaf, fused part).
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", None),
    "attn_q.weight": ("wqkv", "q"),
    "attn_k.weight": ("wqkv", "k"),
    "attn_v.weight": ("wqkv", "v"),
    "attn_q.bias": ("bqkv", "q"),
    "attn_k.bias": ("bqkv", "k"),
    "attn_v.bias": ("bqkv", "v"),
    "attn_output.weight": ("wo", None),
    "attn_output.bias": ("bo", None),
    "ffn_norm.weight": ("mlp_norm", None),
    "ffn_gate.weight": ("w_gate_up", "gate"),
    "ffn_up.weight": ("w_gate_up", "up"),
    "ffn_down.weight": ("w_down", None),
    "attn_q_norm.weight": ("q_norm", None),
    "attn_k_norm.weight": ("k_norm", None),
}
_TOP_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm",
                "output.weight": "lm_head"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def load_gguf(path: str | os.PathLike, dtype: Any = np.float32,
              supported_architectures: Optional[Sequence[str]] = None,
              ) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Load a GGUF file into (config, params as numpy arrays of `dtype`, tokenizer).

    With `supported_architectures`, an architecture outside it is rejected before any
    tensor is dequantized."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path} does not exist")
    np_dtype = resolve_dtype(dtype)
    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf raises ValueError/OSError/struct errors on bad files
        raise ValueError(f"cannot read GGUF file {path}: {err}") from err
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, tensors)
    if supported_architectures is not None and config.architecture not in supported_architectures:
        raise ValueError(
            f"architecture {config.architecture} is not supported; supported: "
            f"{', '.join(supported_architectures)}"
        )
    tokenizer = tokenizer_from_gguf(meta)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"GGUF tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight has only "
            f"{config.vocab_size} rows"
        )
    # The reader's parsed metadata fields (one numpy array per token string and merge:
    # large for a big vocabulary) are done with; the tensors keep only the memmap.
    del reader
    params = _load_params(tensors, config, np_dtype)
    return config, params, tokenizer


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """GGUF key-value metadata decoded to Python values (str, int, float, bool, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GPT-J pair order -> HF rotate-half order)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_tensors(architecture: str) -> dict[str, tuple[str, Optional[str]]]:
    return {**_LAYER_TENSORS, **_ARCH_LAYER_TENSORS.get(architecture, {})}


def _top_tensors(architecture: str) -> dict[str, str]:
    return {**_TOP_TENSORS, **_ARCH_TOP_TENSORS.get(architecture, {})}


def _slot_for(name: str, architecture: str = "LlamaForCausalLM"
              ) -> tuple[str, Optional[int], Optional[str]]:
    top = _top_tensors(architecture)
    if name in top:
        return top[name], None, None
    match = _LAYER_NAME.fullmatch(name)
    layer_tensors = _layer_tensors(architecture)
    if match and match.group(2) in layer_tensors:
        leaf, part = layer_tensors[match.group(2)]
        return leaf, int(match.group(1)), part
    raise ValueError(f"GGUF tensor {name} is not a known llama tensor; not supported")


def _gguf_name(leaf: str, layer: Optional[int], part: Optional[str],
               architecture: str = "LlamaForCausalLM") -> str:
    """The GGUF tensor name for a params slot (for error messages)."""
    for name, top_leaf in _top_tensors(architecture).items():
        if layer is None and top_leaf == leaf:
            return name
    for suffix, (l, p) in reversed(list(_layer_tensors(architecture).items())):
        if l == leaf and p == part:
            return f"blk.{layer}.{suffix}"
    return f"{leaf}[{layer}].{part}"


def _load_params(tensors: dict[str, Any], config: ModelConfig, dtype: np.dtype) -> dict[str, Any]:
    builder = ParamsBuilder(config, dtype)
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        leaf, layer, part = _slot_for(name, config.architecture)
        values = _dequantize(tensor)
        if leaf.endswith("norm") and config.architecture in _NORM_PLUS_ONE_ARCHITECTURES:
            values = values - 1.0
        if part in ("q", "k") and config.architecture in _PERMUTED_ARCHITECTURES:
            heads = config.num_heads if part == "q" else config.num_kv_heads
            values = _unpermute_rows(values, heads)
        builder.put(name, values, leaf, layer, part)
        del values  # keep at most one dequantized tensor alive
    return builder.build(lambda leaf, layer, part: _gguf_name(leaf, layer, part,
                                                              config.architecture))
