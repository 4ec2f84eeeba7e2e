"""Engine equivalences, compile bounds, bad input and KV waste on a tiny random Llama."""

import numpy as np
import pytest

import pagedjax
from pagedjax import LLM, SamplingParams
from pagedjax.loading import load_model
from tests.helpers.engines import make_llm, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def random_prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, vocab, size=n).tolist()} for n in lengths]


@pytest.fixture(scope="module")
def prompts(llm):
    return random_prompts(llm.engine.model_config.vocab_size, (5, 31, 2, 17, 60, 9, 44, 1))


@pytest.fixture(scope="module")
def reference(llm, prompts):
    """Every prompt generated on its own: the answer each equivalence must reproduce."""
    return [token_ids(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]


def test_batched_equals_one_at_a_time(llm, prompts, reference):
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference
    assert llm.engine.stats.max_seqs_in_step == 8
    llm.engine.block_manager.check_no_leak()


def test_chunked_prefill_equals_whole_prefill(tiny_llama_dir, prompts, reference):
    small_budget = make_llm(tiny_llama_dir, max_num_batched_tokens=8)
    assert token_ids(small_budget.generate(prompts, GREEDY, use_tqdm=False)) == reference
    small_budget.engine.block_manager.check_no_leak()


def test_tiny_pool_forces_preemption_and_matches(tiny_llama_dir, prompts, reference):
    # 33 usable 4-token blocks can't hold 8 sequences of up to 76 tokens at once.
    tiny_pool = make_llm(tiny_llama_dir, num_blocks=34)
    outputs = tiny_pool.generate(prompts, GREEDY, use_tqdm=False)
    assert tiny_pool.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert token_ids(outputs) == reference
    tiny_pool.engine.block_manager.check_no_leak()


def test_seeded_request_is_independent_of_its_batch(llm, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = token_ids(llm.generate(prompts[3], seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True)] * 7
    batch = llm.generate(prompts[:3] + [prompts[3]] + prompts[4:], others[:3] + [seeded]
                         + others[3:], use_tqdm=False)
    assert token_ids(batch)[3] == alone
    again = token_ids(llm.generate(prompts[3], seeded, use_tqdm=False))[0]
    assert again == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=12,
                                ignore_eos=True)
    assert token_ids(llm.generate(prompts[3], other_seed, use_tqdm=False))[0] != alone


def test_outputs_keep_input_order_and_fields(llm):
    prompts = ["hello there", "the cat sat on the mat and then the cat went away", "a"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                           use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for prompt, output in zip(prompts, outputs):
        assert output.prompt == prompt
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert completion.index == 0 and len(completion.token_ids) == 5
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert completion.finish_reason == "length"
        assert output.finished
        assert output.metrics.first_token_time >= output.metrics.arrival_time


def test_eos_stops_with_reason_stop(llm, prompts):
    # Make EOS the only possible token: the first sampled token must stop the request.
    eos = next(iter(llm.get_tokenizer().eos_token_ids))
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=10)
    forced = llm.generate(prompts[0], params, use_tqdm=False)[0].outputs[0]
    assert forced.finish_reason in ("stop", "length")
    if eos in forced.token_ids:
        assert forced.token_ids[-1] == eos and forced.finish_reason == "stop"
    stop_at_first = SamplingParams(temperature=0, max_tokens=10,
                                   stop_token_ids=[forced.token_ids[0]])
    stopped = llm.generate(prompts[0], stop_at_first, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == forced.token_ids[:1] or stopped.finish_reason == "stop"


def test_compiles_bounded_by_buckets_and_zero_after_warmup(tiny_llama_dir):
    settings = dict(max_model_len=48, max_num_seqs=4, max_num_batched_tokens=32,
                    block_size=8, num_blocks=40)
    llm = make_llm(tiny_llama_dir, **settings)
    rng = np.random.default_rng(7)
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(vocab, rng.integers(1, 40, size=100), seed=8)
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7])), seed=int(i),
                             max_tokens=int(rng.integers(1, 9)), ignore_eos=True)
              for i in range(100)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(outputs, params))
    bucket_set = set(llm.engine.buckets.all_keys())
    assert set(llm.engine.runner.compiled_keys) <= bucket_set
    assert llm.num_compiles <= len(bucket_set)

    warm = make_llm(tiny_llama_dir, **settings)
    warm.warmup()
    assert warm.num_compiles == len(bucket_set)
    warm_outputs = warm.generate(prompts, params, use_tqdm=False)
    assert warm.num_compiles == len(bucket_set)  # nothing compiled while serving
    assert token_ids(warm_outputs) == token_ids(outputs)


def test_new_params_of_same_shapes_do_not_recompile(tiny_llama_dir):
    config, params, tokenizer = load_model(tiny_llama_dir)
    cache = pagedjax.EngineCache()
    kwargs = dict(config=config, tokenizer=tokenizer, max_tokens=8, cache=cache,
                  max_model_len=64, max_num_seqs=2, num_blocks=40, block_size=4)
    first = pagedjax.generate(params, ["the cat", "on a mat"], **kwargs)
    llm = next(iter(cache._entries.values()))
    compiles = llm.num_compiles
    perturbed = dict(params, lm_head=params["lm_head"][::-1].copy())
    second = pagedjax.generate(perturbed, ["the cat", "on a mat"], **kwargs)
    assert llm.num_compiles == compiles
    assert next(iter(cache._entries.values())) is llm
    assert second != first  # the new weights were really used
    assert pagedjax.generate(params, ["the cat", "on a mat"], **kwargs) == first
    from_path = pagedjax.generate(tiny_llama_dir, ["the cat", "on a mat"], max_tokens=8,
                                  max_model_len=64, num_blocks=40, block_size=4)
    assert from_path == first


@pytest.mark.parametrize("bad_prompt,field", [
    ("", "prompt"),
    ({"prompt_token_ids": []}, "prompt"),
    ({"prompt_token_ids": [1] * 128}, "max_model_len"),
    ({"prompt_token_ids": [1, -5]}, "prompt_token_ids"),
    ({"prompt_token_ids": [10**9]}, "prompt_token_ids"),
    ({"prompt_token_ids": "abc"}, "prompt_token_ids"),
    ({"text": "no prompt key"}, "prompt"),
    (3.5, "prompt"),
    ([], "prompts"),
])
def test_bad_prompt_is_rejected_and_engine_keeps_serving(llm, prompts, reference, bad_prompt,
                                                          field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompts[0], bad_prompt] if bad_prompt != [] else bad_prompt, GREEDY,
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing half-added
    assert token_ids(llm.generate(prompts[0], GREEDY, use_tqdm=False))[0] == reference[0]


def test_bad_sampling_params_argument(llm, prompts):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts[:2], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts[0], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,field", [
    (dict(block_size=0), "block_size"),
    (dict(num_blocks=1), "num_blocks"),
    (dict(num_blocks=5), "num_blocks"),  # can't hold one max_model_len sequence
    (dict(max_model_len=100000), "max_model_len"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(dtype="int8"), "dtype"),
    (dict(attention_backend="magic"), "attention_backend"),
])
def test_bad_engine_options_name_the_field(tiny_llama_dir, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_llm(tiny_llama_dir, **kwargs)


def test_unknown_model_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "no-such-model"))


def test_kv_waste_below_4_percent_on_mixed_lengths(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, max_model_len=512, max_num_seqs=8,
                   max_num_batched_tokens=256, block_size=16, num_blocks=512)
    rng = np.random.default_rng(3)
    vocab = llm.engine.model_config.vocab_size
    lengths = rng.integers(100, 400, size=16)
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True)
              for n in rng.integers(20, 60, size=16)]
    llm.generate(random_prompts(vocab, lengths, seed=4), params, use_tqdm=False)
    stats = llm.engine.stats
    assert 0.0 < stats.mean_waste < 0.04, stats
    llm.engine.block_manager.check_no_leak()
