"""Layers shared by every model family: norms (RMSNorm, Gemma's RMSNorm, LayerNorm), RoPE,
MLPs, the self-attention block around a pluggable attention core (paged for the engine,
models/engine_step.py; dense causal for training, models/dense_attention.py), [out, in]
projections, the layer scan, logits."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import small_matmul

from . import exact_numerics
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerMatrix:
    """One layer's [out, in] matrix out of a tuple of per-layer arrays, chosen inside the
    layer scan by the traced layer index.

    On XLA CPU a matmul cannot read a dynamic slice of a stacked [L, out, in] array in
    place: each layer's slice would be copied first, every step. A `lax.switch` over
    separate arrays hands the chosen one to the matmul as it is."""

    matrices: tuple  # L arrays [out, in]
    index: jax.Array  # [] int32, the layer


@dataclasses.dataclass(frozen=True)
class StackedMatrix:
    """One layer's [out, in] matrix of a stacked [L, out, in] array (a trainer's params,
    which the engine does not copy apart), chosen inside the layer scan by the traced
    layer index: products the small-matmul kernel takes (float32 up to MAX_STACKED_ROWS
    rows, bfloat16 up to small_matmul_rows) read it where it lies in the stack; others
    take XLA's dynamic slice (a copy) as the scan itself would."""

    stacked: jax.Array  # [L, out, in]
    index: jax.Array  # [] int32, the layer


def linear(x: jax.Array, w: jax.Array | LayerMatrix | StackedMatrix,
           b: jax.Array | None = None, small_rows: int = 0) -> jax.Array:
    """x @ w.T (+ b) for weights stored [out, in].  x: [..., in], w: [out, in]. Float32
    products of MIN_ROWS..`small_rows` rows run in the CPU small-matmul kernel
    (ModelConfig.small_matmul_rows; 0: never), block-encoded ones up to MAX_BLOCK_ROWS,
    a StackedMatrix's from one row up (float32 to MAX_STACKED_ROWS)."""
    matmul = functools.partial(_matmul_transposed, small_rows=small_rows)
    if isinstance(w, LayerMatrix):
        y = jax.lax.switch(w.index, [functools.partial(matmul, w=m) for m in w.matrices], x)
    elif isinstance(w, StackedMatrix):
        y = _stacked_matmul(x, w, small_rows)
    else:
        y = matmul(x, w)
    return y if b is None else y + b


def _kernel_reads(x: jax.Array,  # [..., in]
                  weight_dtype) -> bool:
    """Whether the small-matmul kernel multiplies x by weights of `weight_dtype`: both
    float32, or both bfloat16 with `in` a multiple of 32 (its BF16 format's blocks)."""
    return x.dtype == weight_dtype and (
        x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and x.shape[-1] % 32 == 0))


def _stacked_matmul(x: jax.Array,  # [..., in]
                    w: StackedMatrix, small_rows: int) -> jax.Array:
    rows = math.prod(x.shape[:-1])
    # float32 past small_rows: XLA's bfloat16 dots stay ahead even with the slice copy
    max_rows = (max(small_rows, small_matmul.MAX_STACKED_ROWS)
                if small_rows and x.dtype == jnp.float32 else small_rows)
    if 1 <= rows <= max_rows and _kernel_reads(x, w.stacked.dtype):
        y = small_matmul.small_matmul_layer(x.reshape(rows, x.shape[-1]), w.stacked, w.index)
        return y.reshape(*x.shape[:-1], w.stacked.shape[1])
    matrix = jax.lax.dynamic_index_in_dim(w.stacked, w.index, keepdims=False)  # [out, in]
    return _matmul_transposed(x, matrix, small_rows)


def _matmul_transposed(x: jax.Array,  # [..., in]
                       w: jax.Array | small_matmul.BlockMatrix,  # [out, in]
                       small_rows: int = 0) -> jax.Array:
    rows = math.prod(x.shape[:-1])
    blocks = w if isinstance(w, small_matmul.BlockMatrix) else None
    w = w if blocks is None else blocks.dense
    # One row: XLA's matrix-vector product streams float32 weights as fast as the
    # kernel, but not blocks a fifth their size, nor bfloat16 weights (3x slower).
    bf16 = x.dtype == jnp.bfloat16
    min_rows = small_matmul.MIN_ROWS if blocks is None and not bf16 else 1
    max_rows = small_rows if blocks is None or not small_rows else max(
        small_rows, small_matmul.MAX_BLOCK_ROWS)
    if min_rows <= rows <= max_rows and _kernel_reads(x, w.dtype):
        x2 = x.reshape(rows, x.shape[-1])
        y = (small_matmul.small_matmul_blocks(x2, blocks) if blocks is not None
             else small_matmul.small_matmul_bf16(x2, w) if bf16
             else small_matmul.small_matmul(x2, w))
        return y.reshape(*x.shape[:-1], w.shape[0])
    # 16-bit inputs accumulate in float32 and round once at the end, as torch does; asked
    # for explicitly, XLA CPU runs such a product 2.3x faster than a 16-bit-output dot.
    accumulate = jnp.float32 if x.dtype.itemsize == 2 else None
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=accumulate)
    return y.astype(jnp.result_type(x, w))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 like HF, cast back to x's dtype.  x: [T, E], weight: [E]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def gated_mlp(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x)).  x: [T, E], w_gate_up: [2F, E], w_down: [E, F]."""
    gate_up = linear(x, w_gate_up)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, w_down)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [D/2] with the config's RoPE scaling applied (host side)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, scaling) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [T, D] for positions [T] (HF's concatenated-halves layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [T, N, D] by cos/sin [T, D] with HF's rotate_half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)


# ---- Blocks shared by the model files: each reads a per-layer params dict `p` whose keys
# are models/params.py's "layers" leaves (one layer's slice).

def activation(x: jax.Array, name: str) -> jax.Array:
    """config.hidden_act by name: silu, gelu_tanh (GELU, tanh approximation), gelu, relu."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def rms_norm_plus_one(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: x_normed * (1 + w), all in float32, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with affine weight and bias, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(x: jax.Array, p: dict, name: str, config: ModelConfig) -> jax.Array:
    """The config's norm (config.norm_type) with weight p[name] (and bias p[name + "_b"]);
    in float64, rounded once, under config.exact."""
    if config.exact:
        if config.norm_type == "layer":
            return exact_numerics.layer_norm(x, p[name], p[name + "_b"], config.rms_norm_eps)
        return exact_numerics.rms_norm(x, p[name], config.rms_norm_eps,
                                       plus_one=config.norm_type == "rms_plus_one")
    if config.norm_type == "rms":
        return rms_norm(x, p[name], config.rms_norm_eps)
    if config.norm_type == "rms_plus_one":
        return rms_norm_plus_one(x, p[name], config.rms_norm_eps)
    return layer_norm(x, p[name], p[name + "_b"], config.rms_norm_eps)


def mlp(x: jax.Array, p: dict, config: ModelConfig) -> jax.Array:
    """Gated (down(act(gate) * up)) or plain (down(act(up))) MLP, biases when configured."""
    if config.gated_mlp:
        gate_up = linear(x, p["w_gate_up"], p.get("b_gate_up"),
                         config.small_matmul_rows)  # [..., 2F]
        # rows [gate_s, up_s] per shard s (config.fused_shards; one shard: [gate, up])
        gate_up = gate_up.reshape(*gate_up.shape[:-1], config.fused_shards, -1)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        hidden = (exact_numerics.activation(gate, config.hidden_act, up) if config.exact
                  else activation(gate, config.hidden_act) * up)
        hidden = hidden.reshape(*hidden.shape[:-2], -1)  # [..., F]
    else:
        hidden = linear(x, p["w_up"], p.get("b_up"), config.small_matmul_rows)
        hidden = (exact_numerics.activation(hidden, config.hidden_act) if config.exact
                  else activation(hidden, config.hidden_act))
    return linear(hidden, p["w_down"], p.get("b_down"), config.small_matmul_rows)


# An attention core: (q [T, H, D], k [T, K, D], v [T, K, D], kv, layer [] int32,
# window_flag) -> (out [T, H, D], kv). `kv` is whatever state the core threads through the
# layers (the engine's paged pool; nothing for the dense training forward).
AttentionCore = Callable[..., tuple]


def attention_qkv(x: jax.Array, p: dict, config: ModelConfig, cos: jax.Array | None = None,
                  sin: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [T, H, D], keys and values [T, K, D] of normed x [T, E]: fused qkv (+ bias),
    optional per-head q/k RMSNorm, then RoPE when cos/sin [T, D] are given. The fused
    rows are [q_s, k_s, v_s] for each of config.fused_shards shards s (one: [q, k, v])."""
    c = config
    n = c.fused_shards
    H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
    T = x.shape[0]
    qkv = linear(x, p["wqkv"], p.get("bqkv"), c.small_matmul_rows)
    qkv = qkv.reshape(T, n, -1)  # [T, n, (H + 2K) / n * D]
    q = qkv[..., : H // n * D].reshape(T, H, D)
    k = qkv[..., H // n * D: (H + K) // n * D].reshape(T, K, D)
    v = qkv[..., (H + K) // n * D:].reshape(T, K, D)
    head_norm = exact_numerics.rms_norm if c.exact else rms_norm
    rope = exact_numerics.apply_rope if c.exact else apply_rope
    if c.qk_norm:
        q = head_norm(q, p["q_norm"], c.rms_norm_eps)
        k = head_norm(k, p["k_norm"], c.rms_norm_eps)
    if cos is not None:
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
    return q, k, v


def self_attention(x: jax.Array, p: dict, config: ModelConfig, attend: AttentionCore, kv,
                   layer: jax.Array, cos: jax.Array | None = None,
                   sin: jax.Array | None = None, window_flag: jax.Array | None = None):
    """Self-attention of normed x [T, E]: projections and RoPE (`attention_qkv`), the
    core `attend` (paged for the engine, dense for the training forward), the output
    projection (+ bias). Returns (out [T, E], kv as the core left it)."""
    T = x.shape[0]
    q, k, v = attention_qkv(x, p, config, cos, sin)
    out, kv = attend(q, k, v, kv, layer, window_flag)
    return linear(out.reshape(T, -1), p["wo"], p.get("bo"), config.small_matmul_rows), kv


def layer_window(run: Callable, config: ModelConfig, window_flag: jax.Array | None):
    """run(window) with this layer's sliding window: the config's on every layer, or, for
    configs whose layers differ, picked by the traced `window_flag` (None: full attention)."""
    if window_flag is not None:
        return jax.lax.cond(window_flag, lambda: run(config.sliding_window), lambda: run(None))
    return run(config.sliding_window)


def scan_layers(layer_fn, stacked: dict, carry, per_layer=None,
                stacked_matrices: bool = False):
    """The carry after `layer_fn(p, carry)` ran over each layer's params p in order; with
    `per_layer` [L], `layer_fn(p, carry, x)` gets that layer's entry x too. A leaf of
    `stacked` that is a tuple of per-layer matrices reaches layer_fn as a LayerMatrix;
    with `stacked_matrices` (the engine's CPU step with the small-matmul kernel on), a
    [L, out, in] matrix leaf reaches it whole, as a StackedMatrix, not sliced.

    A plain `lax.scan` over the stacked arrays rather than flax's `nn.scan`: the params are
    already arrays when the body runs, and flax 0.12.10 with jax 0.11.2 (a GPU image's
    versions) rejects the `nn.scan` form ("broadcasted variable has a data dependency on
    the scan body") where flax 0.12.8 with jax 0.10.2 accepts it."""
    per_layer_matrices = {k: v for k, v in stacked.items() if isinstance(v, tuple)}
    whole = {k: v for k, v in stacked.items()
             if stacked_matrices and not isinstance(v, tuple) and v.ndim == 3}
    scanned = {k: v for k, v in stacked.items() if k not in per_layer_matrices | whole}
    num_layers = jax.tree.leaves(scanned)[0].shape[0]  # norms are always stacked

    def body(carry, xs):
        p, x, index = xs
        p = {**p, **{k: LayerMatrix(v, index) for k, v in per_layer_matrices.items()},
             **{k: StackedMatrix(v, index) for k, v in whole.items()}}
        return (layer_fn(p, carry) if per_layer is None else layer_fn(p, carry, x)), None

    carry, _ = jax.lax.scan(body, carry, (scanned, per_layer, jnp.arange(num_layers)))
    return carry


def declare_params(module, shapes: dict, init) -> dict:
    """Declare flax params named and shaped like `shapes` (a params.py dict, layer axis
    already dropped) on `module`: norms start at ones, biases at zeros, the rest `init`."""
    import flax.linen as nn

    out = {}
    for name, shape in shapes.items():
        if name.endswith("_b") or name.startswith("b"):
            fn = nn.initializers.zeros
        elif name.endswith("norm"):
            fn = nn.initializers.ones
        else:
            fn = init
        out[name] = module.param(name, fn, tuple(shape))
    return out


def window_flags(config: ModelConfig) -> jax.Array | None:
    """Per-layer sliding-window flags [L] for configs whose layers differ, else None."""
    if config.sliding_window is None or config.sliding_window_layers is None:
        return None
    return jnp.asarray(config.sliding_window_layers, dtype=jnp.bool_)


def logits_matrix(params: dict, config: ModelConfig):
    """The [V, W] matrix of the logits: `lm_head`, or the embedding when tied (unless the
    params carry it as `lm_head` too: the engine's, block-encoded, pagedjax/weight_blocks.py)."""
    if config.tie_word_embeddings and "lm_head" not in params:
        return params["embed"]
    return params["lm_head"]


def lm_logits(x: jax.Array, lm_head: jax.Array, config: ModelConfig) -> jax.Array:
    """float32 logits [N, V] of final hidden states x [N, W] (final soft-cap applied)."""
    logits = linear(x, lm_head, small_rows=config.small_matmul_rows).astype(jnp.float32)
    cap = config.final_logit_softcap
    if cap:
        logits = cap * jnp.tanh(logits / cap)
    return logits
