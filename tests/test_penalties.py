"""Repetition / presence / frequency penalties, logit_bias and allowed_token_ids: the
in-jit sampler against HF transformers' logits processors and a numpy reference of vLLM's
formula, then end to end through the engine on the tiny Llama."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagedjax import LLM, SamplingParams
from pagedjax.batching import _penalty_entries
from pagedjax.buckets import penalty_width
from pagedjax.request import Request
from pagedjax.sampler import apply_penalties, sample
from pagedjax.step_input import PenaltyTensors, SamplingTensors

V = 97
B = 6
# Everything is float32 on both sides; the only rounding is one divide/multiply and a few
# subtractions per logit, so 1e-6 relative (plus 1e-6 absolute) is ample.
RTOL, ATOL = 1e-6, 1e-6


def _request(prompt, output, **params):
    request = Request(request_id="r", prompt_token_ids=list(prompt),
                      sampling_params=SamplingParams(**params), seed=0)
    request.output_token_ids = list(output)
    return request


def _tensors(requests):
    """PenaltyTensors for these requests, built by the same host code as the engine."""
    entries = [_penalty_entries(r) for r in requests]
    W = penalty_width(max((len(e[0]) for e in entries if e is not None), default=0))
    rep = np.ones(len(requests), np.float32)
    pres = np.zeros(len(requests), np.float32)
    freq = np.zeros(len(requests), np.float32)
    ids = np.full((len(requests), W), -1, np.int32)
    counts = np.zeros((len(requests), W), np.int32)
    flags = np.zeros((len(requests), W), np.int32)
    bias = np.zeros((len(requests), W), np.float32)
    for i, (r, e) in enumerate(zip(requests, entries)):
        if e is None:
            continue
        p = r.sampling_params
        rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        n = len(e[0])
        ids[i, :n], counts[i, :n], flags[i, :n], bias[i, :n] = e
    return PenaltyTensors(*map(jnp.asarray, (rep, pres, freq, ids, counts, flags, bias)))


def _apply(logits, requests):
    return np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), _tensors(requests)))


def _random_case(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(B, V)).astype(np.float32)
    prompts = [rng.integers(0, V, size=rng.integers(1, 30)) for _ in range(B)]
    outputs = [rng.integers(0, V, size=rng.integers(0, 40)) for _ in range(B)]
    return rng, logits, prompts, outputs


@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_matches_hf(seed):
    rng, logits, prompts, outputs = _random_case(seed)
    penalties = [1.0, 1.3, 0.7, 2.0, 1.05, 0.5]
    requests = [_request(p, o, repetition_penalty=r)
                for p, o, r in zip(prompts, outputs, penalties)]
    got = _apply(logits, requests)
    for i in range(B):
        context = torch.tensor([list(prompts[i]) + list(outputs[i])])
        want = RepetitionPenaltyLogitsProcessor(penalties[i])(
            context, torch.tensor(logits[i:i + 1]))[0].numpy()
        np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=ATOL)


def _numpy_presence_frequency(logits, output, presence, frequency):
    counts = np.bincount(np.asarray(output, np.int64), minlength=V).astype(np.float32)
    return logits - frequency * counts - presence * (counts > 0)


@pytest.mark.parametrize("seed", range(4))
def test_presence_frequency_match_vllm_formula(seed):
    rng, logits, prompts, outputs = _random_case(seed)
    pres = rng.uniform(-2, 2, size=B).round(3)
    freq = rng.uniform(-2, 2, size=B).round(3)
    pres[0] = freq[0] = 0.0  # one neutral row
    requests = [_request(p, o, presence_penalty=float(a), frequency_penalty=float(b))
                for p, o, a, b in zip(prompts, outputs, pres, freq)]
    got = _apply(logits, requests)
    for i in range(B):
        want = _numpy_presence_frequency(logits[i], outputs[i], pres[i], freq[i])
        np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got[0], logits[0])


def test_all_combined_matches_reference():
    """vLLM v1 order: allowed mask, logit bias, repetition, then frequency/presence."""
    rng, logits, prompts, outputs = _random_case(11)
    requests, wants = [], []
    for i in range(B):
        bias = {int(t): float(rng.normal(0, 5)) for t in rng.integers(0, V, size=5)}
        allowed = sorted(set(rng.integers(0, V, size=20).tolist())) if i % 2 else None
        params = dict(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3,
                      logit_bias=bias, allowed_token_ids=allowed)
        requests.append(_request(prompts[i], outputs[i], **params))
        want = logits[i].copy()
        if allowed is not None:
            mask = np.full(V, True)
            mask[allowed] = False
            want[mask] = -np.inf
        for t, v in bias.items():
            want[t] += np.float32(v)
        want = RepetitionPenaltyLogitsProcessor(1.4)(
            torch.tensor([list(prompts[i]) + list(outputs[i])]),
            torch.tensor(want[None]))[0].numpy()
        wants.append(_numpy_presence_frequency(want, outputs[i], 0.5, 0.3))
    got = _apply(logits, requests)
    for i in range(B):
        np.testing.assert_allclose(got[i], wants[i], rtol=RTOL, atol=ATOL)


def test_sample_applies_penalties_before_greedy_and_temperature():
    logits = np.zeros((2, V), np.float32)
    logits[:, 5] = 10.0
    requests = [_request([1], [], logit_bias={7: 50.0}), _request([1], [], allowed_token_ids=[3])]
    sampling = SamplingTensors(
        temperature=jnp.asarray([0.0, 0.8], jnp.float32), top_p=jnp.ones(2),
        top_k=jnp.zeros(2, jnp.int32), min_p=jnp.zeros(2),
        seed_words=jnp.zeros((2, 2), jnp.uint32), sample_index=jnp.zeros(2, jnp.int32))
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(logits), sampling, _tensors(requests)))
    assert tokens.tolist() == [7, 3]


def test_neutral_rows_are_untouched_and_width_zero_without_users():
    rng, logits, prompts, outputs = _random_case(3)
    neutral = [_request(p, o) for p, o in zip(prompts, outputs)]
    assert all(_penalty_entries(r) is None for r in neutral)
    tensors = _tensors(neutral)
    assert tensors.token_ids.shape == (B, 0)
    np.testing.assert_array_equal(_apply(logits, neutral), logits)
    mixed = neutral[:3] + [_request(prompts[3], outputs[3], repetition_penalty=1.5)]
    got = _apply(logits[:4], mixed)
    np.testing.assert_array_equal(got[:3], logits[:3])
    assert not np.array_equal(got[3], logits[3])


@pytest.mark.parametrize("kwargs, field", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty="1"), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={3: float("inf")}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias={1.5: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"),
    (dict(allowed_token_ids="abc"), "allowed_token_ids"),
])
def test_invalid_values_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_normalized_and_hashable():
    p = SamplingParams(logit_bias={5: 1, 2: -3.5}, allowed_token_ids=[9, 1, 9])
    assert p.logit_bias == ((2, -3.5), (5, 1.0))
    assert p.allowed_token_ids == (1, 9)
    hash(p)
    assert SamplingParams(logit_bias={"7": 2.0}).logit_bias == ((7, 2.0),)
    assert not SamplingParams(logit_bias={}).uses_penalties
    assert p.uses_penalties and SamplingParams(frequency_penalty=0.1).uses_penalties


# ---- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
               block_size=4, num_blocks=128)


def _prompts(llm, lengths, seed=0):
    rng = np.random.default_rng(seed)
    vocab = llm.engine.model_config.vocab_size
    return [{"prompt_token_ids": rng.integers(3, vocab, size=n).tolist()} for n in lengths]


def _ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _greedy(**kw):
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, **kw})


def test_engine_logit_bias_forces_token(llm):
    prompts = _prompts(llm, (7, 20))
    out = _ids(llm.generate(prompts, _greedy(logit_bias={42: 1000.0}), use_tqdm=False))
    assert out == [[42] * 12, [42] * 12]


def test_engine_allowed_token_ids_restricts(llm):
    allowed = [11, 23, 37]
    prompts = _prompts(llm, (5, 13, 30), seed=1)
    greedy = _ids(llm.generate(prompts, _greedy(allowed_token_ids=allowed), use_tqdm=False))
    sampled = _ids(llm.generate(
        prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True,
                                allowed_token_ids=allowed), use_tqdm=False))
    for tokens in greedy + sampled:
        assert len(tokens) == 12 and set(tokens) <= set(allowed)


def test_engine_repetition_penalty_changes_repeating_output(llm):
    prompts = _prompts(llm, (3, 9, 17, 25, 33, 41), seed=2)
    plain = _ids(llm.generate(prompts, _greedy(max_tokens=24), use_tqdm=False))
    repeating = [i for i, t in enumerate(plain) if len(set(t)) < len(t)]
    assert repeating, "the tiny model should repeat itself somewhere under greedy"
    penalized = _ids(llm.generate(
        [prompts[i] for i in repeating], _greedy(max_tokens=24, repetition_penalty=100.0),
        use_tqdm=False))
    for i, tokens in zip(repeating, penalized):
        assert tokens != plain[i]
        # With a huge penalty nothing already in prompt + output is picked again while
        # unseen tokens remain.
        assert len(set(tokens)) == len(tokens)
        assert not set(tokens) & set(prompts[i]["prompt_token_ids"])


def test_engine_presence_frequency_change_output(llm):
    prompts = _prompts(llm, (4, 19), seed=4)
    plain = _ids(llm.generate(prompts, _greedy(max_tokens=24), use_tqdm=False))
    penalized = _ids(llm.generate(
        prompts, _greedy(max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0),
        use_tqdm=False))
    for p, q in zip(plain, penalized):
        if len(set(p)) < len(p):
            assert q != p


def test_engine_unpenalized_request_unaffected_by_batchmates(llm):
    prompts = _prompts(llm, (6, 18, 29, 11), seed=5)
    plain = _greedy(max_tokens=16)
    sampled = SamplingParams(temperature=0.9, seed=17, max_tokens=16, ignore_eos=True)
    alone = _ids(llm.generate([prompts[0], prompts[2]], [plain, sampled], use_tqdm=False))
    mixed = _ids(llm.generate(prompts, [
        plain, _greedy(max_tokens=16, repetition_penalty=1.8, logit_bias={9: 3.0}),
        sampled, _greedy(max_tokens=16, allowed_token_ids=[4, 5, 6], frequency_penalty=1.0),
    ], use_tqdm=False))
    assert [mixed[0], mixed[2]] == alone


def test_engine_rejects_out_of_vocab_ids(llm):
    vocab = llm.engine.model_config.vocab_size
    prompts = _prompts(llm, (4,))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(prompts, _greedy(logit_bias={vocab: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate(prompts, _greedy(allowed_token_ids=[1, vocab + 5]), use_tqdm=False)


def test_default_path_compiles_no_penalty_shapes(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
              block_size=4, num_blocks=128)
    llm.generate(_prompts(llm, (5, 30)), _greedy(), use_tqdm=False)
    assert all(k.penalty_width == 0 for k in llm.engine.runner.compiled_keys)
    assert set(llm.engine.runner.compiled_keys) <= set(llm.engine.buckets.all_keys())
    before = llm.num_compiles
    llm.generate(_prompts(llm, (5,)), _greedy(repetition_penalty=1.2), use_tqdm=False)
    assert llm.num_compiles > before
    assert any(k.penalty_width > 0 for k in llm.engine.runner.compiled_keys)


# ---- bad_words ---------------------------------------------------------------------------


class _FakeTokenizer:
    """Words map to fixed ids; a leading space maps to a different first id."""

    table = {"ab": [5, 6], " ab": [7, 6], "c": [9], " c": [9], "de": [10, 11], " de": [12]}

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return list(self.table[text])


def test_bad_words_tokenized_like_vllm():
    params = SamplingParams(bad_words=["ab", " c", "de"])
    # "ab": both spellings kept; "c": the spaced one gives the same first id, dropped;
    # "de": the spaced one has a different length, dropped.
    assert params.check_token_ids(100, _FakeTokenizer()) == ((5, 6), (7, 6), (9,), (10, 11))
    with pytest.raises(ValueError, match="bad_words"):
        params.check_token_ids(100, None)
    with pytest.raises(ValueError, match="bad_words"):
        params.check_token_ids(8, _FakeTokenizer())
    for bad in ([""], [" "], [3], 5):
        with pytest.raises(ValueError, match="bad_words"):
            SamplingParams(bad_words=bad)


def test_bad_words_ban_last_token_only_after_prefix():
    from pagedjax.batching import _banned_tokens
    request = _request([1, 2], [3, 4, 5], bad_words=["x"])
    request.bad_words_token_ids = ((8,), (4, 5, 6), (5, 7), (2, 3, 9), (1, 2, 3, 4, 5, 10))
    # (2, 3, 9): its prefix matches only across the prompt boundary, which vLLM ignores;
    # (1, ..., 10) is longer than the output plus one.
    assert _banned_tokens(request) == {8, 6, 7}
    logits = np.zeros((1, V), np.float32)
    got = _apply(logits, [request])
    assert set(np.flatnonzero(np.isneginf(got[0]))) == {6, 7, 8}


def _contains(seq, sub):
    return any(list(seq[i:i + len(sub)]) == list(sub) for i in range(len(seq) - len(sub) + 1))


def test_engine_bad_words(llm):
    prompts = _prompts(llm, (5, 14, 23), seed=6)
    plain = _ids(llm.generate(prompts, _greedy(max_tokens=16), use_tqdm=False))
    tok = llm.tokenizer
    vocab = llm.engine.model_config.vocab_size
    changed = 0
    for prompt, tokens in zip(prompts, plain):
        words = [tok.decode(tokens[3:5]), tok.decode(tokens[8:9])]
        words = [w for w in words if w.strip()]
        if not words:
            continue
        params = _greedy(max_tokens=16, bad_words=words)
        sequences = params.check_token_ids(vocab, tok)
        out = _ids(llm.generate([prompt], params, use_tqdm=False))[0]
        assert len(out) == 16
        for seq in sequences:
            assert not _contains(out, seq), (words, seq, out)
        if any(_contains(tokens, seq) for seq in sequences):
            assert out != tokens
            changed += 1
    assert changed, "no bad word occurred in the unconstrained outputs"
