"""Llama-family decoder (Llama 2/3/3.x, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3; Gemma
subclasses it) as a functional Flax linen module.

`LlamaForCausalLM(config).apply({"params": params}, step, kv_cache)` runs one engine step:
it writes this step's K/V into the paged cache and returns logits for the last scheduled
token of each sequence only. Layers are a `nn.scan` over params stacked on a leading axis,
so a 30-layer model compiles about as fast as a 2-layer one; the KV pool rides in the scan
carry and every layer gathers from / scatters into it by layer index, never copying it.

The variants are config flags, not copies: q/k/v biases (Qwen2), per-head q/k RMSNorm
(Qwen3), a sliding window on all layers (Mistral) or on some (Gemma 2: a per-layer flag
array is scanned alongside the params), Gemma's norms, GeGLU, sandwich norms and soft-caps.
Phi-3 differs only in its checkpoint's fused weight names (the HF loader's map).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagedjax.step_input import KVCache, StepInput

from .config import ModelConfig
from .layers import (attention, declare_params, lm_logits, mlp, norm, rope_cos_sin,
                     rope_inv_freq, window_flags)
from .params import expected_shapes

_init = nn.initializers.normal(0.02)


def layer_shapes(config: ModelConfig) -> dict:
    """One layer's params shapes (params.py's "layers" leaves without the layer axis)."""
    return {k: s[1:] for k, s in expected_shapes(config)["layers"].items()}


class LlamaDecoderLayer(nn.Module):
    """One pre-norm attention + MLP block; called once per layer by nn.scan."""

    config: ModelConfig
    attention_backend: str = "reference"  # a resolved name: "reference" | "pallas"

    @nn.compact
    def __call__(self, carry, step: StepInput, cos: jax.Array, sin: jax.Array,
                 window_flag=None):
        c = self.config
        x, k_cache, v_cache, layer = carry  # x: [T, E]
        p = declare_params(self, layer_shapes(c), _init)
        h, k_cache, v_cache = attention(
            norm(x, p, "attn_norm", c), p, c, step, k_cache, v_cache, layer,
            self.attention_backend, cos, sin, window_flag)
        if c.sandwich_norms:
            h = norm(h, p, "post_attn_norm", c)
        x = x + h
        h = mlp(norm(x, p, "mlp_norm", c), p, c)
        if c.sandwich_norms:
            h = norm(h, p, "post_mlp_norm", c)
        x = x + h
        return (x, k_cache, v_cache, layer + 1), None


class LlamaForCausalLM(nn.Module):
    """Embedding -> scanned decoder layers -> final norm -> logits of last tokens."""

    config: ModelConfig
    attention_backend: str = "reference"  # kernels.resolve_attention_backend's answer

    @nn.compact
    def __call__(self, step: StepInput, kv_cache: KVCache,
                 all_token_logits: bool = False):
        """Returns (logits [B, V], kv_cache); with `all_token_logits` (a static flag, for
        prompt logprobs) returns ((logits [B, V], token_logits [T, V]), kv_cache)."""
        c = self.config
        embed = self.param("embed", _init, (c.vocab_size, c.hidden_size))
        x = jnp.take(embed, step.input_ids, axis=0)  # [T, E]
        if c.embed_scale:  # Gemma: scaled by sqrt(hidden), rounded to the model dtype
            x = x * jnp.asarray(c.hidden_size ** 0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(step.positions, jnp.asarray(rope_inv_freq(c)))

        flags = window_flags(c)
        layers = nn.scan(
            LlamaDecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast,
                     nn.broadcast if flags is None else 0),
            length=c.num_layers,
        )(c, self.attention_backend, name="layers")
        carry = (x, kv_cache.k, kv_cache.v, jnp.int32(0))
        (x, k_cache, v_cache, _), _ = layers(carry, step, cos, sin, flags)

        final_norm = {"final_norm": self.param("final_norm", nn.initializers.ones,
                                               (c.hidden_size,))}
        # Only each sequence's last scheduled token needs logits: the [V, E] projection
        # dominates a small model's step, so never run it over every token.
        last = norm(jnp.take(x, step.logits_indices, axis=0), final_norm, "final_norm", c)
        if c.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = self.param("lm_head", _init, (c.vocab_size, c.hidden_size))
        logits = lm_logits(last, lm_head, c)  # [B, V]
        if all_token_logits:  # prompt logprobs: the [T, V] projection, only when asked
            token_logits = lm_logits(norm(x, final_norm, "final_norm", c), lm_head, c)
            return (logits, token_logits), KVCache(k_cache, v_cache)
        return logits, KVCache(k_cache, v_cache)
