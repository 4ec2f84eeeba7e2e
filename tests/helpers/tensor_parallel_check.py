"""Tensor-parallel engine checks on 8 forced CPU devices, run by tests/test_tensor_parallel.py
in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts). Usage: python -m tests.helpers.tensor_parallel_check WORK_DIR. Exits non-zero
with the failed assertion; prints one line per check that passed."""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pagedjax import LLM, SamplingParams
from pagedjax.hlo_collectives import collectives
from pagedjax.loading import load_model
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, one_step_shape, token_ids
from tests.helpers.tiny_models import make_tiny_llama
from tests.helpers.tiny_zoo import VARIANTS, make_tiny_model

# 8 query heads over 4 KV heads (head dim 8); a vocabulary tp=8 divides, so the embedding
# and the LM head are split too.
GQA = dict(num_attention_heads=8, num_kv_heads=4, vocab_size=512)
# Every variant of the model zoo: biases, tied heads, q/k norms, soft-caps and windows,
# fused projections, MQA (its one KV head copied), learned positions, OPT's projections.
ZOO_FAMILIES = tuple(VARIANTS)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SEEDED = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=7)


def engine(model, tp=1, **kwargs) -> LLM:
    """A tiny engine with one step shape (one program), on `tp` devices."""
    if isinstance(model, str):
        llm = LLM(model, tensor_parallel_size=tp, **TINY_ENGINE_SETTINGS, **kwargs)
    else:
        config, params, tokenizer = model
        llm = LLM.from_params(params, config, tokenizer, tensor_parallel_size=tp,
                              **TINY_ENGINE_SETTINGS, **kwargs)
    return one_step_shape(llm, 32, 4)


def run(llm: LLM, params: SamplingParams) -> list:
    return token_ids(llm.generate(TINY_PROMPTS, params, use_tqdm=False))


def per_device_shapes(array: jax.Array) -> set:
    return {shard.data.shape for shard in array.addressable_shards}


def check_same_tokens_and_sharded_state(model_dir: str):
    reference = engine(model_dir)
    greedy, seeded = run(reference, GREEDY), run(reference, SEEDED)
    for tp in (2, 4, 8):
        llm = engine(model_dir, tp)
        assert run(llm, GREEDY) == greedy, f"greedy tokens differ at tp={tp}"
        k_pool = llm.engine.runner.kv_cache.k  # [L, P, K, D, S]
        layers, pages, heads, dim, size = reference.engine.runner.kv_cache.k.shape
        kv_per_device = max(heads // tp, 1)  # tp=8 > 4 KV heads: one copied head each
        assert per_device_shapes(k_pool) == {(layers, pages, kv_per_device, dim, size)}, (
            tp, per_device_shapes(k_pool))
        assert len(k_pool.addressable_shards) == tp
        wo = llm.engine.runner.params["layers"]["wo"]  # [L, E, H * D], split by heads
        assert per_device_shapes(wo) == {(wo.shape[0], wo.shape[1], wo.shape[2] // tp)}
        embed = llm.engine.runner.params["embed"]  # [V, E], split by vocabulary
        assert per_device_shapes(embed) == {(embed.shape[0] // tp, embed.shape[1])}
        if tp == 2:
            assert run(llm, SEEDED) == seeded, "seeded sampling differs at tp=2"
            check_step_collectives(llm)
        print(f"tp={tp}: same greedy tokens, 1/{tp} of the KV pool and weights per device "
              f"({llm.engine.attention_backend} attention)")
    return reference


def check_step_collectives(llm: LLM):
    """The step program moves what the Megatron layout says and nothing else: per layer one
    all-reduce of [T, E] after attention and one after the MLP, one for the embedding
    lookup, one all-gather of the [B, V] logits (no weight, no KV pool gathered)."""
    runner, config = llm.engine.runner, llm.engine.model_config
    key = runner.compiled_keys[0]
    found = collectives(runner.program_text(key))
    assert found.pop("all-reduce") == [key.num_tokens * config.hidden_size * 4] * (
        2 * config.num_layers + 1), "all-reduces"
    assert found.pop("all-gather") == [key.num_seqs * config.vocab_size * 4], "all-gathers"
    assert not found, f"unexpected collectives {found}"
    print(f"tp=2 step: {2 * config.num_layers + 1} all-reduces of T x E and one all-gather "
          f"of the logits, nothing else")


def trainer_layout(params: dict, mesh: Mesh) -> dict:
    """params as a trainer on a (fsdp, tp) mesh might hold them: matrices split over both
    axes where they divide, everything else replicated; `wo` in the engine's own layout."""
    def place(name, x):
        if name == "wo":
            spec = P(None, None, ("fsdp", "tp"))  # = the engine's split over these devices
        elif x.ndim >= 2 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
            spec = P(*([None] * (x.ndim - 2)), "fsdp", "tp")
        else:
            spec = P()
        return jax.device_put(np.asarray(x), NamedSharding(mesh, spec))

    layers = {k: place(k, v) for k, v in params["layers"].items()}
    return {**{k: place(k, v) for k, v in params.items() if k != "layers"}, "layers": layers}


def check_trainer_sharded_params(model_dir: str, other_dir: str, reference: LLM):
    config, params, tokenizer = load_model(model_dir)
    _, other_params, _ = load_model(other_dir)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    trained = trainer_layout(params, mesh)
    llm = engine((config, trained, tokenizer), tp=4)
    assert run(llm, GREEDY) == run(reference, GREEDY), "trainer-sharded params differ"
    held = llm.engine.runner.params["layers"]
    assert held["wo"] is trained["layers"]["wo"], "params in the engine's layout were copied"
    assert held["wqkv"].sharding.is_equivalent_to(
        NamedSharding(llm.engine.mesh, P(None, "tp", None)), 3)

    reference.update_params(other_params)
    expected = run(reference, GREEDY)
    compiles = llm.num_compiles
    updated = trainer_layout(other_params, mesh)
    llm.update_params(updated)
    assert run(llm, GREEDY) == expected, "update_params on trainer-sharded params differs"
    assert llm.num_compiles == compiles, "update_params recompiled"
    assert llm.engine.runner.params["layers"]["wo"] is updated["layers"]["wo"]
    print("trainer-sharded params on a 2x2 (fsdp, tp) mesh: same tokens, update_params "
          "without a recompile, engine-layout leaves kept in place")


def check_backends_per_shard(model_dir: str, reference: LLM):
    """Every attention backend runs under shard_map on each device's own heads."""
    greedy = run(reference, GREEDY)
    for backend in ("reference", "pallas"):  # pallas: interpreted on CPU
        llm = engine(model_dir, 2, attention_backend=backend)
        assert llm.engine.attention_backend == backend
        assert run(llm, GREEDY) == greedy, backend
    print("tp=2 with the reference and pallas backends per shard: tp=1's greedy tokens")


def check_zoo_families(work_dir: str):
    for name in ZOO_FAMILIES:
        architecture, overrides = VARIANTS[name]
        model_dir = make_tiny_model(f"{work_dir}/{name}", architecture, **overrides)
        assert run(engine(model_dir, 2), GREEDY) == run(engine(model_dir), GREEDY), name
    print(f"tp=2 gives tp=1's greedy tokens on every zoo family: {', '.join(ZOO_FAMILIES)}")


def check_validation(model_dir: str):
    for kwargs, field in ((dict(tensor_parallel_size=3), "tensor_parallel_size"),
                          (dict(tensor_parallel_size=16), "tensor_parallel_size"),
                          (dict(mesh=Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                                          ("x", "tp"))), "mesh"),
                          (dict(data_parallel_size=4, tensor_parallel_size=4),
                           "data_parallel_size"),
                          (dict(data_parallel_size=4, mesh=Mesh(
                              np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "tp"))),
                           "data_parallel_size")):
        try:
            LLM(model_dir, **TINY_ENGINE_SETTINGS, **kwargs)
        except ValueError as error:
            assert field in str(error), error
        else:
            raise AssertionError(f"{kwargs} was accepted")
    print("bad meshes rejected: heads not divisible, too many devices, an unknown axis > 1, "
          "dp x tp over the devices, dp unlike the mesh's")


def check_data_parallel(model_dir: str, reference: LLM):
    """dp=2 x tp=2 from the sizes, then from a user's (dp, tp) mesh on the other 4 devices:
    tp=1's tokens, each replica on its own devices with its own pool."""
    greedy, seeded = run(reference, GREEDY), run(reference, SEEDED)
    by_sizes = engine(model_dir, 2, data_parallel_size=2)
    mesh = Mesh(np.array(jax.devices()[4:]).reshape(2, 2), ("dp", "tp"))
    by_mesh = engine(model_dir, mesh=mesh)
    for llm, devices in ((by_sizes, jax.devices()[:4]), (by_mesh, jax.devices()[4:])):
        replicas = llm.engine.replicas
        assert len(replicas) == 2
        assert run(llm, GREEDY) == greedy, "data-parallel greedy tokens differ"
        assert run(llm, SEEDED) == seeded, "data-parallel seeded tokens differ"
        pools = [replica.runner.kv_cache.k for replica in replicas]
        assert [set(pool.devices()) for pool in pools] == [set(devices[:2]),
                                                          set(devices[2:])]
        # the router gave each replica one of the two prompts of each generate call
        assert all(replica.stats.num_generated_tokens == 2 * 8 for replica in replicas)
        stats = llm.kv_cache_stats()
        assert stats.num_blocks == 2 * reference.kv_cache_stats().num_blocks
    print("dp=2 x tp=2 (sizes, and a (dp, tp) mesh): same greedy and seeded tokens, a KV "
          "pool and requests per replica")


def check_default_model_tp3():
    """SmolLM2-135M: 9 query / 3 KV heads and a vocabulary of 49,152 split over 3 devices."""
    settings = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                    block_size=16, num_blocks=32, min_token_bucket=32)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    tokens = [token_ids(one_step_shape(LLM(None, tensor_parallel_size=tp, **settings), 32, 2)
                        .generate(prompts, GREEDY, use_tqdm=False)) for tp in (1, 3)]
    assert tokens[0] == tokens[1], tokens
    print("tp=3 gives tp=1's greedy tokens on the default model (9 / 3 heads)")


def main(work_dir: str) -> None:
    assert len(jax.devices()) == 8, "run with --xla_force_host_platform_device_count=8"
    model_dir = make_tiny_llama(f"{work_dir}/gqa", **GQA)
    other_dir = make_tiny_llama(f"{work_dir}/gqa_other", seed=1, **GQA)
    check_validation(model_dir)
    reference = check_same_tokens_and_sharded_state(model_dir)
    check_data_parallel(model_dir, reference)
    check_backends_per_shard(model_dir, reference)
    check_trainer_sharded_params(model_dir, other_dir, reference)
    check_zoo_families(work_dir)
    check_default_model_tp3()


if __name__ == "__main__":
    main(sys.argv[1])
