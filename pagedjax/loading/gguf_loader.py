"""Loading a llama.cpp GGUF file: config from metadata, dequantized params, tokenizer.

Tensors are dequantized one at a time with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0,
Q4_0/1, Q5_0/1, K-quants, ...) and copied into preallocated stacked arrays.

llama.cpp's converter permutes the rows of each q and k projection so that RoPE can rotate
adjacent pairs (GPT-J style): per head, `w.reshape(2, head_dim // 2, in).swapaxes(0, 1)`.
Our models use HF's rotate-half convention, so the loader undoes that permutation (llama
files only: qwen2, qwen3, phi3, gemma and gemma2 files keep HF's order).

gpt2 files hold GPT-2's fused attn_qkv and learned position_embd; llama.cpp's converter
transposes HF's Conv1D weights to [out, in], so they need no transpose here. gemma2 files
do not store query_pre_attn_scalar: the loader applies llama.cpp's own rule (see
`gemma2_query_pre_attn_scalar`).
"""

from __future__ import annotations

import math
import mmap
import os
import re
from typing import Any, Optional, Sequence

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from pagedjax.models.config import ModelConfig, RopeScaling

from .dtypes import resolve_dtype
from .gguf_tokenizer import tokenizer_from_gguf
from .params_builder import ParamsBuilder
from .tokenizer import Tokenizer

# GGUF general.architecture -> HF architecture name: the ones whose tensors use the llama
# names below (Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms). Other architectures use
# other tensor names, fused tensors and config keys.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                      "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                      "gpt2": "GPT2LMHeadModel"}
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
# What llama.cpp assumes for Gemma 2 files without these keys (llama_hparams defaults).
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "attention.sliding_window": 4096}
# llama.cpp's Gemma 2 model type by layer count: 46 layers is the 27B model.
_GEMMA2_27B_LAYERS = 46

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
_ROPE_FREQS = "rope_freqs.weight"


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
    # ~100 MB for a 49k vocabulary) are done with; the tensors keep only the memmap.
    del reader
    params = _load_params(tensors, config, np_dtype)
    return config, params, tokenizer


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """GGUF key-value metadata decoded to Python values (str, int, float, bool, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


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


def _logical_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dims innermost first (ggml's ne); numpy order is the reverse: [out, in].
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


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


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GPT-J pair order -> HF rotate-half order)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Quantized tensors are dequantized this many output bytes at a time: gguf's dequantize
# makes several full-size temporaries, which for a big embedding would cost more than the
# tensor itself.
_DEQUANT_CHUNK_BYTES = 16 << 20


def _release_file_pages(data: np.ndarray) -> None:
    """Drop the pages of the file that `data` maps from this process's resident set.

    Tensors are read through one read-only memmap; pages already read would otherwise stay
    resident (counted in RSS) until the load ends, adding the file's size to its peak. A
    read-only mapping re-reads a dropped page from the page cache if it is touched again.
    """
    base = data
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def _dequantize(tensor) -> np.ndarray:
    shape = _logical_shape(tensor)
    data, qtype = tensor.data, tensor.tensor_type
    # The tensors before this one are in the params by now. (Always safe: a view still
    # held into the shared, read-only mapping just re-reads its page when touched.)
    _release_file_pages(data)
    try:
        rows = data.shape[0] if data.ndim >= 2 else 0
        row_bytes = 4 * math.prod(shape[1:]) if len(shape) >= 2 else 0
        if qtype.name == "F32" or rows < 2 or rows * row_bytes <= _DEQUANT_CHUNK_BYTES:
            return dequantize(data, qtype).reshape(shape)
        values = np.empty(shape, np.float32)
        step = max(1, _DEQUANT_CHUNK_BYTES // row_bytes)
        for start in range(0, rows, step):
            chunk = dequantize(data[start:start + step], qtype)
            values[start:start + step] = chunk.reshape(-1, *shape[1:])
        return values
    except NotImplementedError as err:
        raise ValueError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot "
            f"dequantize: {err}"
        ) from err


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
