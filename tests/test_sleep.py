"""LLM.sleep / wake_up: device memory really goes back (jax.live_arrays), nothing
recompiles, outputs after waking equal those before, and an engine that sleeps or has no
weights refuses requests saying why."""

import jax
import numpy as np
import pytest

from pagedjax import SamplingParams
from pagedjax.engine import EngineNotReady
from tests.helpers.engines import TINY_PROMPTS, make_llm, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in TINY_PROMPTS]


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    """Loaded from a directory: the engine's weights are its own device copies."""
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy tokens before any sleep; the prompts' full pages are now in the prefix cache."""
    want = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert llm.engine.kv_cache_stats().cached_blocks > 0
    return want


def test_level_1_frees_the_kv_pool_and_wakes_without_recompiling(llm, reference):
    compiles = llm.num_compiles
    pool = nbytes(llm.engine.runner.kv_cache)
    assert pool == llm.kv_cache_stats().bytes
    before = live_bytes()
    llm.sleep(level=1)
    assert llm.is_sleeping
    assert before - live_bytes() == pool
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.is_sleeping and live_bytes() == before
    # The cached pages went with the old pool: found again, they would read zeros.
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 0]
    assert token_ids(outputs) == reference
    assert llm.num_compiles == compiles


def test_level_2_drops_the_weights_until_update_params(llm, reference):
    compiles = llm.num_compiles
    runner = llm.engine.runner
    weights, pool = nbytes(runner.params), nbytes(runner.kv_cache)
    host_params = jax.tree.map(np.array, runner.params)  # copies: views would pin buffers
    host_params["layers"] = {k: np.stack(v) if isinstance(v, tuple) else v
                             for k, v in host_params["layers"].items()}  # the stacked form
    before = live_bytes()
    llm.sleep(level=2)
    assert before - live_bytes() == weights + pool
    llm.wake_up()
    with pytest.raises(EngineNotReady, match="update_params"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.update_params(host_params)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert llm.num_compiles == compiles


def test_sleep_needs_an_idle_engine_and_a_known_level(llm, reference):
    engine = llm.engine
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)
    requests = [engine.make_request(p, GREEDY) for p in TINY_PROMPTS]
    for request in requests:  # as `reference` did: a step shape compiled already
        engine.add_request(request)
    engine.step()
    with pytest.raises(RuntimeError, match="in flight"):
        llm.sleep()
    assert not llm.is_sleeping
    for request in requests:
        engine.abort_request(request.request_id)
    llm.sleep()
    llm.sleep(level=2)  # deeper while asleep: the weights go too
    assert not engine.has_weights
    llm.wake_up()
    llm.wake_up()  # twice is harmless
    engine.block_manager.check_no_leak()
