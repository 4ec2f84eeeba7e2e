"""Paged attention: the Pallas kernel against the jnp reference, per step bucket.

    python benchmarks/pallas_kernel.py                  # on a GPU: Triton kernel, real sizes
    python benchmarks/pallas_kernel.py --tiny           # on CPU: interpret mode, tiny sizes (a check)
    python benchmarks/pallas_kernel.py --dtype float32 --head-dim 128 --num-heads 32 --num-kv-heads 8

For every bucket (decodes: B sequences x context; prefill chunks: new tokens over a cached
context) it builds fresh random data in a scattered paged pool, checks the kernel against
the reference on the real tokens, times both (compiled, median of --iters runs) and
reports the kernel's achieved memory bandwidth (context K/V + q/out/new K/V bytes over
time) against the device's measured copy bandwidth. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import paged_attention as jnp_attention, write_kv
from pagedjax.kernels.pallas_attention import paged_attention as pallas_attention

# (name, [(context, new tokens)] per sequence)
GPU_BUCKETS = [
    ("decode B=8 ctx=512", [(512, 1)] * 8),
    ("decode B=32 ctx=1024", [(1024, 1)] * 32),
    ("decode B=128 ctx=512", [(512, 1)] * 128),
    ("decode B=64 ctx=2048", [(2048, 1)] * 64),
    ("prefill 1x512 ctx=0", [(0, 512)]),
    ("prefill 1x512 ctx=1536", [(1536, 512)]),
    ("prefill 4x256 ctx=256", [(256, 256)] * 4),
    ("mixed 1x448 + 64 decodes", [(512, 448)] + [(768, 1)] * 64),
]
TINY_BUCKETS = [
    ("decode B=2 ctx=9", [(9, 1), (7, 1)]),
    ("prefill 1x6 ctx=5", [(5, 6)]),
]


def make_step(seqs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """A random step over a scattered pool whose new K/V are already written."""
    rng = np.random.default_rng(seed)
    pages = [-(-(c + n) // block_size) for c, n in seqs]
    num_pages = sum(pages) + 1
    order = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    T = sum(n for _, n in seqs)
    T_pad = max(16, 1 << (T - 1).bit_length())
    B = len(seqs)
    M = max(1, 1 << (max(-(-c // block_size) for c, _ in seqs) - 1).bit_length())
    token_seq = np.full(T_pad, -1, np.int32)
    positions = np.zeros(T_pad, np.int32)
    slots = np.zeros(T_pad, np.int32)
    tables = np.zeros((B, M), np.int32)
    context_lens = np.zeros(B, np.int32)
    offset = used = 0
    for i, ((ctx, new), n_pages) in enumerate(zip(seqs, pages)):
        table = order[used:used + n_pages]
        used += n_pages
        token_seq[offset:offset + new] = i
        pos = np.arange(ctx, ctx + new)
        positions[offset:offset + new] = pos
        slots[offset:offset + new] = table[pos // block_size] * block_size + pos % block_size
        n_ctx = -(-ctx // block_size)
        tables[i, :n_ctx] = table[:n_ctx]
        context_lens[i] = ctx
        offset += new
    key = jax.random.PRNGKey(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    k_cache = jax.random.normal(k1, (1, num_pages, num_kv_heads, head_dim, block_size), dtype)
    v_cache = jax.random.normal(k2, (1, num_pages, block_size, num_kv_heads, head_dim), dtype)
    q = jax.random.normal(k3, (T_pad, num_heads, head_dim), dtype)
    k_new = jax.random.normal(k4, (T_pad, num_kv_heads, head_dim), dtype)
    v_new = jax.random.normal(k5, (T_pad, num_kv_heads, head_dim), dtype)
    k_cache, v_cache = jax.jit(write_kv)(k_cache, v_cache, jnp.int32(0), k_new, v_new,
                                         jnp.asarray(slots))
    args = (q, k_new, v_new, k_cache, v_cache, jnp.int32(0), jnp.asarray(token_seq),
            jnp.asarray(positions), jnp.asarray(context_lens), jnp.asarray(tables))
    itemsize = jnp.dtype(dtype).itemsize
    ctx_bytes = sum(c for c, _ in seqs) * 2 * num_kv_heads * head_dim * itemsize
    io_bytes = T * (2 * num_heads + 2 * num_kv_heads) * head_dim * itemsize
    return args, token_seq >= 0, ctx_bytes + io_bytes


def seconds(fn, args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(num_bytes: int, iters: int) -> float:
    """Device copy bandwidth (read + write bytes per second) of a jitted elementwise op."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    t = seconds(jax.jit(lambda x: x * 1.0001), (x,), iters)
    return 2 * x.nbytes / t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="interpret mode and tiny sizes (runs on CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    tiny = args.tiny
    interpret = tiny or jax.default_backend() != "gpu"
    dtype = jnp.dtype(args.dtype)
    H = args.num_heads or (4 if tiny else 32)
    K = args.num_kv_heads or (2 if tiny else 8)
    D = args.head_dim or (8 if tiny else 128)
    S = args.block_size or (4 if tiny else 64)
    iters = args.iters or (2 if tiny else 20)
    buckets = TINY_BUCKETS if tiny else GPU_BUCKETS
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4

    copy_bw = copy_bandwidth((1 << 20) if tiny else (1 << 30), iters)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"pallas {'interpret' if interpret else 'compiled (Triton)'}; {args.dtype}, "
          f"H={H} K={K} D={D} block_size={S}; copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    header = (f"{'bucket':<26} {'T':>5} {'B':>4} {'ref ms':>9} {'pallas ms':>10} "
              f"{'speedup':>8} {'GB/s':>8} {'% copy':>7} {'max err':>9}  check")
    print(header)
    print("-" * len(header))
    failures = 0
    for i, (name, seqs) in enumerate(buckets):
        step, real, num_bytes = make_step(seqs, num_heads=H, num_kv_heads=K, head_dim=D,
                                          block_size=S, dtype=dtype, seed=i)
        scale = D ** -0.5

        def run_ref(q, kn, vn, kc, vc, layer, ts, pos, cl, bt):
            return jnp_attention(q, kn, vn, kc, vc, layer, ts, pos, cl, bt, scale)

        def run_pallas(q, kn, vn, kc, vc, layer, ts, pos, cl, bt):
            return pallas_attention(q, kn, vn, kc, vc, layer, ts, pos, cl, bt, scale,
                                    interpret=interpret)

        ref_fn, pallas_fn = jax.jit(run_ref), jax.jit(run_pallas)
        want = np.asarray(ref_fn(*step), np.float32)[real]
        got = np.asarray(pallas_fn(*step), np.float32)[real]
        err = float(np.abs(got - want).max())
        ok = bool(np.isfinite(got).all()) and err <= tol * max(1.0, float(np.abs(want).max()))
        failures += not ok
        t_ref, t_pallas = seconds(ref_fn, step, iters), seconds(pallas_fn, step, iters)
        bw = num_bytes / t_pallas
        print(f"{name:<26} {step[0].shape[0]:>5} {len(seqs):>4} {t_ref * 1e3:>9.3f} "
              f"{t_pallas * 1e3:>10.3f} {t_ref / t_pallas:>7.2f}x {bw / 1e9:>8.1f} "
              f"{100 * bw / copy_bw:>6.1f}% {err:>9.2e}  {'ok' if ok else 'FAIL'}")
    if failures:
        print(f"{failures} bucket(s) FAILED the check against the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
