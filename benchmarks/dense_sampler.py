"""The sampler JAX training codebases usually write (the pattern of the gemma library's and
the Flax examples' samplers): the baseline of train_eval.py.

A static batch: prompts left-padded to one fixed length P, a dense KV cache
[B, L, P + G, K, D] per layer stack, the prompts prefilled in one call, then greedy decode
steps in a `lax.while_loop` that runs every row each step and ends when every row has its
budget of tokens, so a batch waits for its longest member. Shapes are fixed (P, G, B), so it
compiles once. It runs the model's own functions (`hidden_states` / `output_logits` of
pagedjax.models.llama) with a dense-cache attention core in place of the engine's paged one.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models import ModelConfig
from pagedjax.models.llama import hidden_states, output_logits

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class DenseCacheAttention:
    """Attention core (models/layers.AttentionCore) over one row's dense cache
    (k, v) [L, S, K, D]: the call's tokens are written at cache slots `slots` [T]; each
    query attends to the slots from `start` (the row's first real token) to its own."""

    slots: jax.Array  # [T] int32
    start: jax.Array  # [] int32
    config: ModelConfig

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, kv: tuple,
                 layer: jax.Array, window_flag=None) -> tuple[jax.Array, tuple]:
        # q [T, H, D], k / v [T, K, D]; returns (out [T, H, D], kv updated)
        k_cache = kv[0].at[layer, self.slots].set(k.astype(kv[0].dtype))  # [L, S, K, D]
        v_cache = kv[1].at[layer, self.slots].set(v.astype(kv[1].dtype))
        keys, values = k_cache[layer], v_cache[layer]  # [S, K, D]
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = keys.shape[1]
        qg = (q.astype(jnp.float32) * self.config.attention_scale).reshape(
            num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = jnp.einsum("tkgd,skd->kgts", qg, keys.astype(jnp.float32))  # [K, G, T, S]
        index = jnp.arange(keys.shape[0])
        visible = (index[None, :] >= self.start) & (index[None, :] <= self.slots[:, None])
        weights = jax.nn.softmax(jnp.where(visible, scores, NEG_INF), axis=-1)
        out = jnp.einsum("kgts,skd->tkgd", weights, values.astype(jnp.float32))
        return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype), (k_cache, v_cache)


class StaticBatchSampler:
    """Greedy generation for batches of `batch_size` prompts of at most `max_prompt_len`
    tokens, each with its own token budget (at most `max_new_tokens`)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_prompt_len: int,
                 max_new_tokens: int, dtype=jnp.float32):
        if config.architecture not in ("LlamaForCausalLM",) or config.sliding_window:
            raise ValueError("the dense baseline runs plain Llama-family models only")
        self.config = config
        self.batch_size, self.max_prompt_len = batch_size, max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.dtype = jnp.dtype(dtype)
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self._compiled = {}

    def generate(self, params: dict, prompts: list[list[int]],
                 budgets: list[int]) -> list[list[int]]:
        """Each prompt's greedy continuation of its budget's length, run in static batches
        in the given order (the last one padded with copies of its first row)."""
        outputs = []
        for first in range(0, len(prompts), self.batch_size):
            batch = prompts[first:first + self.batch_size]
            batch_budgets = budgets[first:first + self.batch_size]
            real = len(batch)
            batch = batch + [batch[0]] * (self.batch_size - real)
            batch_budgets = batch_budgets + [1] * (self.batch_size - real)
            ids = np.zeros((self.batch_size, self.max_prompt_len), np.int32)
            for row, prompt in enumerate(batch):
                ids[row, self.max_prompt_len - len(prompt):] = prompt
            lens = np.array([len(p) for p in batch], np.int32)
            program = self._program(params)
            tokens = np.asarray(program(params, ids, lens, np.asarray(batch_budgets, np.int32)))
            outputs += [tokens[row, :batch_budgets[row]].tolist() for row in range(real)]
        return outputs

    def _program(self, params: dict):
        """The compiled generate program for these params' shapes (compiled once)."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        key = jax.tree.structure(spec), tuple((s.shape, s.dtype) for s in jax.tree.leaves(spec))
        if key not in self._compiled:
            start = time.perf_counter()
            B, P = self.batch_size, self.max_prompt_len
            ints = jax.ShapeDtypeStruct((B,), jnp.int32)
            self._compiled[key] = jax.jit(self._generate).lower(
                spec, jax.ShapeDtypeStruct((B, P), jnp.int32), ints, ints).compile()
            self.num_compiles += 1
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def _generate(self, params: dict, prompt_ids: jax.Array, prompt_lens: jax.Array,
                  budgets: jax.Array) -> jax.Array:
        # prompt_ids [B, P] left-padded, prompt_lens [B], budgets [B]; returns [B, G]
        c = self.config
        B, P = prompt_ids.shape
        G = self.max_new_tokens
        cache_shape = (B, c.num_layers, P + G, c.num_kv_heads, c.head_dim)
        kv = (jnp.zeros(cache_shape, self.dtype), jnp.zeros(cache_shape, self.dtype))
        starts = P - prompt_lens

        def prefill_row(ids, start, kv_row):  # ids [P]
            positions = jnp.maximum(jnp.arange(P) - start, 0)
            attend = DenseCacheAttention(jnp.arange(P), start, c)
            x, kv_row = hidden_states(params, c, ids, positions, attend, kv_row)
            return output_logits(params, c, x[-1:])[0], kv_row

        def decode_row(token, position, slot, start, kv_row):  # scalars
            attend = DenseCacheAttention(slot[None], start, c)
            x, kv_row = hidden_states(params, c, token[None], position[None], attend, kv_row)
            return output_logits(params, c, x)[0], kv_row

        logits, kv = jax.vmap(prefill_row)(prompt_ids, starts, kv)
        out = jnp.zeros((B, G), jnp.int32).at[:, 0].set(jnp.argmax(logits, -1))

        def keep_going(state):
            done, _, _ = state  # tokens generated so far
            return (done < G) & jnp.any(done < budgets)

        def step(state):
            done, out, kv = state
            token = out[:, done - 1]
            logits, kv = jax.vmap(decode_row)(token, prompt_lens + done - 1,
                                              jnp.full((B,), P + done - 1), starts, kv)
            return done + 1, out.at[:, done].set(jnp.argmax(logits, -1)), kv

        _, out, _ = jax.lax.while_loop(keep_going, step, (jnp.int32(1), out, kv))
        return out
