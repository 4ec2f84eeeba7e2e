"""The ModelConfig a GGUF file describes: its metadata (and which tensors it has).

gemma2 files do not store query_pre_attn_scalar: the config applies llama.cpp's own rule
(see `gemma2_query_pre_attn_scalar`). Llama 3.1-style RoPE scaling is stored as a
rope_freqs tensor of per-frequency factors; its parameters are recovered from them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from gguf.quants import dequantize

from pagedjax.models.config import ModelConfig, RopeScaling

from .gguf_tensors import _logical_shape

# GGUF general.architecture -> HF architecture name: the ones whose tensors use the llama
# names in gguf_loader (Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms). Other
# architectures use other tensor names, fused tensors and config keys.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                      "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                      "gpt2": "GPT2LMHeadModel"}
# What llama.cpp assumes for Gemma 2 files without these keys (llama_hparams defaults).
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "attention.sliding_window": 4096}
# llama.cpp's Gemma 2 model type by layer count: 46 layers is the 27B model.
_GEMMA2_27B_LAYERS = 46
# Llama 3.1-style RoPE factors: folded into config.rope_scaling, not a params leaf.
_ROPE_FREQS = "rope_freqs.weight"


def _required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata is missing {key}")
    return meta[key]


def _as_int(meta: dict[str, Any], key: str, value: Any) -> int:
    if isinstance(value, list):
        # Per-layer head counts (e.g. OpenELM) have no place in ModelConfig.
        raise ValueError(f"GGUF metadata {key} is a per-layer list; only one value is supported")
    return int(value)


def _decimal(value: float) -> float:
    # GGUF stores float32; the shortest decimal that rounds to it is the value the model
    # was configured with (9.99999974738e-06 -> 1e-05), matching the HF config.
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """The ModelConfig described by GGUF metadata (and tensor presence for tie/bias)."""
    arch = _required(meta, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> int:
        full = f"{arch}.{key}"
        return _as_int(meta, full, _required(meta, full))

    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    num_kv_heads = _as_int(meta, f"{arch}.attention.head_count_kv",
                           get("attention.head_count_kv", num_heads))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"GGUF {arch}.attention.value_length ({value_dim}) differs from "
                         f"key_length ({head_dim}); not supported")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count ({rope_dim}) differs from head_dim "
                         f"({head_dim}): partial rotary embeddings are not supported")

    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file is missing tensor token_embd.weight")
    embed_shape = _logical_shape(tensors["token_embd.weight"])
    vocab_size = embed_shape[0]
    rope_theta = _decimal(get("rope.freq_base", 10000.0))
    num_layers = need("block_count")
    # GPT-2 uses LayerNorm (its own key); the others RMSNorm.
    eps_key = "attention.layer_norm_epsilon" if arch == "gpt2" else \
        "attention.layer_norm_rms_epsilon"
    max_positions = int(get("context_length", 2048))
    if arch == "gpt2":
        if "position_embd.weight" not in tensors:
            raise ValueError("GGUF gpt2 file is missing tensor position_embd.weight")
        # The table's rows are the positions the model has (context_length says the same
        # for files llama.cpp's converter wrote: both are n_positions / n_ctx).
        max_positions = _logical_shape(tensors["position_embd.weight"])[0]

    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_decimal(_required(meta, f"{arch}.{eps_key}")),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(meta, arch, tensors, rope_theta, head_dim),
        max_position_embeddings=max_positions,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        **_family_config(arch, get, hidden=hidden, num_heads=num_heads, head_dim=head_dim,
                         num_layers=num_layers),
    )


def gemma2_query_pre_attn_scalar(num_layers: int, hidden_size: int, num_heads: int,
                                 head_dim: int) -> float:
    """The attention scale llama.cpp uses for a Gemma 2 GGUF (scores * scalar ** -0.5).

    GGUF files have no query_pre_attn_scalar; llama.cpp (llama-model.cpp, Gemma 2 hparams,
    after gemma_pytorch's config) scales by 1 / sqrt(hidden_size / num_heads) for the
    27B model, which it recognizes by its 46 layers, and by 1 / sqrt(head_dim) otherwise.
    That matches every released Gemma 2 config.json: 2B and 9B have
    query_pre_attn_scalar = head_dim = 256, 27B has 144 = 4608 / 32."""
    if num_layers == _GEMMA2_27B_LAYERS:
        return float(hidden_size // num_heads)
    return float(head_dim)


def _family_config(arch: str, get, *, hidden: int, num_heads: int, head_dim: int,
                   num_layers: int) -> dict[str, Any]:
    """ModelConfig fields a GGUF architecture implies beyond the llama ones."""
    if arch == "gemma":
        return dict(norm_type="rms_plus_one", embed_scale=True, hidden_act="gelu_tanh")
    if arch == "gemma2":
        def value(key: str) -> Any:
            return get(key, _GEMMA2_DEFAULTS[key])

        window = int(value("attention.sliding_window"))
        return dict(
            norm_type="rms_plus_one", embed_scale=True, hidden_act="gelu_tanh",
            sandwich_norms=True,
            attn_logit_softcap=_decimal(value("attn_logit_softcapping")),
            final_logit_softcap=_decimal(value("final_logit_softcapping")),
            # llama.cpp: the window on even layers (swa pattern 2), as HF's Gemma 2.
            sliding_window=window,
            sliding_window_layers=tuple(i % 2 == 0 for i in range(num_layers)),
            query_pre_attn_scalar=gemma2_query_pre_attn_scalar(num_layers, hidden,
                                                               num_heads, head_dim))
    if arch == "gpt2":
        # llama.cpp's GPT-2 graph: LayerNorm with bias, tanh GELU, ungated MLP with biases.
        return dict(norm_type="layer", hidden_act="gelu_tanh", gated_mlp=False, mlp_bias=True,
                    position_embedding="learned")
    window = get("attention.sliding_window")
    if arch == "phi3" and window:
        return dict(sliding_window=int(window))
    return {}


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any],
                  theta: float, head_dim: int) -> RopeScaling:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if _ROPE_FREQS in tensors:
        # Llama 3.1-style scaling is stored as per-frequency factors, not parameters.
        factors = dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return _llama3_scaling_from_factors(np.asarray(factors, np.float64).reshape(-1),
                                            theta, head_dim, original)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=factor)
    raise ValueError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported; "
                     "supported: none, linear, llama3 (rope_freqs tensor)")


def _llama3_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter writes for Llama 3 RoPE scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            out.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return np.asarray(out)


def _llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int,
                                 original: Optional[int]) -> RopeScaling:
    # The file keeps only the resulting factors; recover the parameters by checking the
    # values every Llama 3.x release uses against them.
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF tensor {_ROPE_FREQS} has shape {factors.shape}, "
                         f"expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return RopeScaling()
    for orig in ([int(original)] if original else [8192, 4096, 16384]):
        for low, high in ((1.0, 4.0),):
            scaling = RopeScaling(rope_type="llama3", factor=float(np.round(factors.max(), 4)),
                                  low_freq_factor=low, high_freq_factor=high,
                                  original_max_position_embeddings=orig)
            if np.allclose(_llama3_factors(scaling, theta, head_dim), factors, rtol=1e-4):
                return scaling
    raise ValueError(f"GGUF tensor {_ROPE_FREQS} holds RoPE factors that match no known "
                     "Llama 3 scaling; not supported")
