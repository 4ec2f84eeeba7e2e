"""Learned-position decoders: GPT-2 (`GPT2LMHeadModel`) and OPT (`OPTForCausalLM`).

Same contract (`hidden_states`, `output_logits`) and layer scan as `llama.py`; what
differs: an absolute position table added to the embeddings (OPT reads row position + 2),
LayerNorm with bias, a plain (ungated) MLP with biases, no RoPE; OPT-350m's post-norm
blocks (`config.pre_norm` False) and its project_in / project_out around the layers when
the embedding is narrower. GPT-2's Conv1D weights are transposed to [out, in] by the HF
loader, so the params contract is the shared one (models/params.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .engine_step import CausalLM
from .layers import (AttentionCore, linear, lm_logits, logits_matrix, mlp, norm, scan_layers,
                     self_attention)


def decoder_layer(p: dict, carry, *, attend: AttentionCore, config: ModelConfig):
    """Attention + MLP block over one layer's params p (layer axis dropped), pre-norm
    (GPT-2, most OPT) or post-norm (OPT-350m); carry is (x [T, W], the attention core's
    state, layer index), returned updated."""
    c = config
    x, kv, layer = carry
    if c.pre_norm:
        h, kv = self_attention(norm(x, p, "attn_norm", c), p, c, attend, kv, layer)
        x = x + h
        x = x + mlp(norm(x, p, "mlp_norm", c), p, c)
    else:
        h, kv = self_attention(x, p, c, attend, kv, layer)
        x = norm(x + h, p, "attn_norm", c)
        x = norm(x + mlp(x, p, c), p, "mlp_norm", c)
    return x, kv, layer + 1


def hidden_states(params: dict, config: ModelConfig, input_ids: jax.Array,
                  positions: jax.Array, attend: AttentionCore, kv):
    """Token + learned position embeddings of input_ids [T] at positions [T] through every
    layer, attending with `attend`; returns (hidden states [T, W], the core's kv)."""
    c = config
    x = jnp.take(params["embed"], input_ids, axis=0)  # [T, W]
    if c.embed_dim is not None:
        x = linear(x, params["proj_in"], small_rows=c.small_matmul_rows)
    x = x + jnp.take(params["pos_embed"], positions + c.position_offset, axis=0)
    layer_fn = functools.partial(decoder_layer, attend=attend, config=c)
    x, kv, _ = scan_layers(layer_fn, params["layers"], (x, kv, jnp.int32(0)),
                           stacked_matrices=c.small_matmul_rows > 0)
    return x, kv


def output_logits(params: dict, config: ModelConfig, h: jax.Array) -> jax.Array:
    """float32 logits [N, V] of hidden states h [N, W]: final norm (when the config has
    one), OPT's project_out, then the (tied) head."""
    c = config
    if c.final_norm:
        h = norm(h, params, "final_norm", c)
    if c.embed_dim is not None:
        h = linear(h, params["proj_out"], small_rows=c.small_matmul_rows)
    return lm_logits(h, logits_matrix(params, c), c)


class GPT2LMHeadModel(CausalLM):
    """Token + position embeddings -> scanned layers -> final norm -> last-token logits."""

    hidden_states = staticmethod(hidden_states)
    output_logits = staticmethod(output_logits)


class OPTForCausalLM(GPT2LMHeadModel):
    """OPT: GPT2LMHeadModel's structure; the config carries OPT's differences (position
    offset 2, ReLU, pre/post norm, project_in/out)."""
