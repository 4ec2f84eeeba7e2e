"""Sizing the KV pool: the engine dtype, the context limit and the number of pages."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pagedjax.models import ModelConfig

from .config import EngineConfig


def resolve_dtype(dtype: str, platform: str) -> jnp.dtype:
    """"auto" is float32 on CPU (bf16 is slower there) and bfloat16 on GPU/TPU."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def resolve_kv_dtype(dtype: jnp.dtype, platform: str, native: bool = False) -> jnp.dtype:
    """The KV pool's dtype: the engine dtype, except on CPU, where XLA has no 16-bit float
    scatter (it widens a bfloat16 pool to float32 and back around every step's KV write,
    ~100x a float32 step). There the pool is float32 (K and V widen exactly: the same
    values, twice the bytes), but bfloat16 for a bfloat16 engine on the `native` backend,
    whose kernels write and read it in place (kernels/kv_pool_writes.cc)."""
    if platform != "cpu":
        return jnp.dtype(dtype)
    return jnp.dtype(dtype if native and jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The engine's context limit: `config.max_model_len`, at most the model's."""
    limit = model_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={limit}")
    return config.max_model_len


def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: jnp.dtype) -> int:
    """Bytes of one KV page over every layer (keys and values)."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads * block_size * c.head_dim * dtype.itemsize


def resolve_num_blocks(config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                       dtype: jnp.dtype, platform: str, kv_shards: int = 1) -> int:
    """Pages in the pool: `config.num_blocks`, else what the memory budget holds (free
    accelerator memory off CPU), never more than every sequence at full length uses.
    The budget is one device's; a pool split over `kv_shards` devices holds that many
    times more pages."""
    max_pages_per_seq = math.ceil(max_model_len / config.block_size)
    needed_for_one = max_pages_per_seq + 1  # + the null page
    if config.num_blocks is not None:
        num_blocks = config.num_blocks
    else:
        budget = config.kv_cache_memory_bytes
        if platform != "cpu":
            stats = jax.devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            if free > 0:
                budget = int(free * config.kv_cache_memory_fraction)
        num_blocks = budget * kv_shards // bytes_per_block(model_config, config.block_size,
                                                           dtype)
        num_blocks = min(num_blocks, config.max_num_seqs * max_pages_per_seq + 1)
    if num_blocks < needed_for_one:
        raise ValueError(
            f"num_blocks: the KV pool has {num_blocks} blocks of {config.block_size} "
            f"tokens, but one sequence of max_model_len={max_model_len} needs "
            f"{needed_for_one} (null page included); raise num_blocks / the KV memory "
            f"budget or lower max_model_len")
    return num_blocks
