"""The engine's side of every model: the paged attention core and the Flax module that
runs one engine step.

A model family (llama.py, gpt2.py) is two pure functions over the params pytree,
`hidden_states` (embeddings and the layer scan, around a pluggable attention core) and
`output_logits` (final norm and head). `CausalLM` declares the params and runs them with
`PagedAttention`, which writes the step's K/V into the paged pool and attends through a
kernel backend; the training forward (models/forward.py) runs the same two functions
with dense causal attention instead.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pagedjax.kernels import get_paged_attention, write_kv
from pagedjax.step_input import KVCache, StepInput

from .config import ModelConfig
from .layers import declare_params, layer_window
from .params import expected_shapes
from .sharded_step import gather_logits, is_vocab_parallel, per_shard_attention

_init = nn.initializers.normal(0.02)

# The StepInput fields every attention backend takes (by these names).
_RAGGED_FIELDS = ("token_seq", "positions", "context_lens", "block_tables", "slot_mapping")


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """The engine's attention core (models/layers.AttentionCore): K/V written at the
    step's slots of the pool `kv` = (k [L, P, K, D, S], v [L, P, S, K, D]), then ragged
    paged attention through `backend` (sliding window, soft-cap, scale from the config).
    With a `mesh`, both run on each device over its own heads and its part of the pool."""

    step: StepInput
    backend: str  # kernels.resolve_attention_backend's answer
    config: ModelConfig
    mesh: Mesh | None = None  # tensor parallel: each device attends over its own heads

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, kv: tuple, layer: jax.Array,
                 window_flag: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        # q: [T, H, D], k / v: [T, K, D]; returns (out [T, H, D], the updated pool)
        c = self.config
        attend = get_paged_attention(self.backend)

        def write_and_attend(q, k, v, k_cache, v_cache, layer, ragged, window_flag):
            # ragged: the step's arrays named in _RAGGED_FIELDS
            k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, ragged["slot_mapping"],
                                        native=self.backend == "native")

            def run(window):
                return attend(
                    q, k, v, k_cache, v_cache, layer, **ragged, scale=c.attention_scale,
                    **({"sliding_window": window} if window is not None else {}),
                    **({"soft_cap": c.attn_logit_softcap} if c.attn_logit_softcap else {}),
                )

            return layer_window(run, c, window_flag), k_cache, v_cache

        if self.mesh is not None:  # local heads and pool on each device (sharded_step.py)
            write_and_attend = per_shard_attention(write_and_attend, self.mesh, 3)
        ragged = {name: getattr(self.step, name) for name in _RAGGED_FIELDS}
        out, k_cache, v_cache = write_and_attend(q, k, v, kv[0], kv[1], layer, ragged,
                                                 window_flag)
        return out, (k_cache, v_cache)


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


class CausalLM(nn.Module):
    """One engine step of a model family: `apply({"params": params}, step, kv_cache)`
    writes the step's K/V into the paged pool and returns logits for the last scheduled
    token of each sequence only. Subclasses name the family's `hidden_states` and
    `output_logits` (static methods)."""

    config: ModelConfig
    attention_backend: str = "reference"  # kernels.resolve_attention_backend's answer
    # Tensor parallel over this mesh's "tp" axis (params laid out by
    # pagedjax/param_layout.py): attention per shard, logits gathered (sharded_step.py).
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, step: StepInput, kv_cache: KVCache, all_token_logits: bool = False):
        """Returns (logits [B, V], kv_cache); with `all_token_logits` (a static flag, for
        prompt logprobs) returns ((logits [B, V], token_logits [T, V]), kv_cache)."""
        c = self.config
        top = {k: v for k, v in expected_shapes(c).items() if k != "layers"}
        params = {**declare_params(self, top, _init),
                  "layers": StackedLayerParams(c, name="layers")()}
        if "lm_head" not in top and self.has_variable("params", "lm_head"):
            # a tied model's logits matrix, block-encoded by the engine (weight_blocks.py):
            # undeclared, flax would hand the step the float32 embedding instead
            params["lm_head"] = self.get_variable("params", "lm_head")
        attend = PagedAttention(step, self.attention_backend, c, self.mesh)
        x, (k_cache, v_cache) = self.hidden_states(params, c, step.input_ids, step.positions,
                                                   attend, (kv_cache.k, kv_cache.v))
        # Only each sequence's last scheduled token needs logits: the [V, E] projection
        # dominates a small model's step, so never run it over every token.
        logits = self._whole(self.output_logits(params, c, jnp.take(x, step.logits_indices,
                                                                    axis=0)))
        if all_token_logits:  # prompt logprobs: the [T, V] projection, only when asked
            token_logits = self._whole(self.output_logits(params, c, x))
            return (logits, token_logits), KVCache(k_cache, v_cache)
        return logits, KVCache(k_cache, v_cache)

    def _whole(self, logits: jax.Array) -> jax.Array:
        """Logits [N, V] whole on every device (as they are without a mesh)."""
        if self.mesh is None:
            return logits
        return gather_logits(logits, self.mesh, is_vocab_parallel(self.config.vocab_size,
                                                                  self.mesh))
