"""Paged-attention implementations, chosen by backend name (installed as pagedjax.kernels)."""

from .backend import ATTENTION_BACKENDS, get_paged_attention, resolve_attention_backend
from .reference import paged_attention, write_kv

__all__ = ["ATTENTION_BACKENDS", "get_paged_attention", "paged_attention",
           "resolve_attention_backend", "write_kv"]
