"""Weight sync in a training loop: `update_params` and `pagedjax.generate` with new weights
keep the caller's device buffers (no copy), keep the KV pool's buffers (no reallocation),
compile nothing, and never reuse prefix-cache pages computed with the old weights."""

import jax
import jax.numpy as jnp
import pytest

import pagedjax
from pagedjax import LLM, SamplingParams
from pagedjax.loading import load_model
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in TINY_PROMPTS]


def buffers(tree) -> list[int]:
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def weights(loaded):
    """Two training steps' worth of device params in the engine dtype (float32 on CPU)."""
    params = loaded[1]
    return [jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32), params)
            for scale in (1.0, 1.25)]


def test_update_params_swaps_buffers_without_copy_realloc_or_compile(loaded, weights):
    config, _, tokenizer = loaded
    first, second = weights
    llm = LLM.from_params(first, config, tokenizer, **TINY_ENGINE_SETTINGS)
    runner = llm.engine.runner
    assert buffers(runner.params) == buffers(first)
    before = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    compiles, pool = llm.num_compiles, buffers(runner.kv_cache)

    llm.update_params(second)
    assert buffers(runner.params) == buffers(second)  # the caller's arrays, not copies
    assert buffers(runner.kv_cache) == pool
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 0]  # old pages never reused
    assert buffers(runner.kv_cache) == pool  # the pool is donated and updated in place

    llm.update_params(first)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before
    assert llm.num_compiles == compiles


def test_generate_with_new_params_reuses_its_engine(loaded, weights, monkeypatch):
    config, _, tokenizer = loaded
    built = []
    from_params = LLM.from_params.__func__

    def record(cls, *args, **kwargs):
        built.append(from_params(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(LLM, "from_params", classmethod(record))
    cache = pagedjax.EngineCache()

    def generate(params) -> LLM:
        pagedjax.generate(params, PROMPTS, config=config, tokenizer=tokenizer,
                          sampling_params=GREEDY,
                          cache=cache, **TINY_ENGINE_SETTINGS)
        (llm,) = built  # one engine, built by the first call
        assert buffers(llm.engine.runner.params) == buffers(params)
        return llm

    llm = generate(weights[0])
    compiles, pool = llm.num_compiles, buffers(llm.engine.runner.kv_cache)
    for params in (weights[1], weights[0], weights[1]):
        generate(params)
    assert llm.num_compiles == compiles
    assert buffers(llm.engine.runner.kv_cache) == pool
