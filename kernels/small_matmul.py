"""Products of a few rows with a weight matrix in a C++ XLA FFI kernel, for XLA on CPU.

A decode step of a handful of sequences multiplies a few rows by every weight matrix, so
its time should be the time to read the weights once. XLA CPU's dots of 2-16 rows take
1.2-3x that on the default model's matrices (its 1-row dots do not:
`python benchmarks/small_matmul.py`); `small_matmul.cc` streams each weight row once
against every x row. The engine turns it on through `ModelConfig.small_matmul_rows`
(CPU, one device, float32), and `models/layers.linear` calls it for inputs of
MIN_ROWS..that many rows. It has a VJP (plain dots), so gradients flow through it too.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from .native_build import NativeBuildError, register_kernel

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_matmul.cc")
_TARGET = "pagedjax_small_matmul"
MIN_ROWS = 2  # one row: XLA's own matrix-vector dot is as fast
MAX_ROWS = 16  # beyond, XLA's blocked GEMM wins


@functools.cache
def load_small_matmul() -> str:
    """Build (or find cached), load and register the kernel; returns its XLA FFI target
    name. Raises NativeBuildError when it cannot be built here."""
    return register_kernel(SOURCE, {}, _TARGET, "PagedjaxSmallMatmul")


def unsupported_reason(platform: str, dtype) -> str | None:
    """Why the kernel cannot run these products (None: it can), building it if needed."""
    if platform != "cpu":
        return f"{platform} (it is an XLA CPU kernel)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (the kernel reads float32 weights)"
    try:
        load_small_matmul()
    except NativeBuildError as e:
        return str(e)
    return None


@jax.custom_vjp
def small_matmul(x: jax.Array,  # [R, I] float32
                 w: jax.Array,  # [O, I] float32
                 ) -> jax.Array:
    """x @ w.T as [R, O], in the kernel."""
    call = jax.ffi.ffi_call(load_small_matmul(),
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))
    return call(x, w)


def _forward(x, w):
    return small_matmul(x, w), (x, w)


def _backward(residuals, grad):  # grad [R, O]
    x, w = residuals
    return grad @ w, grad.T @ x


small_matmul.defvjp(_forward, _backward)
