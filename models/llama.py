"""Llama-family decoder (Llama 2/3/3.x, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3; Gemma
subclasses it) as a functional Flax linen module.

`LlamaForCausalLM(config).apply({"params": params}, step, kv_cache)` runs one engine step:
it writes this step's K/V into the paged cache and returns logits for the last scheduled
token of each sequence only. Layers are a `lax.scan` over params stacked on a leading axis,
so a 30-layer model compiles about as fast as a 2-layer one (matrices held one array per
layer, the engine's CPU form, are picked by a `lax.switch` inside it); the KV pool rides in
the scan carry and every layer gathers from / scatters into it by layer index, never
copying it.

The variants are config flags, not copies: q/k/v biases (Qwen2), per-head q/k RMSNorm
(Qwen3), a sliding window on all layers (Mistral) or on some (Gemma 2: a per-layer flag
array is scanned alongside the params), Gemma's norms, GeGLU, sandwich norms and soft-caps.
Phi-3 differs only in its checkpoint's fused weight names (the HF loader's map).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagedjax.step_input import KVCache, StepInput

from .config import ModelConfig
from .layers import (LayerMatrix, attention, declare_params, lm_logits, mlp, norm,
                     rope_cos_sin, rope_inv_freq, window_flags)
from .params import expected_shapes

_init = nn.initializers.normal(0.02)


class StackedLayerParams(nn.Module):
    """Every decoder layer's params stacked on a leading layer axis L (params.py's "layers"
    subtree), declared under this module's name so the tree is params["layers"][name].
    When applied, a leaf may instead be a tuple of L per-layer matrices (the engine's CPU
    form, see models/params.py): the params are returned as given."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> dict:
        if not self.is_initializing():
            return dict(self.variables["params"])  # flax would reject a tuple's shape
        return declare_params(self, expected_shapes(self.config)["layers"], _init)


def scan_layers(layer_fn, stacked: dict, carry, per_layer=None):
    """The carry after `layer_fn(p, carry)` ran over each layer's params p in order; with
    `per_layer` [L], `layer_fn(p, carry, x)` gets that layer's entry x too. A leaf of
    `stacked` that is a tuple of per-layer matrices reaches layer_fn as a LayerMatrix.

    A plain `lax.scan` over the stacked arrays rather than flax's `nn.scan`: the params are
    already arrays when the body runs, and flax 0.12.10 with jax 0.11.2 (a GPU image's
    versions) rejects the `nn.scan` form ("broadcasted variable has a data dependency on
    the scan body") where flax 0.12.8 with jax 0.10.2 accepts it."""
    per_layer_matrices = {k: v for k, v in stacked.items() if isinstance(v, tuple)}
    scanned = {k: v for k, v in stacked.items() if k not in per_layer_matrices}
    num_layers = jax.tree.leaves(scanned)[0].shape[0]  # norms are always stacked

    def body(carry, xs):
        p, x, index = xs
        p = {**p, **{k: LayerMatrix(v, index) for k, v in per_layer_matrices.items()}}
        return (layer_fn(p, carry) if per_layer is None else layer_fn(p, carry, x)), None

    carry, _ = jax.lax.scan(body, carry, (scanned, per_layer, jnp.arange(num_layers)))
    return carry


def decoder_layer(p: dict, carry, window_flag=None, *, step: StepInput, cos: jax.Array,
                  sin: jax.Array, config: ModelConfig, attention_backend: str):
    """One pre-norm attention + MLP block over one layer's params p (layer axis dropped);
    carry is (x [T, E], k pool, v pool, layer index), returned updated; window_flag is
    this layer's sliding-window flag (None: the config decides for every layer)."""
    c = config
    x, k_cache, v_cache, layer = carry
    h, k_cache, v_cache = attention(
        norm(x, p, "attn_norm", c), p, c, step, k_cache, v_cache, layer,
        attention_backend, cos, sin, window_flag)
    if c.sandwich_norms:
        h = norm(h, p, "post_attn_norm", c)
    x = x + h
    h = mlp(norm(x, p, "mlp_norm", c), p, c)
    if c.sandwich_norms:
        h = norm(h, p, "post_mlp_norm", c)
    x = x + h
    return x, k_cache, v_cache, layer + 1


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

        stacked = StackedLayerParams(c, name="layers")()
        layer_fn = functools.partial(decoder_layer, step=step, cos=cos, sin=sin,
                                     config=c, attention_backend=self.attention_backend)
        carry = (x, kv_cache.k, kv_cache.v, jnp.int32(0))
        x, k_cache, v_cache, _ = scan_layers(layer_fn, stacked, carry, window_flags(c))

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
