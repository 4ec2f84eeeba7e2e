"""Llama-family decoder (Llama 2/3/3.x, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3; Gemma
subclasses it) as a functional Flax linen module.

`hidden_states` and `output_logits` are the model, pure functions of the params pytree;
`LlamaForCausalLM(config).apply({"params": params}, step, kv_cache)` runs them as one
engine step (models/engine_step.py) and `pagedjax.forward` as a dense training forward.
Layers are a `lax.scan` over params stacked on a leading axis, so a 30-layer model compiles
about as fast as a 2-layer one (matrices held one array per layer, the engine's CPU form,
are picked by a `lax.switch` inside it); the attention core's state (the engine's KV pool)
rides in the scan carry and every layer gathers from / scatters into it by layer index,
never copying it.

The variants are config flags, not copies: q/k/v biases (Qwen2), per-head q/k RMSNorm
(Qwen3), a sliding window on all layers (Mistral) or on some (Gemma 2: a per-layer flag
array is scanned alongside the params), Gemma's norms, GeGLU, sandwich norms and soft-caps.
Phi-3 differs only in its checkpoint's fused weight names (the HF loader's map).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .engine_step import CausalLM
from .layers import (AttentionCore, lm_logits, logits_matrix, mlp, norm, rope_cos_sin,
                     rope_inv_freq, scan_layers, self_attention, window_flags)


def decoder_layer(p: dict, carry, window_flag=None, *, attend: AttentionCore, cos: jax.Array,
                  sin: jax.Array, config: ModelConfig):
    """One pre-norm attention + MLP block over one layer's params p (layer axis dropped);
    carry is (x [T, E], the attention core's state, layer index), returned updated;
    window_flag is this layer's sliding-window flag (None: the config decides for every
    layer)."""
    c = config
    x, kv, layer = carry
    h, kv = self_attention(norm(x, p, "attn_norm", c), p, c, attend, kv, layer, cos, sin,
                           window_flag)
    if c.sandwich_norms:
        h = norm(h, p, "post_attn_norm", c)
    x = x + h
    h = mlp(norm(x, p, "mlp_norm", c), p, c)
    if c.sandwich_norms:
        h = norm(h, p, "post_mlp_norm", c)
    x = x + h
    return x, kv, layer + 1


def hidden_states(params: dict, config: ModelConfig, input_ids: jax.Array,
                  positions: jax.Array, attend: AttentionCore, kv):
    """Embeddings of input_ids [T] at positions [T] through every decoder layer, attending
    with `attend`; returns (hidden states [T, E] before the final norm, the core's kv)."""
    c = config
    x = jnp.take(params["embed"], input_ids, axis=0)  # [T, E]
    if c.embed_scale:  # Gemma: scaled by sqrt(hidden), rounded to the model dtype
        x = x * jnp.asarray(c.hidden_size ** 0.5, dtype=x.dtype)
    cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inv_freq(c)))
    layer_fn = functools.partial(decoder_layer, attend=attend, cos=cos, sin=sin, config=c)
    x, kv, _ = scan_layers(layer_fn, params["layers"], (x, kv, jnp.int32(0)), window_flags(c),
                           stacked_matrices=c.small_matmul_rows > 0)
    return x, kv


def output_logits(params: dict, config: ModelConfig, x: jax.Array) -> jax.Array:
    """float32 logits [N, V] of hidden states x [N, E]: final norm, then the (tied) head."""
    lm_head = logits_matrix(params, config)
    return lm_logits(norm(x, params, "final_norm", config), lm_head, config)


class LlamaForCausalLM(CausalLM):
    """Embedding -> scanned decoder layers -> final norm -> logits of last tokens."""

    hidden_states = staticmethod(hidden_states)
    output_logits = staticmethod(output_logits)
