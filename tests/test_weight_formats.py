"""Weights from orbax checkpoints and Flax training code (linen dicts, NNX state), and the
host memory a streaming GGUF load needs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagedjax
from pagedjax import LLM, SamplingParams
from pagedjax.loading import load_model
from tests.helpers.engines import TINY_ENGINE_SETTINGS, make_llm, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["the cat and the hat", "on a mat", "in the"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return token_ids(make_llm(tiny_llama_dir).generate(PROMPTS, GREEDY, use_tqdm=False))


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def _assert_same_arrays(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
        assert np.dtype(x.dtype) == np.dtype(y.dtype), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ---- orbax -----------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path, loaded, reference):
    config, params, tokenizer = loaded
    path = pagedjax.save_params(tmp_path / "ckpt", params, config, tokenizer=tokenizer)
    saved = json.loads((tmp_path / "ckpt" / "pagedjax_config.json").read_text())
    assert saved["format"] == "pagedjax-orbax"
    assert saved["config"]["rope_scaling"]["rope_type"] == config.rope_scaling.rope_type

    loaded_config, loaded_params = pagedjax.load_params(path)
    assert loaded_config == config
    _assert_same_arrays(loaded_params, params)

    llm = make_llm(path)  # resolve_model recognizes the directory; tokenizer saved with it
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert llm.tokenizer.encode("the cat <|im_end|>") == tokenizer.encode("the cat <|im_end|>")
    chat = [{"role": "user", "content": "hi"}]
    assert llm.tokenizer.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert llm.tokenizer.eos_token_ids == tokenizer.eos_token_ids


def test_orbax_bfloat16_and_no_tokenizer(tmp_path, loaded):
    config, params, tokenizer = loaded
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    path = pagedjax.save_params(tmp_path / "ckpt", {"params": bf16}, config)
    _, restored = pagedjax.load_params(path)
    _assert_same_arrays(restored, bf16)
    _, as_f32 = pagedjax.load_params(path, dtype="float32")
    assert as_f32["embed"].dtype == jnp.float32
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(path, **TINY_ENGINE_SETTINGS)
    llm = LLM(path, tokenizer=tokenizer, dtype="bfloat16", **TINY_ENGINE_SETTINGS)
    assert len(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12
    with pytest.raises(ValueError, match="not empty"):
        pagedjax.save_params(path, bf16, config)
    pagedjax.save_params(path, bf16, config, overwrite=True)


def test_user_orbax_checkpoint_with_config(tmp_path, loaded, reference):
    import orbax.checkpoint as ocp

    config, params, tokenizer = loaded
    # What a training loop might write: linen variables plus other state.
    state = {"params": jax.tree.map(jnp.asarray, params), "step": 7,
             "opt_state": {"mu": np.zeros(3, np.float32)}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "user", state)
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match="pass config="):
        pagedjax.load_params(tmp_path / "user")
    got_config, restored = pagedjax.load_params(tmp_path / "user", config=config)
    assert got_config is config
    _assert_same_arrays(restored, params)
    llm = LLM.from_params(restored, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    wrong = config.replace(hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match="shape"):
        pagedjax.load_params(tmp_path / "user", config=wrong)


# ---- Flax training code ------------------------------------------------------------------


def test_linen_variables_and_frozen_dict(loaded, reference):
    from flax.core import freeze

    config, params, tokenizer = loaded
    llm = LLM.from_params({"params": params}, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    llm.update_params(freeze({"params": params}))
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    texts = pagedjax.generate({"params": params}, PROMPTS, config=config, tokenizer=tokenizer,
                              max_tokens=4, cache=pagedjax.EngineCache(), **TINY_ENGINE_SETTINGS)
    assert len(texts) == len(PROMPTS)


def test_nnx_state_gives_the_same_outputs(loaded, reference):
    from flax import nnx

    config, params, tokenizer = loaded

    class Holder(nnx.Module):  # a stand-in for a training model holding our weights
        def __init__(self, tree):
            self.w = nnx.data({k: (nnx.Param(jnp.asarray(v)) if not isinstance(v, dict) else
                                   {kk: nnx.Param(jnp.asarray(vv)) for kk, vv in v.items()})
                               for k, v in tree.items()})

    state = nnx.State(jax.tree.map(lambda x: nnx.Param(jnp.asarray(x)), params))
    plain = pagedjax.params_from_flax(state)
    _assert_same_arrays(plain, params)
    graphdef, split_state = nnx.split(Holder(params))
    assert set(pagedjax.params_from_flax((graphdef, split_state))) == {"w"}
    llm = LLM.from_params(state, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    texts = pagedjax.generate(state, PROMPTS, config=config, tokenizer=tokenizer,
                              max_tokens=4, cache=pagedjax.EngineCache(), **TINY_ENGINE_SETTINGS)
    assert len(texts) == len(PROMPTS)
    with pytest.raises(ValueError, match="params must be"):
        pagedjax.params_from_flax([1, 2])


def test_device_params_of_engine_dtype_are_not_copied(loaded):
    config, params, tokenizer = loaded
    device_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    llm = LLM.from_params(device_params, config, tokenizer, dtype="float32",
                          **TINY_ENGINE_SETTINGS)
    used = llm.engine.runner.params
    for (path, mine), (_, theirs) in zip(_leaves(device_params), _leaves(used)):
        assert mine.unsafe_buffer_pointer() == theirs.unsafe_buffer_pointer(), path
    llm.update_params({"params": device_params})
    assert (llm.engine.runner.params["embed"].unsafe_buffer_pointer()
            == device_params["embed"].unsafe_buffer_pointer())


# ---- streaming load memory ---------------------------------------------------------------


def test_gguf_load_peak_memory_is_params_plus_little():
    from pagedjax.loading import default_gguf_path

    default_gguf_path()  # `make test` installs the default model: fail clearly if absent
    script = os.path.join(ROOT, "benchmarks", "load_memory.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights_mib"] > 400  # SmolLM2-135M in float32
    assert result["ratio"] < 1.5, result
