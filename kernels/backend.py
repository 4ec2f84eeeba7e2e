"""Choosing a paged-attention backend by name and platform: the one place that decides.

Names: "auto" (Pallas on GPU / TPU, "native" on CPU), "reference" (plain jnp,
jnp_attention; runs anywhere), "pallas" ("pallas" on CPU runs the kernel in Pallas
interpret mode: slow, for tests), "native" (the jnp backend with decode rows in a C++ XLA
FFI kernel, CPU only, built on first use), "exact" (numerics that do not depend on the
program: attention in float64 rounded once, kernels/exact_attention.py, with the rest of
ModelConfig.exact; CPU and GPU). A combination a kernel cannot run (say a head dim the GPU
kernel does not tile, a bfloat16 pool for the native kernel, or no C++ compiler on the
machine) falls back to "reference" with a one-line warning, never an error; "exact" is
never swapped.

Every backend function takes jnp_attention.paged_attention's arguments plus `slot_mapping`
(only the TPU adapter needs it: it rebuilds page tables that cover this step's tokens).
"""

from __future__ import annotations

import warnings
from typing import Callable

ATTENTION_BACKENDS = ("auto", "reference", "pallas", "native", "exact")


def resolve_attention_backend(name: str, platform: str, *, head_dim: int | None = None,
                              block_size: int | None = None, dtype=None,
                              group: int | None = None) -> str:
    """Map a requested backend ("auto" included) to the one that runs on `platform`:
    "reference", "pallas", "native" or "exact" (group: query heads per KV head). Shape
    arguments left None are not checked; with all of them given, "native" is built here,
    so a machine without a C++ compiler falls back now rather than at the first step."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is not supported; choose one of "
            f"{', '.join(ATTENTION_BACKENDS)}")
    if name == "reference":
        return "reference"
    if name == "exact":  # a choice of numerics, so never swapped for another backend
        if platform == "tpu":
            raise ValueError("attention_backend='exact' computes in float64, which TPUs "
                             "do not have; use 'auto'")
        return "exact"
    if name == "native" or (name == "auto" and platform not in ("gpu", "tpu")):
        reason = _native_unsupported(platform, group, head_dim, block_size, dtype)
        if reason is not None:
            warnings.warn(f"attention_backend={name!r}: the native CPU attention is not "
                          f"available for {reason}; using the reference attention",
                          stacklevel=2)
            return "reference"
        return "native"
    reason = _pallas_unsupported(platform, head_dim, block_size, dtype)
    if reason is not None:
        warnings.warn(f"attention_backend={name!r}: Pallas attention does not support "
                      f"{reason} on {platform}; using the reference attention", stacklevel=2)
        return "reference"
    return "pallas"


def _native_unsupported(platform, group, head_dim, block_size, dtype) -> str | None:
    if platform != "cpu":
        return f"{platform} (it is an XLA CPU kernel)"
    if None in (group, head_dim, block_size, dtype):
        return None
    from . import native_attention
    return native_attention.unsupported_reason(group, head_dim, block_size, dtype)


def _pallas_unsupported(platform, head_dim, block_size, dtype) -> str | None:
    if head_dim is None or block_size is None or dtype is None:
        return None
    if platform == "tpu":
        from . import tpu_attention
        return tpu_attention.unsupported_reason(head_dim, block_size, dtype)
    from . import pallas_attention
    return pallas_attention.unsupported_reason(head_dim, block_size, dtype, platform)


def get_paged_attention(backend: str) -> Callable:
    """The attention function of a resolved backend ("reference", "pallas", "native" or
    "exact"); "pallas" picks the TPU op, the Triton kernel or the interpreted kernel by
    JAX's platform."""
    if backend == "reference":
        return _jnp
    if backend == "exact":
        from .exact_attention import paged_attention as exact_paged_attention
        return exact_paged_attention
    if backend == "native":
        from .native_attention import paged_attention as native_paged_attention
        return native_paged_attention
    if backend == "pallas":
        import jax
        if jax.default_backend() == "tpu":
            from .tpu_attention import paged_attention as tpu_paged_attention
            return tpu_paged_attention
        return _pallas
    raise ValueError(f"unknown resolved attention backend {backend!r}")


def _jnp(*args, slot_mapping=None, **kwargs):
    from .jnp_attention import paged_attention
    del slot_mapping
    return paged_attention(*args, **kwargs)


def _pallas(*args, slot_mapping=None, **kwargs):
    from .pallas_attention import paged_attention
    del slot_mapping
    return paged_attention(*args, **kwargs)
