"""Allowed-token bitmasks on the device: logits of tokens a row's grammar refuses -> -inf.

The host (grammar_bitmasks.py) packs each row's allowed tokens as int32 words, token t
being bit t % 32 of word t // 32 (llguidance's and xgrammar's layout); a row of -1 words
allows everything. Only programs whose BucketKey has `bitmask_words` > 0 take a mask.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def unpack_bitmask(bitmask: jax.Array,  # [B, W] int32, W >= ceil(V / 32)
                   vocab_size: int) -> jax.Array:  # [B, V] bool
    """The bits of `bitmask` in token order: True where a token is allowed."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]: arithmetic shift, bit 0 kept
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_token_bitmask(logits: jax.Array,  # [B, V] float32
                        bitmask: Optional[jax.Array],  # [B, W] int32, or None
                        ) -> jax.Array:  # [B, V]
    """`logits` with every token outside its row's bitmask set to -inf; as they are when
    there is no mask (None, or W == 0: decided when tracing)."""
    if bitmask is None or bitmask.shape[-1] == 0:
        return logits
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    return jnp.where(allowed, logits, -jnp.inf)
