"""The engine's tensor-parallel layout of a model's params and KV pool (Megatron's).

Over the mesh's "tp" axis (tp devices):

* column-parallel, split by output rows: `wqkv` / `bqkv` by heads, `w_gate_up` /
  `b_gate_up` / `w_up` / `b_up` by hidden units. The fused matrices' rows are rearranged
  shard-major ([q_s, k_s, v_s] then the next shard's; [gate_s, up_s] likewise) so each
  device's contiguous block holds whole heads of each part; `ModelConfig.fused_shards`
  tells the model to split them that way. This one rearrangement is why fused leaves are
  copied once (device to device) even when a trainer already splits them by rows.
* row-parallel, split by input columns: `wo`, `w_down` (XLA sums the partial products:
  one all-reduce after attention and one after the MLP, per layer);
* vocabulary-parallel, split by rows: `embed` and `lm_head` when tp divides V (else
  replicated: uneven splits are not jax.Arrays);
* replicated: norms, the o / down biases, learned positions, OPT's projections.

The KV pool is split by KV heads. With tp > K (tp a multiple of K) every KV head is
copied to tp / K devices (vLLM's rule): the engine's model has tp KV heads, their k / v
rows of `wqkv` duplicated, one head per device, which attends exactly as the original.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pagedjax.models import ModelConfig
from pagedjax.models.params import expected_shapes
from pagedjax.models.sharded_step import (K_POOL_SPEC, TP_AXIS, V_POOL_SPEC, is_vocab_parallel,
                                          tensor_parallel_size)

from .input_transfer import put
from .step_input import KVCache

# leaf name -> the axis split over TP_AXIS (the leading layer axis L counted)
_SPLIT_AXIS = {"wqkv": 1, "bqkv": 1, "w_gate_up": 1, "b_gate_up": 1, "w_up": 1, "b_up": 1,
               "wo": 2, "w_down": 2}
_VOCAB_LEAVES = ("embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class TensorParallelLayout:
    """Where every param and the KV pool of `model_config` lie on `mesh` (validated)."""

    model_config: ModelConfig
    mesh: Mesh

    def __post_init__(self):
        c, tp = self.model_config, self.tp
        for name, value in (("num_heads", c.num_heads), ("intermediate_size",
                                                         c.intermediate_size)):
            if value % tp:
                raise ValueError(f"tensor_parallel_size={tp} must divide the model's "
                                 f"{name} ({value})")
        if c.num_kv_heads % tp and tp % c.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} must divide the model's num_kv_heads "
                             f"({c.num_kv_heads}) or be a multiple of it (KV heads copied)")

    @property
    def tp(self) -> int:
        """Devices along the tensor-parallel axis."""
        return tensor_parallel_size(self.mesh)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of the engine's model: the model's, or tp when they are copied."""
        return max(self.model_config.num_kv_heads, self.tp)

    @property
    def engine_model_config(self) -> ModelConfig:
        """The config the engine's model and KV pool are built from (same numbers, KV
        heads copied when tp > K, fused rows shard-major)."""
        return self.model_config.replace(num_kv_heads=self.num_kv_heads, fused_shards=self.tp)

    def sharding(self, spec: P) -> NamedSharding:
        """`spec` on the engine's mesh."""
        return NamedSharding(self.mesh, spec)

    def param_shardings(self) -> dict:
        """A NamedSharding for every leaf of the engine-layout params tree."""
        def spec(name: str, ndim: int) -> P:
            axis = _SPLIT_AXIS.get(name)
            if name in _VOCAB_LEAVES and is_vocab_parallel(self.model_config.vocab_size,
                                                           self.mesh):
                axis = 0
            if axis is None:
                return P()
            return P(*(TP_AXIS if i == axis else None for i in range(ndim)))

        shapes = expected_shapes(self.engine_model_config)
        layers = {k: self.sharding(spec(k, len(s))) for k, s in shapes["layers"].items()}
        top = {k: self.sharding(spec(k, len(s))) for k, s in shapes.items() if k != "layers"}
        return {**top, "layers": layers}

    def kv_shardings(self) -> KVCache:
        """The pools' shardings: split by KV heads."""
        return KVCache(self.sharding(K_POOL_SPEC), self.sharding(V_POOL_SPEC))

    def to_engine_layout(self, params: dict, dtype) -> dict:
        """`params` (a checked tree in the model's natural layout: host arrays, or device
        arrays with any sharding) in `dtype` on the engine's shardings. Host arrays go
        straight to their shards; a device array already of that dtype and sharding (an
        equivalent one on another mesh object counts) is kept as it is; other device
        arrays are resharded device to device, fused leaves through one program that
        rearranges their rows (compiled once per input sharding)."""
        shardings = self.param_shardings()
        layers = {k: self._place(k, v, shardings["layers"][k], dtype)
                  for k, v in params["layers"].items()}
        top = {k: self._place(k, v, shardings[k], dtype) for k, v in params.items()
               if k != "layers"}
        return {**top, "layers": layers}

    def _fused_parts(self, name: str):
        """The parts of a fused leaf's rows as (units, rows per unit, copies), or None."""
        c = self.model_config
        copies = self.num_kv_heads // c.num_kv_heads
        if name in ("wqkv", "bqkv"):
            return ((c.num_heads, c.head_dim, 1), (c.num_kv_heads, c.head_dim, copies),
                    (c.num_kv_heads, c.head_dim, copies))
        if name in ("w_gate_up", "b_gate_up"):
            return ((c.intermediate_size, 1, 1), (c.intermediate_size, 1, 1))
        return None

    def _place(self, name: str, x: Any, target: NamedSharding, dtype) -> jax.Array:
        parts = self._fused_parts(name)
        if isinstance(x, tuple):  # per-layer matrices (models/params.py): stacked again
            x = jnp.stack(x) if isinstance(x[0], jax.Array) else np.stack(x)
        if not isinstance(x, jax.Array):
            x = np.asarray(x)
            if parts is not None:
                x = shard_major_rows(x, parts, self.tp, np)
            return put(x.astype(dtype), target)
        if parts is None:
            if x.dtype != dtype:
                x = x.astype(dtype)
            if x.sharding.is_equivalent_to(target, x.ndim):
                return x  # in place: the same buffers
            return jax.device_put(x, target)
        rows_split = x.shape[1] % self.tp == 0
        x = jax.device_put(x, self.sharding(P(None, TP_AXIS) if rows_split else P()))
        return _relayout_rows(x, parts, self.tp, jnp.dtype(dtype), target)


def shard_major_rows(x, parts: tuple, shards: int, xp) -> Any:
    """x [L, R, ...] whose rows are `parts` one after another, each (units, rows per
    unit, copies), with every unit repeated `copies` times in place and the rows ordered
    shard by shard: shard s holds the s-th block of every part, in part order. `xp` is
    numpy or jax.numpy."""
    layers, rest = x.shape[0], x.shape[2:]
    blocks, offset = [], 0
    for units, unit_rows, copies in parts:
        part = x[:, offset:offset + units * unit_rows]
        offset += units * unit_rows
        if copies > 1:
            part = part.reshape(layers, units, 1, unit_rows, *rest)
            part = xp.broadcast_to(part, (layers, units, copies, unit_rows, *rest))
        blocks.append(part.reshape(layers, shards, -1, *rest))
    return xp.concatenate(blocks, axis=2).reshape(layers, -1, *rest)


@functools.partial(jax.jit, static_argnames=("parts", "shards", "dtype", "target"))
def _relayout_rows(x: jax.Array, parts: tuple, shards: int, dtype, target: NamedSharding):
    """`shard_major_rows` of device array x in `dtype`, laid out as `target`."""
    rows = shard_major_rows(x, parts, shards, jnp).astype(dtype)
    return jax.lax.with_sharding_constraint(rows, target)
