"""Stop strings (vLLM semantics) on the tiny random Llama, and stop_reason values."""

import pytest

from pagedjax import SamplingParams

PROMPTS = ["the cat sat on the mat", "hello there", "once upon a time", "a"]
MAX_TOKENS = 24


def greedy(**kwargs):
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def baseline(llm):
    """Each prompt's greedy output without stop strings."""
    return {p: llm.generate(p, greedy(), use_tqdm=False)[0].outputs[0] for p in PROMPTS}


def run(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def clean_boundaries(tokenizer, ids):
    """{number of tokens k: len(decoded text of the first k)} where that text is whole."""
    out = {}
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if not text.endswith("\ufffd"):
            out[k] = len(text)
    return out


def spanning_stop(llm, baseline, accept=lambda text, candidate, start: True):
    """(prompt, stop string, start index): a string that occurs once in the output, holds no
    broken character, and starts in one token and ends in a later one."""
    tokenizer = llm.get_tokenizer()
    for prompt in PROMPTS:
        base = baseline[prompt]
        text = base.text
        for k, cut in clean_boundaries(tokenizer, base.token_ids).items():
            for before, after in ((1, 1), (2, 1), (1, 2), (2, 2)):
                start = cut - before
                candidate = text[start:cut + after]
                if (start > 0 and len(candidate) == before + after
                        and "\ufffd" not in candidate and text.count(candidate) == 1
                        and accept(text, candidate, start)):
                    return prompt, candidate, start
    raise AssertionError("no output text has a usable multi-token substring")


def tokens_to_complete(tokenizer, ids, stop):
    """How many tokens the output needs before `stop` appears in its text."""
    return next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))


def test_stop_string_spanning_tokens_truncates_text(llm, baseline):
    prompt, stop, start = spanning_stop(llm, baseline)
    base = baseline[prompt]
    out = run(llm, prompt, greedy(stop=stop))
    assert out.text == base.text[:start]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # Token ids are kept as generated: up to and including the one completing the string.
    needed = tokens_to_complete(llm.get_tokenizer(), base.token_ids, stop)
    assert needed >= 2
    assert out.token_ids == base.token_ids[:needed]


def test_include_stop_str_in_output_keeps_it(llm, baseline):
    prompt, stop, start = spanning_stop(llm, baseline)
    out = run(llm, prompt, greedy(stop=[stop], include_stop_str_in_output=True))
    assert out.text == baseline[prompt].text[:start + len(stop)]
    assert out.text.endswith(stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_earliest_of_several_stop_strings_wins(llm, baseline):
    # `stop` and its own suffix complete on the same token: the text is cut at the one
    # that starts first, whatever their order in the list.
    prompt, stop, start = spanning_stop(
        llm, baseline, accept=lambda text, c, i: text.find(c[1:]) == i + 1)
    text = baseline[prompt].text
    out = run(llm, prompt, greedy(stop=[stop[1:], "never appears \u2603", stop]))
    assert out.text == text[:start] and out.stop_reason == stop


def test_stop_string_at_the_first_token(llm, baseline):
    tokenizer = llm.get_tokenizer()
    prompt = next(p for p in PROMPTS if 1 in clean_boundaries(tokenizer, baseline[p].token_ids))
    base = baseline[prompt]
    first = base.text[0]
    out = run(llm, prompt, greedy(stop=first))
    assert out.text == ""
    assert out.token_ids == base.token_ids[:1]
    assert out.finish_reason == "stop" and out.stop_reason == first
    kept = run(llm, prompt, greedy(stop=first, include_stop_str_in_output=True))
    assert kept.text == first and kept.token_ids == base.token_ids[:1]


def test_min_tokens_delays_stop_strings(llm, baseline):
    prompt, stop, start = spanning_stop(llm, baseline)
    base = baseline[prompt]
    needed = tokens_to_complete(llm.get_tokenizer(), base.token_ids, stop)
    # Checked from the min_tokens-th token on: a string completed exactly then still stops.
    at_min = run(llm, prompt, greedy(stop=stop, min_tokens=needed))
    assert at_min.text == base.text[:start] and at_min.finish_reason == "stop"
    # Completed before min_tokens: never matched (it occurs only once), so it runs on.
    past_min = run(llm, prompt, greedy(stop=stop, min_tokens=needed + 1))
    assert past_min.finish_reason == "length" and past_min.stop_reason is None
    assert past_min.token_ids == base.token_ids and past_min.text == base.text


def test_stopped_request_frees_blocks_and_batch_is_unaffected(llm, baseline):
    prompt, stop, start = spanning_stop(llm, baseline)
    others = [p for p in PROMPTS if p != prompt]
    params = [greedy(stop=stop)] + [greedy()] * len(others)
    outs = llm.generate([prompt] + others, params, use_tqdm=False)
    assert outs[0].outputs[0].text == baseline[prompt].text[:start]
    for other, out in zip(others, outs[1:]):
        assert out.outputs[0].token_ids == baseline[other].token_ids
        assert out.outputs[0].text == baseline[other].text
        assert out.outputs[0].finish_reason == "length"
    assert llm.kv_cache_stats().used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


def test_plain_output_text_equals_decode(llm, baseline):
    tokenizer = llm.get_tokenizer()
    for out in baseline.values():
        assert out.text == tokenizer.decode(out.token_ids)
        assert out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_id_is_the_stop_reason_and_its_text_is_dropped(llm, baseline):
    prompt = PROMPTS[0]
    base = baseline[prompt]
    token = base.token_ids[3]
    index = base.token_ids.index(token)
    out = run(llm, prompt, greedy(stop_token_ids=[token]))
    assert out.token_ids == base.token_ids[:index + 1]
    assert out.finish_reason == "stop" and out.stop_reason == token
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(base.token_ids[:index])  # vLLM drops its text
    kept = run(llm, prompt, greedy(stop_token_ids=[token], include_stop_str_in_output=True))
    assert kept.text == tokenizer.decode(base.token_ids[:index + 1])


def test_eos_has_no_stop_reason(llm, baseline):
    prompt = PROMPTS[0]
    base = baseline[prompt]
    engine = llm.engine
    request = engine.make_request(llm.get_tokenizer().encode(prompt),
                                  SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    request.eos_token_ids = frozenset({base.token_ids[2]})  # the engine's EOS, moved
    engine.add_request(request)
    while engine.has_unfinished_requests():
        engine.step()
    index = base.token_ids.index(base.token_ids[2])
    assert request.output_token_ids == base.token_ids[:index + 1]
    assert request.finish_reason == "stop" and request.stop_reason is None


@pytest.mark.parametrize("stop", ["", [""], ["ok", ""], [1], ["ok", None], 5, {"a"}, b"x"])
def test_invalid_stop_is_rejected(stop):
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_invalid_include_stop_str_in_output_is_rejected(value):
    with pytest.raises(ValueError, match="include_stop_str_in_output"):
        SamplingParams(include_stop_str_in_output=value)


@pytest.mark.parametrize("given, expected", [
    (None, ()), ("ab", ("ab",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",)), ([], ())])
def test_stop_is_normalized_to_a_tuple(given, expected):
    params = SamplingParams(stop=given)
    assert params.stop == expected
    hash(params)


def test_defaults():
    params = SamplingParams()
    assert params.stop == () and params.include_stop_str_in_output is False


def test_stop_string_on_the_last_allowed_token_reports_stop(llm, baseline):
    prompt, stop, start = spanning_stop(llm, baseline)
    base = baseline[prompt]
    needed = tokens_to_complete(llm.get_tokenizer(), base.token_ids, stop)
    out = run(llm, prompt, SamplingParams(temperature=0, max_tokens=needed, stop=stop))
    assert out.token_ids == base.token_ids[:needed]
    assert out.text == base.text[:start]
    assert out.finish_reason == "stop" and out.stop_reason == stop
