"""One engine over 2 processes x 2 forced CPU devices (tp=4 across processes, gloo
collectives), run by tests/test_multihost.py: process 0 generates and writes the tokens as
JSON; process 1 follows. Usage: python -m tests.helpers.multihost_check RANK PORT MODEL_DIR
OUT_JSON (JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count=2 set by the
caller)."""

from __future__ import annotations

import json
import sys

import pagedjax
from pagedjax import LLM, SamplingParams
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, one_step_shape

# Greedy, seeded sampling, and n=2 forks (a shared partly filled page copied on write: the
# copy is a device operation the follower must replay too).
MULTIHOST_SAMPLING = {
    "greedy": SamplingParams(max_tokens=8, temperature=0.0),
    "seeded": SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=7),
    "forked": SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=3)}


def completions(outputs) -> list:
    """Every completion's token ids, prompt by prompt."""
    return [[list(c.token_ids) for c in output.outputs] for output in outputs]


def main(rank: int, port: int, model_dir: str, out_path: str) -> None:
    pagedjax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    import jax

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    llm = one_step_shape(LLM(model_dir, tensor_parallel_size=4, **TINY_ENGINE_SETTINGS), 32, 4)
    if rank == 0:
        results = {name: completions(llm.generate(TINY_PROMPTS, params, use_tqdm=False))
                   for name, params in MULTIHOST_SAMPLING.items()}
        try:  # each process holds its own weights: a swap is refused, not half done
            llm.engine.set_params(None)
        except RuntimeError as error:
            assert "not supported across processes" in str(error), error
        else:
            raise AssertionError("a weight swap across processes was accepted")
        pagedjax.distributed.shutdown(llm)
        shards = llm.engine.runner.kv_cache.k.addressable_shards
        results["local_kv_shards"] = len(shards)
        with open(out_path, "w") as f:
            json.dump(results, f)
    else:
        try:
            llm.generate(TINY_PROMPTS, use_tqdm=False)
        except RuntimeError as error:
            assert "follows process 0" in str(error), error
        else:
            raise AssertionError("a follower took a request")
        print(f"process {rank} replayed {pagedjax.distributed.follow(llm)} operations")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
