"""Turning a user's dtype spelling into the numpy dtype the loaders fill params with."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# Spellings users pass (vLLM / torch / JAX names) -> numpy dtype. bfloat16 comes from
# ml_dtypes (a JAX dependency) because numpy has no bfloat16 of its own.
_NAMED = {
    "float32": np.dtype(np.float32),
    "fp32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "fp16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype for `dtype` (None -> float32, names like "bf16", numpy/JAX dtypes).

    "auto" is not resolved here: which dtype "auto" means depends on the platform and the
    checkpoint, which is the engine's decision, so the engine must pass a concrete dtype.
    """
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.").removeprefix("jnp.")
        if key == "auto":
            raise ValueError(
                "dtype='auto' must be resolved to a concrete dtype before loading weights; "
                f"supported: {', '.join(SUPPORTED_DTYPES)}"
            )
        if key not in _NAMED:
            raise ValueError(
                f"dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}"
            )
        return _NAMED[key]
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(
            f"dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from err
    if resolved not in _NAMED.values():
        raise ValueError(
            f"dtype {resolved} is not supported for weights; "
            f"supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    return resolved
