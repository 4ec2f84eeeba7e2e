"""Paged-attention backends, chosen by name, and the cache write they share (installed as
pagedjax.kernels)."""

from .backend import ATTENTION_BACKENDS, get_paged_attention, resolve_attention_backend
from .jnp_attention import paged_attention
from .kv_write import write_kv

__all__ = ["ATTENTION_BACKENDS", "get_paged_attention", "paged_attention",
           "resolve_attention_backend", "write_kv"]
