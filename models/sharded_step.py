"""Tensor parallelism inside the engine step: the two places where the step names its mesh.

The step is written in the global view: XLA's SPMD partitioner places the collectives of
the matmuls from the params' shardings (pagedjax/param_layout.py): column-parallel q/k/v
and gate/up need none, row-parallel o and down end in one all-reduce each, and the
vocabulary-parallel embedding lookup in one all-reduce. Two seams are explicit:

* attention runs under `shard_map` on each device's own heads: `write_kv` and the kernel
  backend see the local pool [L, P, K / tp, D, S] and local q [T, H / tp, D], so no
  backend knows about the mesh and nothing gathers the KV pool;
* the logits [B, V] of the vocabulary-parallel LM head are gathered (one all-gather of
  B x V float32) before the sampler, which keeps penalties, bitmasks, top-k / top-p and
  logprobs on whole rows as on one device. Without the sharded constraint first, XLA
  would rather gather the [V, E] head, far larger than the logits of a decode batch.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP_AXIS = "tp"  # the mesh axis the engine splits heads, hidden units and vocabulary over

HEADS_SPEC = P(None, TP_AXIS, None)  # q [T, H, D], k / v [T, K, D]: split by heads
K_POOL_SPEC = P(None, None, TP_AXIS, None, None)  # k pool [L, P, K, D, S]
V_POOL_SPEC = P(None, None, None, TP_AXIS, None)  # v pool [L, P, S, K, D]


def tensor_parallel_size(mesh: Mesh) -> int:
    """Devices along the mesh's TP_AXIS."""
    return mesh.shape[TP_AXIS]


def is_vocab_parallel(vocab_size: int, mesh: Mesh) -> bool:
    """Whether the embedding and LM head are split by vocabulary rows (tp divides V);
    otherwise they are replicated."""
    return vocab_size % tensor_parallel_size(mesh) == 0


def per_shard_attention(write_and_attend: Callable, mesh: Mesh,
                        num_replicated: int) -> Callable:
    """`write_and_attend(q, k, v, k_pool, v_pool, *replicated) -> (out, k_pool, v_pool)`
    run on every device over its own heads (q / k / v / out [T, heads, D] and both pools
    split by heads, the `num_replicated` other arguments whole on every device)."""
    return jax.shard_map(
        write_and_attend, mesh=mesh,
        in_specs=(HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, K_POOL_SPEC, V_POOL_SPEC)
        + (P(),) * num_replicated,
        out_specs=(HEADS_SPEC, K_POOL_SPEC, V_POOL_SPEC),
        check_vma=False)  # the kernels' conds and FFI calls carry no varying-axis types


def gather_logits(logits: jax.Array, mesh: Mesh, vocab_parallel: bool) -> jax.Array:
    """Logits [N, V] whole on every device: computed split by vocabulary (when the head
    is), then one all-gather."""
    if vocab_parallel:
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P(None, TP_AXIS)))
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))
