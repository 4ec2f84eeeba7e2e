"""Float32 model arithmetic that rounds once: the norms, RoPE, activations and logprobs of
ModelConfig.exact (the engine's "exact" backend and `pagedjax.forward(..., exact=True)`),
computed in float64 and rounded to the input's dtype at the end.

XLA fuses elementwise float32 code differently in each program and contracts a multiply
feeding an add into one FMA inside a fusion (one rounding instead of two), and it sums a
norm's row in an order set by the row count; so the same RoPE or RMSNorm gives last-bit
differences between an engine step and the training forward, which a model's layers
amplify. In float64 those differences stay ~1e-16, below float32's rounding. Built from
lax primitives inside `jax.enable_x64` (kernels.exact_attention.in_float64).
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

from pagedjax.kernels.exact_attention import F64, as_float64, in_float64


def rms_norm(x: jax.Array,  # [..., E]
             weight: jax.Array,  # [E]
             eps: float, plus_one: bool = False) -> jax.Array:
    """x / rms(x) * weight (Gemma: * (1 + weight)) in float64, rounded once to x's dtype."""

    def normed(x, weight):
        x64 = as_float64(x)
        inv = lax.rsqrt(_row_mean(x64 * x64) + _full(x, eps))
        w = as_float64(weight)
        if plus_one:
            w = w + _full(weight, 1.0)
        return lax.convert_element_type(x64 * inv * _along_last(w, x), x.dtype)

    return in_float64(normed)(x, weight)


def layer_norm(x: jax.Array,  # [..., E]
               weight: jax.Array, bias: jax.Array,  # [E]
               eps: float) -> jax.Array:
    """LayerNorm with affine weight and bias in float64, rounded once to x's dtype."""

    def normed(x, weight, bias):
        x64 = as_float64(x)
        centred = x64 - _row_mean(x64)
        inv = lax.rsqrt(_row_mean(centred * centred) + _full(x, eps))
        w, b = (_along_last(as_float64(a), x) for a in (weight, bias))
        return lax.convert_element_type(centred * inv * w + b, x.dtype)

    return in_float64(normed)(x, weight, bias)


def apply_rope(x: jax.Array,  # [T, N, D]
               cos: jax.Array, sin: jax.Array) -> jax.Array:  # [T, D]
    """x rotated by cos/sin (HF's rotate_half) in float64, rounded once to x's dtype."""

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        x64 = as_float64(x)
        rotated = lax.concatenate([lax.neg(x64[..., half:]), x64[..., :half]], x.ndim - 1)
        cos, sin = (lax.broadcast_in_dim(as_float64(a), x.shape, (0, 2)) for a in (cos, sin))
        return lax.convert_element_type(x64 * cos + rotated * sin, x.dtype)

    return in_float64(rotate)(x, cos, sin)


def activation(x: jax.Array, name: str, times: jax.Array | None = None) -> jax.Array:
    """config.hidden_act of x (silu, gelu_tanh, gelu, relu), times `times` when given
    (a gated MLP's up), in float64, rounded once to x's dtype."""
    if name not in ("silu", "gelu_tanh", "gelu", "relu"):
        raise ValueError(f"unknown activation {name!r}")

    def act(x, *times):
        x64 = as_float64(x)
        one, half = _full(x, 1.0), _full(x, 0.5)
        if name == "silu":
            y = x64 * lax.logistic(x64)
        elif name == "gelu_tanh":
            cube = _full(x, 0.044715) * x64 * x64 * x64
            y = half * x64 * (one + lax.tanh(_full(x, np.sqrt(2 / np.pi)) * (x64 + cube)))
        elif name == "gelu":
            y = half * x64 * (one + lax.erf(x64 / _full(x, np.sqrt(2))))
        else:  # relu, as a select: lax.max's gradient would build float32 arrays
            y = lax.select(x64 > _full(x, 0.0), x64, _full(x, 0.0))
        if times:
            y = y * as_float64(times[0])
        return lax.convert_element_type(y, x.dtype)

    return in_float64(act)(x, *(() if times is None else (times,)))


def log_softmax(logits: jax.Array) -> jax.Array:  # [..., V] -> [..., V] in logits' dtype
    """log_softmax over the last axis in float64, rounded once (the exact numerics'
    logprobs: an engine's with attention_backend="exact", pagedjax.completion_logprobs'
    with exact=True). -inf logits stay -inf."""

    def normalised(logits):
        x64 = as_float64(logits)
        last = x64.ndim - 1
        top = lax.reduce_max(lax.stop_gradient(x64), (last,))
        shifted = x64 - lax.broadcast_in_dim(top, x64.shape, tuple(range(last)))
        total = lax.reduce_sum(lax.exp(shifted), (last,))
        return lax.convert_element_type(
            shifted - lax.broadcast_in_dim(lax.log(total), x64.shape, tuple(range(last))),
            logits.dtype)

    return in_float64(normalised)(logits)

def _full(like: jax.Array, value: float) -> jax.Array:
    return lax.full(like.shape, value, F64)


def _along_last(w: jax.Array,  # [E] float64
                like: jax.Array) -> jax.Array:  # -> like's shape [..., E]
    return lax.broadcast_in_dim(w, like.shape, (like.ndim - 1,))


def _row_mean(x: jax.Array) -> jax.Array:  # [..., E] float64 -> [..., E] (each row's mean)
    last = x.ndim - 1
    total = lax.reduce_sum(x, (last,))
    mean = total / lax.full(total.shape, x.shape[-1], F64)
    return lax.broadcast_in_dim(mean, x.shape, tuple(range(last)))

