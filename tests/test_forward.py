"""pagedjax.forward, the training forward: HF's logits for every family of the tiny zoo
(packed rows included), the engine's prompt logprobs, bfloat16 params, jax.grad + optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import AutoModelForCausalLM

import pagedjax
from pagedjax import SamplingParams
from pagedjax.loading import load_hf_checkpoint
from tests.helpers.hf_reference import hf_logits
from tests.helpers.tiny_zoo import VARIANTS, make_tiny_model

ATOL = 2e-4  # fp32 vs HF, as the zoo's engine tests; logits are O(1-10)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_hf_and_packed_segments_match_separate_runs(tmp_path, name):
    """Row 0: one 20-token sequence. Row 1: two sequences packed (12 + 8 tokens, the first
    longer than the 8-token sliding windows): each must give HF's logits of that sequence
    alone, so segments neither see each other nor lose their own positions."""
    arch, overrides = VARIANTS[name]
    model_dir = make_tiny_model(tmp_path, arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config, params, _ = load_hf_checkpoint(model_dir)
    rng = np.random.default_rng(0)
    whole, first, second = (rng.integers(3, config.vocab_size, size=n).tolist()
                            for n in (20, 12, 8))
    token_ids = np.array([whole, first + second])
    segment_ids = np.array([[0] * 20, [0] * 12 + [1] * 8])

    logits = np.asarray(pagedjax.forward(params, config, token_ids, segment_ids=segment_ids))

    assert logits.shape == (2, 20, config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0], hf_logits(hf, whole), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(logits[1, :12], hf_logits(hf, first), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(logits[1, 12:], hf_logits(hf, second), atol=ATOL, rtol=1e-4)


# Layer norms, GELU and learned positions; plus-one norms, soft-caps and windows; q/k norms.
@pytest.mark.parametrize("name", ["gpt2_mha_tied", "gemma2_softcap_window", "qwen3_qknorm_mha"])
def test_exact_logits_do_not_depend_on_what_shares_the_row(tmp_path, name):
    """exact=True (float64 attention, norms, RoPE and activations, each rounded once): a
    sequence's logits are the same bits alone or packed after another one (their float32
    sums would follow the row's shape), and HF's within the usual tolerance; gradients
    flow."""
    arch, overrides = VARIANTS[name]
    model_dir = make_tiny_model(tmp_path, arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config, params, _ = load_hf_checkpoint(model_dir)
    rng = np.random.default_rng(5)
    first, second = (rng.integers(3, config.vocab_size, size=n).tolist() for n in (7, 13))

    alone = np.asarray(pagedjax.forward(params, config, np.array([second]), exact=True))
    packed = np.asarray(pagedjax.forward(params, config, np.array([first + second]),
                                         segment_ids=np.array([[0] * 7 + [1] * 13]),
                                         exact=True))
    np.testing.assert_array_equal(packed[0, 7:], alone[0])
    np.testing.assert_allclose(alone[0], hf_logits(hf, second), atol=ATOL, rtol=1e-4)
    grads = jax.grad(lambda p: jnp.sum(pagedjax.forward(
        p, config, np.array([second]), exact=True)[0, -1] ** 2))(params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


def test_matches_engine_prompt_logprobs_with_the_engines_params(llm):
    """The engine's own params (its per-layer CPU form) and linen's {"params": ...}
    wrapping are accepted; log_softmax of the logits equals the engine's prompt
    logprobs."""
    config = llm.engine.model_config
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, size=30).tolist()
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    engine = np.array([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, 30)])
    params = llm.engine.runner.params
    assert isinstance(params["layers"]["wqkv"], tuple)  # one array per layer

    logits = pagedjax.forward({"params": params}, config, np.array([prompt]))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    np.testing.assert_allclose(logprobs[np.arange(29), prompt[1:]], engine, atol=1e-5)


def test_bfloat16_params_give_float32_logits(tiny_llama_dir):
    config, params, _ = load_hf_checkpoint(tiny_llama_dir)
    token_ids = np.random.default_rng(2).integers(3, config.vocab_size, size=(2, 16))
    full = pagedjax.forward(params, config, token_ids)
    half_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    half = pagedjax.forward(half_params, config, token_ids)
    assert half.dtype == jnp.float32
    # bf16 activations vs fp32, logits O(1-10): the zoo's bf16 tolerance.
    np.testing.assert_allclose(half, full, atol=0.1)
    assert not np.array_equal(half, full)  # it did compute in bfloat16
    assert pagedjax.forward(half_params, config, token_ids,
                            logits_dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_grad_and_optax_steps_lower_the_loss(tiny_llama_dir):
    """Next-token cross entropy on two packed rows: jax.grad gives finite, non-zero
    gradients for every leaf, and a few Adam steps lower the loss."""
    config, params, _ = load_hf_checkpoint(tiny_llama_dir)
    params = jax.tree.map(jnp.asarray, params)
    token_ids = np.random.default_rng(3).integers(3, config.vocab_size, size=(2, 16))
    segment_ids = np.array([[0] * 16, [0] * 10 + [1] * 6])
    targets_valid = segment_ids[:, 1:] == segment_ids[:, :-1]  # no target across segments

    def loss_fn(p):
        logits = pagedjax.forward(p, config, token_ids, segment_ids=segment_ids)
        logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logprobs, token_ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * targets_valid) / targets_valid.sum()

    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, grads

    state = optimizer.init(params)
    losses = []
    for _ in range(5):
        params, state, loss, grads = train_step(params, state)
        losses.append(float(loss))
        for leaf in jax.tree.leaves(grads):
            assert np.isfinite(leaf).all() and np.abs(leaf).max() > 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_inputs_name_the_field(tiny_llama_dir):
    config, params, _ = load_hf_checkpoint(tiny_llama_dir)
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="token_ids"):
        pagedjax.forward(params, config, ids[0])
    with pytest.raises(ValueError, match="token_ids must hold integers"):
        pagedjax.forward(params, config, ids.astype(np.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        pagedjax.forward(params, config, ids, segment_ids=np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="positions"):
        pagedjax.forward(params, config, ids, positions=np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="lm_head"):
        pagedjax.forward({k: v for k, v in params.items() if k != "lm_head"}, config, ids)
    with pytest.raises(ValueError, match="config"):
        pagedjax.forward(params, config.__dict__, ids)
    with pytest.raises(ValueError, match="exact"):
        pagedjax.forward(params, config, ids, exact="yes")
