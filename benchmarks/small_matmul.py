"""XLA CPU's dot against the small-matmul kernel on the default model's matrices.

    python benchmarks/small_matmul.py [--rows 1 2 4 8 16]

For each weight matrix of SmolLM2-135M ([out, in]: the LM head, gate/up, down, q/k/v, o)
and each row count, times x [rows, in] @ w.T both ways (jitted, the mean of 40 calls after
one) and prints the ratio; the engine uses the kernel from kernels.small_matmul.MIN_ROWS to
MAX_ROWS rows. Random float32 values: speed depends on the shapes only.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from pagedjax.kernels.small_matmul import small_matmul

# SmolLM2-135M: E=576, F=1536, 9 query / 3 KV heads of 64, V=49152.
MATRICES = {"lm head": (49152, 576), "gate/up": (3072, 576), "down": (576, 1536),
            "q/k/v": (960, 576), "o": (576, 576)}


def mean_ms(fn, *args, calls: int = 40) -> float:
    """Mean milliseconds of `calls` calls of jitted `fn` after one untimed call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    kernel = jax.jit(small_matmul)
    for name, (out_features, in_features) in MATRICES.items():
        w = jax.device_put(rng.standard_normal((out_features, in_features), np.float32))
        for rows in args.rows:
            x = jax.device_put(rng.standard_normal((rows, in_features), np.float32))
            a, b = mean_ms(xla, x, w), mean_ms(kernel, x, w)
            print(f"{name:8s} [{out_features:5d}, {in_features:4d}] rows {rows:2d}: "
                  f"XLA {a:7.3f} ms, kernel {b:7.3f} ms, XLA / kernel {a / b:4.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
