"""Tiny random Llama-family models: pagedjax logits equal HF transformers' (fp32) at prefill
and decode, with two sequences sharing each paged step."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedjax import LLM
from pagedjax.batching import build_step_input
from pagedjax.models import build_model
from pagedjax.request import Request
from pagedjax.sampling_params import SamplingParams
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_llama

VARIANTS = {
    "gqa_untied": dict(num_kv_heads=2, tie=False),
    "mha_tied": dict(num_kv_heads=4, tie=True),
    "mqa_bias_llama3_rope": dict(
        num_kv_heads=1, tie=False, attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}
ATOL = 2e-4  # fp32; logits are O(1-10)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    model_dir = make_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model_dir, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_blocks=40, block_size=4)
    return SimpleNamespace(hf=hf, llm=llm)


def hf_logits(hf, token_ids):
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].numpy()


def test_logits_match_hf_at_prefill_and_decode(tiny):
    engine = tiny.llm.engine
    model = build_model(engine.model_config)
    apply = jax.jit(lambda p, s, kv: model.apply({"params": p}, s, kv))
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (7, 13)]
    requests = [Request(request_id=str(i), prompt_token_ids=p,
                        sampling_params=SamplingParams(temperature=0), seed=0)
                for i, p in enumerate(prompts)]

    def step(chunks):
        for chunk in chunks:
            assert engine.block_manager.ensure_capacity(
                chunk.request, chunk.start_position + chunk.num_new_tokens)
        _, step_input = build_step_input(chunks, engine.buckets, engine.config.block_size)
        logits, engine.runner.kv_cache = apply(engine.runner.params, jax.device_put(step_input),
                                               engine.runner.kv_cache)
        return np.asarray(logits)[:len(chunks)]

    # Prefill both prompts in one step, the second in two chunks (5 + 8 tokens).
    step([SimpleNamespace(request=requests[1], start_position=0, num_new_tokens=5)])
    got = step([SimpleNamespace(request=requests[0], start_position=0, num_new_tokens=7),
                SimpleNamespace(request=requests[1], start_position=5, num_new_tokens=8)])
    for row, prompt in zip(got, prompts):
        np.testing.assert_allclose(row, hf_logits(tiny.hf, prompt)[-1], atol=ATOL, rtol=1e-4)

    # Decode four tokens for both sequences at once, feeding HF's greedy choice.
    sequences = [list(p) for p in prompts]
    for _ in range(4):
        expected = [hf_logits(tiny.hf, seq)[-1] for seq in sequences]
        for seq, exp, request in zip(sequences, expected, requests):
            seq.append(int(np.argmax(exp)))
            request.output_token_ids.append(seq[-1])
        got = step([SimpleNamespace(request=r, start_position=len(s) - 1, num_new_tokens=1)
                    for r, s in zip(requests, sequences)])
        for row, seq in zip(got, sequences):
            np.testing.assert_allclose(row, hf_logits(tiny.hf, seq)[-1], atol=ATOL, rtol=1e-4)
    for request in requests:
        engine.block_manager.free(request)


def test_greedy_ids_match_hf_generate_over_32_tokens(tiny):
    rng = np.random.default_rng(1)
    vocab = tiny.llm.engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (3, 11, 24, 6)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = tiny.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
    assert tiny.llm.engine.stats.max_seqs_in_step > 1
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(tiny.hf, prompt, 32)
    tiny.llm.engine.block_manager.check_no_leak()
