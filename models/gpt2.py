"""Learned-position decoders: GPT-2 (`GPT2LMHeadModel`) and OPT (`OPTForCausalLM`).

Same step contract and layer scan as `llama.py`; what differs: an absolute position table
added to the embeddings (OPT reads row position + 2), LayerNorm with bias, a plain
(ungated) MLP with biases, no RoPE; OPT-350m's post-norm blocks (`config.pre_norm` False)
and its project_in / project_out around the layers when the embedding is narrower. GPT-2's
Conv1D weights are transposed to [out, in] by the HF loader, so the params contract is the
shared one (models/params.py).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagedjax.step_input import KVCache, StepInput

from .config import ModelConfig
from .layers import attention, declare_params, linear, lm_logits, mlp, norm
from .llama import StackedLayerParams, scan_layers
from .params import expected_shapes

_init = nn.initializers.normal(0.02)


def decoder_layer(p: dict, carry, *, step: StepInput, config: ModelConfig,
                  attention_backend: str):
    """Attention + MLP block over one layer's params p (layer axis dropped), pre-norm
    (GPT-2, most OPT) or post-norm (OPT-350m); carry is (x [T, W], k pool, v pool, layer
    index), returned updated."""
    c = config
    x, k_cache, v_cache, layer = carry
    if c.pre_norm:
        h, k_cache, v_cache = attention(norm(x, p, "attn_norm", c), p, c, step, k_cache,
                                        v_cache, layer, attention_backend)
        x = x + h
        x = x + mlp(norm(x, p, "mlp_norm", c), p, c)
    else:
        h, k_cache, v_cache = attention(x, p, c, step, k_cache, v_cache, layer,
                                        attention_backend)
        x = norm(x + h, p, "attn_norm", c)
        x = norm(x + mlp(x, p, c), p, "mlp_norm", c)
    return x, k_cache, v_cache, layer + 1


class GPT2LMHeadModel(nn.Module):
    """Token + position embeddings -> scanned layers -> final norm -> last-token logits."""

    config: ModelConfig
    attention_backend: str = "reference"

    @nn.compact
    def __call__(self, step: StepInput, kv_cache: KVCache, all_token_logits: bool = False):
        """Same contract as `LlamaForCausalLM.__call__`."""
        c = self.config
        shapes = expected_shapes(c)
        top = declare_params(self, {k: v for k, v in shapes.items() if k != "layers"}, _init)
        x = jnp.take(top["embed"], step.input_ids, axis=0)  # [T, W]
        if c.embed_dim is not None:
            x = linear(x, top["proj_in"])
        x = x + jnp.take(top["pos_embed"], step.positions + c.position_offset, axis=0)

        stacked = StackedLayerParams(c, name="layers")()
        layer_fn = functools.partial(decoder_layer, step=step, config=c,
                                     attention_backend=self.attention_backend)
        carry = (x, kv_cache.k, kv_cache.v, jnp.int32(0))
        x, k_cache, v_cache, _ = scan_layers(layer_fn, stacked, carry)

        lm_head = top["embed"] if c.tie_word_embeddings else top["lm_head"]

        def head(h: jax.Array) -> jax.Array:
            if c.final_norm:
                h = norm(h, top, "final_norm", c)
            if c.embed_dim is not None:
                h = linear(h, top["proj_out"])
            return lm_logits(h, lm_head, c)

        logits = head(jnp.take(x, step.logits_indices, axis=0))  # [B, V]
        if all_token_logits:
            return (logits, head(x)), KVCache(k_cache, v_cache)
        return logits, KVCache(k_cache, v_cache)


class OPTForCausalLM(GPT2LMHeadModel):
    """OPT: GPT2LMHeadModel's structure; the config carries OPT's differences (position
    offset 2, ReLU, pre/post norm, project_in/out)."""
