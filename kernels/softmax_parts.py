"""Softmax over a key set in unnormalised parts (flash-attention style), for the jnp paths.

Attention over keys read in pieces (cached context page by page, then the step's own
tokens) keeps per query row a running max, sum and weighted-value total; merging two
parts gives the softmax over the union of their keys.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # the score of an invisible key (finite: exp(NEG_INF - NEG_INF) is no NaN)


class PartialSoftmax(NamedTuple):
    """Softmax over one key set, not yet normalised: merging two gives the softmax over
    their union (the flash-attention rescaling)."""

    max: jax.Array  # [..., G] largest visible score (NEG_INF when nothing is visible)
    total: jax.Array  # [..., G] sum of exp(score - max) over visible keys
    out: jax.Array  # [..., G, D] sum of exp(score - max) * value

    @staticmethod
    def of(
        scores: jax.Array,  # [..., G, N]
        visible: jax.Array,  # bool, broadcasts to scores
        weigh_values: Callable,  # weights [..., G, N] -> [..., G, D]
    ) -> PartialSoftmax:
        """The part of the visible keys of `scores`."""
        top = jnp.max(jnp.where(visible, scores, NEG_INF), axis=-1)
        weights = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
        return PartialSoftmax(top, jnp.sum(weights, axis=-1), weigh_values(weights))

    @staticmethod
    def empty(out_shape: tuple[int, ...]) -> PartialSoftmax:  # out_shape [..., G, D]
        """The part of a key set with nothing visible."""
        rows = out_shape[:-1]
        return PartialSoftmax(jnp.full(rows, NEG_INF, jnp.float32), jnp.zeros(rows, jnp.float32),
                              jnp.zeros(out_shape, jnp.float32))

    def select(self, take_self: jax.Array, other: PartialSoftmax) -> PartialSoftmax:
        """Row-wise choice: self where take_self ([K, T, 1] bool) is set, else other."""
        return PartialSoftmax(jnp.where(take_self, self.max, other.max),
                              jnp.where(take_self, self.total, other.total),
                              jnp.where(take_self[..., None], self.out, other.out))

    def combine(self, other: PartialSoftmax) -> PartialSoftmax:
        """The unnormalised softmax over both key sets (a part that sees nothing adds 0
        as long as the other part, or a later one, sees a key)."""
        top = jnp.maximum(self.max, other.max)
        a, b = jnp.exp(self.max - top), jnp.exp(other.max - top)
        return PartialSoftmax(top, a * self.total + b * other.total,
                              a[..., None] * self.out + b[..., None] * other.out)

    def merge(self, other: PartialSoftmax) -> jax.Array:  # [..., G, D]
        """Normalised output; `other` must see at least one key per row."""
        both = self.combine(other)
        return both.out / both.total[..., None]


def soft_cap_fn(cap: float | None) -> Callable[[jax.Array], jax.Array]:
    """scores -> cap * tanh(scores / cap), or the identity when cap is None."""
    if cap is None:
        return lambda scores: scores
    return lambda scores: cap * jnp.tanh(scores / cap)
