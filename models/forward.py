"""`pagedjax.forward`: the training forward of every model family.

The same params pytree and the same family functions as the engine (`hidden_states`,
`output_logits` of llama.py / gpt2.py, through models/registry.py), with dense causal
attention (models/dense_attention.py) instead of the paged one: logits for every token of
a batch of rows, differentiable and jit-able, for `jax.grad` and optax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .dense_attention import DenseAttention, segment_positions
from .params import check_params
from .registry import model_class


def forward(params: Any, config: ModelConfig, token_ids: Any, *, positions: Any = None,
            segment_ids: Any = None, logits_dtype: Any = jnp.float32,
            exact: bool = False) -> jax.Array:
    """Logits [B, T, V] of every token of token_ids [B, T] (dense causal attention).

    `params`: what `pagedjax.generate` accepts as a pytree (a params dict, stacked or
    the engine's per-layer form, linen variables, an nnx.State / Module), in any float
    dtype: bfloat16 params compute in bfloat16 with float32 norms and softmaxes.
    `segment_ids` [B, T] pack several sequences in a row: a token attends only to earlier
    tokens with its own id (pad with an id of its own). `positions` [B, T] default to each
    token's index within its segment (with no segment_ids: 0..T-1 in every row).
    `logits_dtype`: the returned logits' dtype (float32 by default).
    `exact`: attention, norms, RoPE and activations in float64, each rounded once to the
    params' dtype (CPU and GPU; slower): the logits then do not depend on how the rows are
    padded or batched, and equal, to the bit, those of an engine with
    `attention_backend="exact"` at the same tokens (ModelConfig.exact).
    """
    from pagedjax.flax_params import params_from_flax  # models/ is imported by pagedjax

    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be a bool, got {exact!r}")
    if exact:
        config = dataclasses.replace(config, exact=True)
    params = params_from_flax(params)
    check_params(params, config)
    token_ids = _int_array("token_ids", token_ids)
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, tokens], got shape {token_ids.shape}")
    if segment_ids is None:
        segment_ids = jnp.zeros(token_ids.shape, jnp.int32)
    segment_ids = _int_array("segment_ids", segment_ids, token_ids.shape)
    if positions is None:
        positions = jax.vmap(segment_positions)(segment_ids)
    positions = _int_array("positions", positions, token_ids.shape)
    return _forward(params, config, token_ids, positions, segment_ids,
                    jnp.dtype(logits_dtype))


@functools.partial(jax.jit, static_argnames=("config", "logits_dtype"))
def _forward(params: dict, config: ModelConfig, token_ids: jax.Array, positions: jax.Array,
             segment_ids: jax.Array, logits_dtype) -> jax.Array:
    # token_ids, positions, segment_ids: [B, T]; returns [B, T, V]
    model = model_class(config)

    def one_row(ids, pos, seg):  # [T] each
        x, _ = model.hidden_states(params, config, ids, pos, DenseAttention(seg, config), ())
        return model.output_logits(params, config, x).astype(logits_dtype)

    return jax.vmap(one_row)(token_ids, positions, segment_ids)


def _int_array(name: str, value: Any, shape: Optional[tuple] = None) -> jax.Array:
    """`value` as an int32 array (a tracer stays one), checked against `shape`."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        value = np.asarray(value)
        dtype = value.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must hold integers, got dtype {dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have token_ids' shape {tuple(shape)}, "
                         f"got {tuple(value.shape)}")
    return jnp.asarray(value, jnp.int32)
