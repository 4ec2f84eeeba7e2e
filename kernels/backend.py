"""Choosing a paged-attention backend by name and platform: the one place that decides.

Names: "auto" (Pallas on GPU / TPU, the jnp reference on CPU), "reference", "pallas"
("pallas" on CPU runs the kernel in Pallas interpret mode: slow, for tests). A combination
the Pallas path cannot run (say a head dim the GPU kernel does not tile) falls back to the
reference with a one-line warning, never an error.

Every backend function takes the reference's arguments plus `slot_mapping` (only the TPU
adapter needs it: it rebuilds page tables that cover this step's tokens).
"""

from __future__ import annotations

import warnings
from typing import Callable

ATTENTION_BACKENDS = ("auto", "reference", "pallas")


def resolve_attention_backend(name: str, platform: str, *, head_dim: int | None = None,
                              block_size: int | None = None, dtype=None) -> str:
    """Map a requested backend ("auto" included) to the one that runs on `platform`:
    "reference" or "pallas". Shape arguments left None are not checked."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is not supported; choose one of "
            f"{', '.join(ATTENTION_BACKENDS)}")
    if name == "reference" or (name == "auto" and platform not in ("gpu", "tpu")):
        return "reference"
    reason = _pallas_unsupported(platform, head_dim, block_size, dtype)
    if reason is not None:
        warnings.warn(f"attention_backend={name!r}: Pallas attention does not support "
                      f"{reason} on {platform}; using the reference attention", stacklevel=2)
        return "reference"
    return "pallas"


def _pallas_unsupported(platform, head_dim, block_size, dtype) -> str | None:
    if head_dim is None or block_size is None or dtype is None:
        return None
    if platform == "tpu":
        from . import tpu_attention
        return tpu_attention.unsupported_reason(head_dim, block_size, dtype)
    from . import pallas_attention
    return pallas_attention.unsupported_reason(head_dim, block_size, dtype, platform)


def get_paged_attention(backend: str) -> Callable:
    """The attention function of a resolved backend ("reference" or "pallas"); "pallas"
    picks the TPU op, the Triton kernel or the interpreted kernel by JAX's platform."""
    if backend == "reference":
        return _reference
    if backend == "pallas":
        import jax
        if jax.default_backend() == "tpu":
            from .tpu_attention import paged_attention as tpu_paged_attention
            return tpu_paged_attention
        return _pallas
    raise ValueError(f"unknown resolved attention backend {backend!r}")


def _reference(*args, slot_mapping=None, **kwargs):
    from .reference import paged_attention
    del slot_mapping
    return paged_attention(*args, **kwargs)


def _pallas(*args, slot_mapping=None, **kwargs):
    from .pallas_attention import paged_attention
    del slot_mapping
    return paged_attention(*args, **kwargs)
