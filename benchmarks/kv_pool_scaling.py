"""Decode step time against KV pool size: it must not grow with the pool (the pool is
donated and updated in place, never copied per step or per layer).

    python benchmarks/kv_pool_scaling.py [--small 75] [--large 1000]

Uses a random model with SmolLM2-135M's shapes (30 layers) so no weights are needed, and
prints the ratio large/small of the mean decode step time (about 1.0 means no growth).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from pagedjax.config import EngineConfig
from pagedjax.engine import Engine
from pagedjax.models import ModelConfig, expected_shapes
from pagedjax.sampling_params import SamplingParams

SMOLLM2_SHAPES = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    rope_theta=1e5, max_position_embeddings=2048, tie_word_embeddings=True)


def decode_step_seconds(params, num_blocks: int, num_seqs: int = 16) -> tuple[float, int]:
    """Mean seconds of a compiled decode step with `num_blocks` pages, and the pool bytes."""
    engine = Engine(SMOLLM2_SHAPES, params, frozenset(),
                    EngineConfig(max_model_len=1024, max_num_seqs=num_seqs,
                                 num_blocks=num_blocks))
    params_greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for _ in range(num_seqs):
        engine.add_request(engine.make_request(list(range(5, 50)), params_greedy))
    for _ in range(3):  # prefill and the first decodes compile their buckets
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps, engine.kv_cache_stats().bytes


def main() -> None:
    """Print decode step time for a small and a large pool, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    # 64-token pages: 75 and 1000 pages are 0.21 and 2.75 GiB pools for SmolLM2.
    parser.add_argument("--small", type=int, default=75)
    parser.add_argument("--large", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: rng.standard_normal(shape, dtype=np.float32) * 0.02,
                          expected_shapes(SMOLLM2_SHAPES), is_leaf=lambda x: isinstance(x, tuple))
    results = {n: decode_step_seconds(params, n) for n in (args.small, args.large)}
    for n, (seconds, size) in results.items():
        print(f"{n:6d} blocks ({size / 2**30:.2f} GiB): {seconds * 1e3:.1f} ms per decode step")
    ratio = results[args.large][0] / results[args.small][0]
    print(f"step time ratio large/small pool: {ratio:.2f} "
          f"({'no growth' if ratio < 1.3 else 'GROWS with the pool'})")


if __name__ == "__main__":
    main()
