"""The native CPU decode-attention kernel alone: one layer's decode rows over pages
scattered in a pool, timed, with the bandwidth it reaches on the K/V bytes it reads.

The default shape is the default model's (SmolLM2-135M: 3 KV heads, 3 query heads each,
head dim 64, 64-token pages) and a 128-row decode step with contexts of 16-512 tokens
(mean ~260). `--source` times other builds of the kernel beside the current one (an A/B in
one process, the runs alternating), e.g. the file as of an earlier commit:

    python benchmarks/native_decode.py
    git show HEAD~1:kernels/decode_attention.cc > /tmp/old.cc
    python benchmarks/native_decode.py --source /tmp/old.cc
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import native_attention
from pagedjax.kernels.native_build import register_kernel


def make_step(rows: int, num_kv_heads: int, group: int, head_dim: int, page_size: int,
              min_context: int, max_context: int, seed: int = 0):
    """q, tables, lens and a one-layer pool whose pages are handed out in random order."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_context, max_context + 1, rows).astype(np.int32)
    pages = -(-lens // page_size)
    num_pages = int(pages.sum()) + 1
    order = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((rows, int(pages.max())), np.int32)
    start = 0
    for r, n in enumerate(pages):
        tables[r, :n] = order[start:start + n]
        start += n
    k_cache = rng.standard_normal((1, num_pages, num_kv_heads, head_dim, page_size),
                                  np.float32)
    v_cache = rng.standard_normal((1, num_pages, page_size, num_kv_heads, head_dim),
                                  np.float32)
    q = rng.standard_normal((rows, num_kv_heads, group, head_dim), np.float32)
    page_bytes = 2 * num_kv_heads * head_dim * page_size * 4
    return (jnp.asarray(q * head_dim ** -0.5), jnp.asarray(tables), jnp.asarray(lens),
            jnp.asarray(k_cache), jnp.asarray(v_cache), int(pages.sum()) * page_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[],
                        help="another build of decode_attention.cc to time (repeatable)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--context", type=int, nargs=2, default=(16, 512))
    parser.add_argument("--layers", type=int, default=30,
                        help="calls per timed run (a step's layers)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    defines = {"GROUP": args.group, "HEAD_DIM": args.head_dim, "PAGE_SIZE": args.page_size}
    sources = [native_attention.SOURCE] + args.source
    targets = [register_kernel(source, defines, f"pagedjax_bench_decode_{i}",
                               native_attention.SYMBOLS["float32"])
               for i, source in enumerate(sources)]
    q, tables, lens, k_cache, v_cache, nbytes = make_step(
        args.rows, args.kv_heads, args.group, args.head_dim, args.page_size, *args.context)
    partial = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)

    def run_layers(target):
        call = jax.ffi.ffi_call(target, (partial, partial, out))

        @jax.jit
        def layers(q, k_cache, v_cache, tables, lens):
            def body(i, acc):
                top, total, o = call(q + acc * 0, k_cache, v_cache, jnp.int32(0), tables,
                                     lens, lens, window=np.int32(0),
                                     soft_cap=np.float32(0.0))
                return acc + o[..., :1] * 0 + total[..., None] * 0
            return jax.lax.fori_loop(0, args.layers, body, jnp.zeros_like(q[..., :1]))
        return layers

    programs = [run_layers(t) for t in targets]
    results = [jax.block_until_ready(p(q, k_cache, v_cache, tables, lens))
               for p in programs]  # compile
    single = [jax.ffi.ffi_call(t, (partial, partial, out))(
        q, k_cache, v_cache, jnp.int32(0), tables, lens, lens, window=np.int32(0),
        soft_cap=np.float32(0.0)) for t in targets]
    for other in single[1:]:
        for got, want in zip(other, single[0]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                                       atol=2e-5)
    del results
    times = [[] for _ in targets]
    for _ in range(args.repeats):
        for i, program in enumerate(programs):  # alternating: the machine's noise is shared
            start = time.perf_counter()
            jax.block_until_ready(program(q, k_cache, v_cache, tables, lens))
            times[i].append((time.perf_counter() - start) / args.layers)
    print(f"{args.rows} rows, contexts {args.context[0]}-{args.context[1]} "
          f"(mean {float(np.mean(lens)):.0f}), K={args.kv_heads} G={args.group} "
          f"D={args.head_dim} S={args.page_size}: {nbytes / 2**20:.1f} MiB of K/V pages "
          f"per layer")
    for source, t in zip(sources, times):
        median = statistics.median(t)
        print(f"{os.path.relpath(source):40s} {median * 1e3:7.2f} ms per layer "
              f"(min {min(t) * 1e3:.2f})  {nbytes / median / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
