"""Block-encoded copies of the engine's weight matrices, for the CPU small-matmul kernel.

A decode step of a few sequences is the time to read every weight matrix once. Weights
loaded from a quantized GGUF file, or a bfloat16 checkpoint run in float32, are float32
values that a block format holds exactly (kernels/exact_blocks.py): the engine keeps such
a copy of each matrix that has one, and the model's small products read it
(`BlockMatrix`, kernels/small_matmul.py), bitwise the same outputs from a fifth to half
the bytes. Prefill and large steps still read
the float32 matrices through XLA.

New weights (`update_params`) are not re-encoded (a check over every weight is too slow
for a weight sync, and trained weights are not block values): the blocks are marked
stale, a runtime flag the kernel reads, so nothing is recompiled or reshaped and the
products go back to the float32 matrices; their memory is let go (each shape keeps one
shared zero placeholder).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels.exact_blocks import encode_exactly
from pagedjax.kernels.small_matmul import BlockMatrix
from pagedjax.models import ModelConfig
from pagedjax.models.layers import logits_matrix
from pagedjax.models.params import LAYER_MATRICES

Encoded = Optional[tuple[int, jax.Array]]  # (format, blocks [O, row bytes] uint8) or None


@dataclasses.dataclass(frozen=True)
class WeightBlocks:
    """The block copies of one model's matrices: per layer matrix name, one entry per layer;
    one for the logits matrix (`lm_head`, or the tied embedding). `current` is False
    once the weights they were encoded from are replaced (the blocks are placeholders)."""

    layers: dict[str, tuple[Encoded, ...]]
    lm_head: Encoded
    current: bool = True

    @classmethod
    def encode(cls, params: dict, config: ModelConfig) -> Optional["WeightBlocks"]:
        """Encode every matrix of host `params` (models/params.py layout, float32) that a
        block format holds exactly; None when none does (a random or trained model)."""
        layers = {name: tuple(_encode(np.asarray(value[i])) for i in range(len(value)))
                  for name, value in params["layers"].items() if name in LAYER_MATRICES}
        lm_head = _encode(np.asarray(logits_matrix(params, config)))
        if lm_head is None and not any(e for per_layer in layers.values() for e in per_layer):
            return None
        return cls(layers, lm_head)

    def stale(self) -> "WeightBlocks":
        """Not current any more (the matrices were replaced): the blocks become zero
        placeholders of the same shapes, one array per shape, and the kernel is told to
        read the float32 matrices."""
        if not self.current:
            return self
        zeros: dict[tuple, jax.Array] = {}

        def placeholder(encoded: Encoded) -> Encoded:
            if encoded is None:
                return None
            fmt, blocks = encoded
            if blocks.shape not in zeros:
                zeros[blocks.shape] = jnp.zeros(blocks.shape, jnp.uint8)
            return fmt, zeros[blocks.shape]

        layers = {k: tuple(placeholder(e) for e in v) for k, v in self.layers.items()}
        return WeightBlocks(layers, placeholder(self.lm_head), current=False)

    def attach(self, params: dict, config: ModelConfig) -> dict:
        """Engine `params` (layer matrices as per-layer tuples) with each encoded matrix
        a BlockMatrix; the logits matrix goes under "lm_head" (tied models too)."""
        current = jnp.asarray(self.current)

        def wrap(dense: jax.Array, encoded: Encoded) -> Any:
            if encoded is None:
                return dense
            fmt, blocks = encoded
            return BlockMatrix(dense, blocks, current, fmt)

        layers = dict(params["layers"])
        for name, per_layer in self.layers.items():
            layers[name] = tuple(wrap(d, e) for d, e in zip(layers[name], per_layer))
        head = logits_matrix(params, config)
        return {**params, "layers": layers, "lm_head": wrap(head, self.lm_head)}


def detach(view: dict, config: ModelConfig) -> dict:
    """The plain params tree of an `attach`ed view (float32 matrices, no blocks)."""
    def dense(x: Any) -> Any:
        return x.dense if isinstance(x, BlockMatrix) else x

    layers = {k: tuple(dense(m) for m in v) if isinstance(v, tuple) else v
              for k, v in view["layers"].items()}
    top = {k: dense(v) for k, v in view.items() if k != "layers"}
    if config.tie_word_embeddings:
        del top["lm_head"]
    return {**top, "layers": layers}


def _encode(w: np.ndarray,  # [O, I]
            ) -> Encoded:
    encoded = encode_exactly(w)
    if encoded is None:
        return None
    fmt, blocks = encoded
    return fmt, jnp.asarray(blocks)
