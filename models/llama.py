"""Llama-family decoder (Llama 2/3/3.x, SmolLM2, ...) as a functional Flax linen module.

`LlamaForCausalLM(config).apply({"params": params}, step, kv_cache)` runs one engine step:
it writes this step's K/V into the paged cache and returns logits for the last scheduled
token of each sequence only. Layers are a `nn.scan` over params stacked on a leading axis,
so a 30-layer model compiles about as fast as a 2-layer one; the KV pool rides in the scan
carry and every layer gathers from / scatters into it by layer index, never copying it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagedjax.kernels import get_paged_attention, reference
from pagedjax.step_input import KVCache, StepInput

from .config import ModelConfig
from .layers import apply_rope, gated_mlp, linear, rms_norm, rope_cos_sin, rope_inv_freq

_init = nn.initializers.normal(0.02)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm attention + SwiGLU block; called once per layer by nn.scan."""

    config: ModelConfig
    attention_backend: str = "reference"  # a resolved name: "reference" | "pallas"

    @nn.compact
    def __call__(self, carry, step: StepInput, cos: jax.Array, sin: jax.Array):
        c = self.config
        x, k_cache, v_cache, layer = carry  # x: [T, E]
        E, H, K, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        qkv_rows = (H + 2 * K) * D
        attn_norm = self.param("attn_norm", nn.initializers.ones, (E,))
        wqkv = self.param("wqkv", _init, (qkv_rows, E))
        bqkv = self.param("bqkv", nn.initializers.zeros, (qkv_rows,)) if c.attention_bias else None
        wo = self.param("wo", _init, (E, H * D))
        bo = self.param("bo", nn.initializers.zeros, (E,)) if c.attention_bias else None
        mlp_norm = self.param("mlp_norm", nn.initializers.ones, (E,))
        w_gate_up = self.param("w_gate_up", _init, (2 * c.intermediate_size, E))
        w_down = self.param("w_down", _init, (E, c.intermediate_size))

        num_tokens = x.shape[0]
        qkv = linear(rms_norm(x, attn_norm, c.rms_norm_eps), wqkv, bqkv)
        q = qkv[:, : H * D].reshape(num_tokens, H, D)
        k = qkv[:, H * D : (H + K) * D].reshape(num_tokens, K, D)
        v = qkv[:, (H + K) * D :].reshape(num_tokens, K, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        k_cache, v_cache = reference.write_kv(k_cache, v_cache, layer, k, v, step.slot_mapping)
        attn = get_paged_attention(self.attention_backend)(
            q, k, v, k_cache, v_cache, layer,
            token_seq=step.token_seq, positions=step.positions,
            context_lens=step.context_lens, block_tables=step.block_tables,
            scale=D ** -0.5, slot_mapping=step.slot_mapping,
        )
        x = x + linear(attn.reshape(num_tokens, H * D), wo, bo)
        x = x + gated_mlp(rms_norm(x, mlp_norm, c.rms_norm_eps), w_gate_up, w_down)
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
        cos, sin = rope_cos_sin(step.positions, jnp.asarray(rope_inv_freq(c)))

        layers = nn.scan(
            LlamaDecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c, self.attention_backend, name="layers")
        carry = (x, kv_cache.k, kv_cache.v, jnp.int32(0))
        (x, k_cache, v_cache, _), _ = layers(carry, step, cos, sin)

        final_norm = self.param("final_norm", nn.initializers.ones, (c.hidden_size,))
        # Only each sequence's last scheduled token needs logits: the [V, E] projection
        # dominates a small model's step, so never run it over every token.
        last = rms_norm(jnp.take(x, step.logits_indices, axis=0), final_norm, c.rms_norm_eps)
        if c.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = self.param("lm_head", _init, (c.vocab_size, c.hidden_size))
        logits = linear(last, lm_head).astype(jnp.float32)  # [B, V]
        if all_token_logits:  # prompt logprobs: the [T, V] projection, only when asked
            token_logits = linear(rms_norm(x, final_norm, c.rms_norm_eps), lm_head)
            return (logits, token_logits.astype(jnp.float32)), KVCache(k_cache, v_cache)
        return logits, KVCache(k_cache, v_cache)
