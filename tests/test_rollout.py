"""pagedjax.rollout: sampled completions as padded arrays, their logprobs against
pagedjax.forward (tiny Llama and, for the consistency guarantee, the default model), and
the processed logprobs mode through an engine built from a params pytree."""

import jax
import numpy as np
import pytest

import pagedjax
from pagedjax import EngineCache, SamplingParams
from pagedjax.loading import load_hf_checkpoint
from tests.helpers.engines import make_llm

# Prompt 1 (25 tokens) is prefilled in chunks: the engine takes 16 tokens per step.
PROMPTS = [[5, 17, 42, 99, 7, 3, 250],
           np.random.default_rng(0).integers(3, 290, size=25).tolist()]
PER_PROMPT = [SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10),
              SamplingParams(n=3, temperature=0.8, top_k=20, seed=8, max_tokens=6)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tiny_params(tiny_llama_dir):
    config, params, tokenizer = load_hf_checkpoint(tiny_llama_dir)
    return config, jax.device_put(params), tokenizer


def test_rollout_arrays_hold_what_generate_samples(llm):
    rollout = pagedjax.rollout(llm, PROMPTS, PER_PROMPT)
    reference = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                             [SamplingParams(**{**vars(p), "logprobs": 0}) for p in PER_PROMPT],
                             use_tqdm=False)
    rows = [c for output in reference for c in sorted(output.outputs, key=lambda c: c.index)]

    assert rollout.completion_ids.shape == (6, 10) and rollout.completion_ids.dtype == np.int32
    assert rollout.completion_logprobs.dtype == np.float32
    np.testing.assert_array_equal(rollout.prompt_index, [0, 0, 0, 1, 1, 1])
    assert rollout.prompt_ids == PROMPTS and rollout.logprobs_mode == "raw_logprobs"
    for row, completion in enumerate(rows):
        length = len(completion.token_ids)
        assert rollout.lengths[row] == length
        assert rollout.completion_mask[row].tolist() == [True] * length + [False] * (10 - length)
        assert rollout.completion_ids[row, :length].tolist() == completion.token_ids
        assert (rollout.completion_ids[row, length:] == 0).all()
        # Within rounding: the second run reads its prompts' pages from the prefix cache.
        np.testing.assert_allclose(
            rollout.completion_logprobs[row, :length],
            [e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)],
            rtol=1e-6)
        assert (rollout.completion_logprobs[row, length:] == 0).all()
        assert rollout.finish_reason[row] == completion.finish_reason
        assert rollout.texts[row] == completion.text
    assert len({tuple(ids) for ids in rollout.completion_ids[:3].tolist()}) == 3  # n differ


def test_rollout_logprobs_equal_forward_logprobs(llm, tiny_params):
    """The trainer's view of the same tokens (forward on Rollout.forward_inputs): prompts
    left-padded, completions in the last G columns, padding in its own segment."""
    config, params, _ = tiny_params
    rollout = pagedjax.rollout(llm, PROMPTS, PER_PROMPT)
    inputs = rollout.forward_inputs()
    assert inputs["token_ids"].shape == (6, 25 + 10)
    assert inputs["segment_ids"][0].tolist() == [0] * 18 + [1] * 17  # 7 prompt + 10 new
    logprobs = pagedjax.completion_logprobs(pagedjax.forward(params, config, **inputs),
                                            rollout.completion_ids)
    diff = np.abs(np.asarray(logprobs) - rollout.completion_logprobs)
    assert diff[rollout.completion_mask].max() < 1e-5


def test_processed_logprobs_from_a_params_pytree_engine(llm, tiny_params):
    """An engine built for a params pytree with logprobs_mode="processed_logprobs" samples
    the same tokens as the raw engine and reports log_softmax of the temperature-scaled,
    top-k-masked logits (computed here from pagedjax.forward)."""
    config, params, tokenizer = tiny_params
    prompts = PROMPTS[:1]
    sampling = SamplingParams(n=2, temperature=0.7, top_k=5, seed=3, max_tokens=6,
                              ignore_eos=True)
    raw = pagedjax.rollout(llm, prompts, sampling)
    processed = pagedjax.rollout(params, prompts, sampling, config=config, tokenizer=tokenizer,
                                 cache=EngineCache(), logprobs_mode="processed_logprobs",
                                 max_model_len=128, num_blocks=64, block_size=4)
    assert processed.logprobs_mode == "processed_logprobs"
    np.testing.assert_array_equal(processed.completion_ids, raw.completion_ids)

    inputs = raw.forward_inputs()
    logits = np.asarray(pagedjax.forward(params, config, **inputs), np.float64)
    before = logits[:, -raw.completion_ids.shape[1] - 1:-1] / 0.7  # [N, G, V]
    fifth = np.sort(before, axis=-1)[..., -5:-4]
    masked = np.where(before >= fifth, before, -np.inf)
    top = masked.max(axis=-1, keepdims=True)
    logsumexp = top[..., 0] + np.log(np.exp(masked - top).sum(axis=-1))
    chosen = np.take_along_axis(masked, raw.completion_ids[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(processed.completion_logprobs, chosen - logsumexp, atol=1e-5)
    assert np.abs(processed.completion_logprobs - raw.completion_logprobs).min() > 1e-3


def test_bad_inputs_name_the_field(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        pagedjax.rollout(llm, [], SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        pagedjax.rollout(llm, [1, 2, 3], SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        pagedjax.rollout(llm, [[1.5, 2.0]], SamplingParams())
    with pytest.raises(ValueError, match="sampling_params"):
        pagedjax.rollout(llm, PROMPTS, PER_PROMPT[:1])


def test_default_model_exact_rollout_equals_forward_to_the_bit():
    """The consistency guarantee on the default model in float32: with the exact numerics
    on both sides, n=8 rows of one prompt (forked prompt pages), a prompt longer than a
    step's 32 tokens (chunked prefill), and a second prompt's row decoding its last
    tokens alone (one-sequence steps), the same bits."""
    from pagedjax.loading import load_model
    from pagedjax.models import SUPPORTED_ARCHITECTURES

    config, params, tokenizer = load_model(None, supported_architectures=SUPPORTED_ARCHITECTURES)
    text = ("The history of the printing press begins in the fifteenth century, when "
            "movable type changed how books were made and who could read them. ")
    prompt = tokenizer.encode(text * 2)
    assert len(prompt) > 32
    rollout = pagedjax.rollout(
        params, [prompt, prompt[:9]],
        [SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True),
         SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)],
        config=config, tokenizer=tokenizer, cache=EngineCache(), dtype="float32",
        attention_backend="exact", max_model_len=128, max_num_batched_tokens=32,
        max_num_seqs=8)
    assert rollout.completion_ids.shape == (9, 16)
    logprobs = pagedjax.completion_logprobs(
        pagedjax.forward(params, config, **rollout.forward_inputs(), exact=True),
        rollout.completion_ids, exact=True)
    np.testing.assert_array_equal(np.asarray(logprobs)[rollout.completion_mask],
                                  rollout.completion_logprobs[rollout.completion_mask])
