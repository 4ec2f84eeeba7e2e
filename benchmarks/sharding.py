"""The collectives of one tensor-parallel decode step, read from its compiled HLO.

    python benchmarks/sharding.py                    # tp 2 and 4, 16 decode rows
    python benchmarks/sharding.py --tp 2 4 8 --seqs 64 --layers 4

Builds an engine on a random Llama of TinyLlama-1.1B's shape (hidden 2048, 32 query /
4 KV heads of 64, MLP 5632, vocabulary 32000; fewer layers, default 4: the layer scan's
body is the same program whatever its trip count) in bfloat16, compiles the decode step
of `--seqs` sequences at each tp, and counts every collective (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute) with its bytes, each one multiplied by
the trip count of the loops around it. The Megatron layout expects per step exactly
2 all-reduces of [T, E] per layer (after attention's output projection and after the
MLP), one all-reduce of [T, E] for the vocabulary-parallel embedding lookup, and one
all-gather of the [B, V] float32 logits; no all-gather of a weight or of the KV pool.
(XLA CPU sums bfloat16 all-reduces in float32, so their bytes double there.)
On CPU the devices are forced (XLA_FLAGS, set here when absent): this measures what the
program moves, not how fast.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pagedjax.buckets import BucketKey  # noqa: E402
from pagedjax.config import EngineConfig  # noqa: E402
from pagedjax.engine import Engine  # noqa: E402
from pagedjax.hlo_collectives import COLLECTIVES, collectives  # noqa: E402
from pagedjax.models import ModelConfig  # noqa: E402
from pagedjax.models.params import expected_shapes  # noqa: E402


def tinyllama_shape(num_layers: int) -> ModelConfig:
    """TinyLlama-1.1B's shape with `num_layers` layers."""
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=2048,
                       intermediate_size=5632, num_layers=num_layers, num_heads=32,
                       num_kv_heads=4, head_dim=64, max_position_embeddings=2048)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Host float32 params of `config` (small normal values; norms at one)."""
    rng = np.random.default_rng(seed)

    def leaf(name, shape):
        if name.endswith("norm"):
            return np.ones(shape, np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32))

    shapes = expected_shapes(config)
    layers = {k: leaf(k, s) for k, s in shapes["layers"].items()}
    return {**{k: leaf(k, s) for k, s in shapes.items() if k != "layers"}, "layers": layers}


def decode_step_hlo(config: ModelConfig, params: dict, tp: int, seqs: int) -> str:
    """The compiled HLO of a plain decode step of `seqs` sequences at `tp`."""
    engine = Engine(config, params, frozenset(), EngineConfig(
        dtype="bfloat16", max_model_len=1024, block_size=16, num_blocks=256,
        max_num_seqs=seqs, max_num_batched_tokens=max(seqs, 16), tensor_parallel_size=tp,
        attention_backend="reference"))
    key = BucketKey(num_tokens=max(seqs, 16), num_seqs=seqs)
    engine.runner.compile(key)
    return engine.runner.program_text(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    config = tinyllama_shape(args.layers)
    params = random_params(config)
    tokens = max(args.seqs, 16)
    E, V = config.hidden_size, config.vocab_size
    print(f"{jax.device_count()} {jax.default_backend()} devices; decode step of "
          f"{args.seqs} rows (T={tokens}), {args.layers} layers, E={E}, V={V}, bfloat16")
    for tp in args.tp:
        found = collectives(decode_step_hlo(config, params, tp, args.seqs))
        print(f"tp={tp}:")
        for kind in COLLECTIVES:
            sizes = found.get(kind, [])
            if sizes:
                print(f"  {kind:18s} {len(sizes):3d} per step, {sum(sizes) / 1e6:8.3f} MB "
                      f"(sizes {sorted(set(sizes))} B)")
        expected_reduces = 2 * args.layers + 1
        # XLA CPU sums bfloat16 in float32: 4 bytes per entry there, 2 on a GPU / TPU.
        reduce_ok = any(found.get("all-reduce", []) == [tokens * E * size] * expected_reduces
                        for size in (2, 4))
        gather_ok = found.get("all-gather", []) == [args.seqs * V * 4]
        others = [k for k in COLLECTIVES[2:] if found.get(k)]
        verdict = "as expected" if reduce_ok and gather_ok and not others else "NOT as expected"
        print(f"  expected: {expected_reduces} all-reduces of T x E ({tokens * E * 2} B in "
              f"bfloat16, {tokens * E * 4} B where XLA sums in float32 as on CPU: 2 per "
              f"layer + the embedding) and 1 all-gather of the B x V float32 logits "
              f"({args.seqs * V * 4} B), nothing else -> {verdict}")


if __name__ == "__main__":
    main()
