"""The default model (SmolLM2-135M-Instruct GGUF) against HF transformers in float32:
greedy token ids identical over 32 new tokens, batched and one prompt at a time."""

import pytest
import torch

from pagedjax import LLM, SamplingParams
from pagedjax.loading import default_gguf_path
from tests.helpers.hf_reference import hf_greedy

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a paged KV cache is in one sentence.",
    "List three colors.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    import os

    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    tokenizer = llm.get_tokenizer()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
             for q in QUESTIONS]
    return ([tokenizer.encode(p) for p in PLAIN]
            + [tokenizer.encode(c, add_special_tokens=False) for c in chats])


def test_greedy_matches_hf_batched_and_one_at_a_time(llm, hf_model, prompt_ids):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]
    batched = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                           use_tqdm=False)
    assert llm.engine.stats.max_seqs_in_step == len(prompt_ids)
    assert [o.outputs[0].token_ids for o in batched] == expected
    for ids, want in zip(prompt_ids, expected):
        alone = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
        assert alone[0].outputs[0].token_ids == want
    llm.engine.block_manager.check_no_leak()


def test_chat_answers_the_capital_of_france(llm):
    outputs = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    completion = outputs[0].outputs[0]
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop"


def test_prefix_cache_hits_keep_hf_tokens(llm, hf_model):
    """Two prompts sharing a long system text: the second reads its first pages from the
    prefix cache and still gives HF's greedy ids."""
    tokenizer = llm.get_tokenizer()
    system = tokenizer.encode(" ".join(PLAIN + QUESTIONS) * 3)
    prompts = [system + tokenizer.encode(q, add_special_tokens=False) for q in QUESTIONS[:2]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
               for p in prompts]
    assert outputs[1].num_cached_tokens >= 128
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 16)


def test_training_forward_matches_hf_logits(llm, hf_model, prompt_ids):
    """pagedjax.forward on the engine's own params: HF's float32 logits for two prompts
    of different lengths in one batch (the shorter one padded in a segment of its own)."""
    import numpy as np

    import pagedjax
    from tests.helpers.hf_reference import hf_logits

    short, long = prompt_ids[3], prompt_ids[4]
    width = len(long)
    token_ids = np.array([short + [0] * (width - len(short)), long])
    segment_ids = np.array([[0] * len(short) + [1] * (width - len(short)), [0] * width])
    logits = np.asarray(pagedjax.forward(llm.engine.params, llm.engine.model_config,
                                         token_ids, segment_ids=segment_ids))
    # fp32 through 30 layers, logits up to ~40: measured up to 1.7e-4 apart.
    np.testing.assert_allclose(logits[0, :len(short)], hf_logits(hf_model, short), atol=2e-3)
    np.testing.assert_allclose(logits[1], hf_logits(hf_model, long), atol=2e-3)
