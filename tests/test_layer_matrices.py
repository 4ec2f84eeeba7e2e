"""Per-layer weight matrices on CPU: params handed in as host arrays keep each layer's
matrices as their own device arrays (no per-step copy out of the stacked [L, out, in]
array), device arrays stay stacked and uncopied (the kernel reads a layer in place in
steps of up to MAX_STACKED_ROWS rows); both forms give the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax import LLM, SamplingParams
from pagedjax.kernels.small_matmul import MAX_STACKED_ROWS
from pagedjax.loading import load_model
from pagedjax.models import split_layer_matrices
from pagedjax.models.params import LAYER_MATRICES
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, make_llm, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in TINY_PROMPTS]


def test_split_layer_matrices_slices_each_layer():
    rng = np.random.default_rng(0)
    params = {"embed": rng.standard_normal((5, 4)),
              "layers": {"wqkv": rng.standard_normal((3, 6, 4)),
                         "attn_norm": rng.standard_normal((3, 4))}}
    split = split_layer_matrices(params, lambda x: x * 2)
    assert isinstance(split["layers"]["wqkv"], tuple) and len(split["layers"]["wqkv"]) == 3
    for i, matrix in enumerate(split["layers"]["wqkv"]):
        np.testing.assert_array_equal(matrix, params["layers"]["wqkv"][i] * 2)
    np.testing.assert_array_equal(split["layers"]["attn_norm"], params["layers"]["attn_norm"] * 2)
    np.testing.assert_array_equal(split["embed"], params["embed"] * 2)


def step_programs(llm) -> dict:
    """Each compiled step program's HLO text, by its token count."""
    runner = llm.engine.runner
    return {key.num_tokens: runner.program_text(key) for key in runner.compiled_keys}


def matrix_slices(llm, hlo: str) -> int:
    """Dynamic slices in a step program's HLO that produce a layer's wqkv matrix."""
    c = llm.engine.model_config
    out_dim, in_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size
    return sum(f"f32[{out_dim},{in_dim}]" in line and "dynamic-slice" in line
               for line in hlo.splitlines())


def test_host_params_run_per_layer_and_device_params_stay_stacked(tiny_llama_dir):
    config, params, tokenizer = load_model(tiny_llama_dir)
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(params["layers"]))
    host = LLM.from_params(params, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert host.engine.per_layer_matrices
    layers = host.engine.runner.params["layers"]
    for name in LAYER_MATRICES:
        if name in layers:
            assert isinstance(layers[name], tuple) and len(layers[name]) == config.num_layers
    assert not isinstance(layers["attn_norm"], tuple)

    device_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    device = LLM.from_params(device_params, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert not device.engine.per_layer_matrices
    assert (device.engine.runner.params["layers"]["wqkv"].unsafe_buffer_pointer()
            == device_params["layers"]["wqkv"].unsafe_buffer_pointer())

    want = token_ids(device.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert token_ids(host.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    # The stacked programs read each layer's matrix in place in the kernel where it takes
    # the products, and copy it out of the stack for XLA's dots beyond; the per-layer
    # ones hand the matrices to the matmuls as they are.
    stacked = step_programs(device)
    assert any(tokens <= MAX_STACKED_ROWS for tokens in stacked)
    for tokens, hlo in stacked.items():
        in_place = tokens <= MAX_STACKED_ROWS
        assert ("pagedjax_small_matmul_layer" in hlo) == in_place, tokens
        assert (matrix_slices(device, hlo) == 0) == in_place, tokens
    assert all(matrix_slices(host, hlo) == 0 for hlo in step_programs(host).values())


def test_new_weights_keep_the_engine_form(tiny_llama_dir):
    """set_params with stacked device arrays on a per-layer engine: split again, same tokens
    as a fresh engine on those weights, no recompile."""
    llm = make_llm(tiny_llama_dir)
    assert llm.engine.per_layer_matrices
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    compiles = llm.num_compiles
    config, params, tokenizer = load_model(tiny_llama_dir)
    scaled = jax.tree.map(lambda x: jnp.asarray(x * 1.5, jnp.float32), params)
    llm.update_params(scaled)
    assert isinstance(llm.engine.runner.params["layers"]["wqkv"], tuple)
    fresh = LLM.from_params(scaled, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert (token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
            == token_ids(fresh.generate(PROMPTS, GREEDY, use_tqdm=False)))
    assert llm.num_compiles == compiles
