"""LLM.generate_stream: DELTA / CUMULATIVE / FINAL outputs match generate, early exit frees."""

import pytest

from pagedjax import SamplingParams

PROMPTS = ["the cat sat on the mat", "hello there", "once upon a time", "a",
           "streaming tokens one at a time"]
MAX_TOKENS = 20


def greedy(max_tokens=MAX_TOKENS, **kwargs):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def baseline(llm):
    """generate's outputs for PROMPTS, batched."""
    return llm.generate(PROMPTS, greedy(), use_tqdm=False)


def assert_clean(llm):
    assert not llm.engine.has_unfinished_requests()
    llm.engine.block_manager.check_no_leak()


def collect(stream):
    """{prompt index: [outputs in the order they came]} and the order of prompt indices."""
    by_prompt, order = {}, []
    for output in stream:
        by_prompt.setdefault(output.prompt_index, []).append(output)
        order.append(output.prompt_index)
    return by_prompt, order


def test_delta_concatenates_to_generate(llm, baseline):
    by_prompt, _ = collect(llm.generate_stream(PROMPTS, greedy(), output_kind="delta"))
    assert sorted(by_prompt) == list(range(len(PROMPTS)))
    for index, base in enumerate(baseline):
        outs = by_prompt[index]
        assert len(outs) > 1  # streamed, not one final blob
        assert all(o.request_id == outs[0].request_id for o in outs)
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert all(o.outputs[0].finish_reason is None for o in outs[:-1])
        assert outs[-1].outputs[0].finish_reason == base.outputs[0].finish_reason == "length"
        token_ids = [t for o in outs for t in o.outputs[0].token_ids]
        text = "".join(o.outputs[0].text for o in outs)
        assert token_ids == base.outputs[0].token_ids
        assert text == base.outputs[0].text
        assert all(len(o.outputs[0].token_ids) == 1 for o in outs)  # one token per step
        assert outs[-1].prompt_token_ids == base.prompt_token_ids
    assert_clean(llm)


def test_cumulative_grows_and_ends_at_generate(llm, baseline):
    by_prompt, _ = collect(llm.generate_stream(PROMPTS, greedy(), output_kind="cumulative"))
    for index, base in enumerate(baseline):
        outs = by_prompt[index]
        assert len(outs) == MAX_TOKENS
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == list(range(1, MAX_TOKENS + 1))
        for a, b in zip(outs, outs[1:]):
            assert b.outputs[0].text.startswith(a.outputs[0].text)
        last = outs[-1]
        assert last.finished and last.outputs[0] == base.outputs[0]
    assert_clean(llm)


def test_final_yields_one_per_request_in_finishing_order(llm, baseline):
    lengths = [3, 12, 6, 9, 1]
    params = [greedy(max_tokens=n) for n in lengths]
    outputs = list(llm.generate_stream(PROMPTS, params, output_kind="final"))
    assert len(outputs) == len(PROMPTS)
    assert sorted(o.prompt_index for o in outputs) == list(range(len(PROMPTS)))
    assert all(o.finished for o in outputs)
    assert len({o.request_id for o in outputs}) == len(PROMPTS)
    # all prompts run together, so the shortest budgets finish first
    assert [o.prompt_index for o in outputs] == sorted(range(len(PROMPTS)),
                                                       key=lambda i: lengths[i])
    for o in outputs:
        base = baseline[o.prompt_index].outputs[0]
        n = lengths[o.prompt_index]
        assert o.outputs[0].token_ids == base.token_ids[:n]
    assert_clean(llm)


def test_generate_keeps_prompt_order_and_index(llm, baseline):
    outs = llm.generate(PROMPTS, [greedy(max_tokens=n) for n in (9, 2, 5, 1, 7)],
                        use_tqdm=False)
    assert [o.prompt_index for o in outs] == list(range(len(PROMPTS)))
    assert [o.prompt for o in outs] == PROMPTS


def spanning_stop(llm, baseline):
    """(prompt index, stop string): two characters of an output that occur once, the first
    emitted by one token and the second by a later one."""
    tokenizer = llm.get_tokenizer()
    for index, base in enumerate(baseline):
        ids, text = base.outputs[0].token_ids, base.outputs[0].text
        for k in range(1, len(ids)):
            cut = tokenizer.decode(ids[:k])
            if cut.endswith("\ufffd") or not text.startswith(cut) or len(cut) < 2:
                continue
            candidate = text[len(cut) - 1:len(cut) + 1]
            if len(candidate) == 2 and "\ufffd" not in candidate and text.count(candidate) == 1:
                return index, candidate
    raise AssertionError("no output text has a usable multi-token substring")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_steps_streams_the_truncated_text(llm, baseline, include):
    index, stop = spanning_stop(llm, baseline)
    params = greedy(stop=[stop, "zzzzzzz-never"], include_stop_str_in_output=include)
    expected = llm.generate(PROMPTS[index], params, use_tqdm=False)[0].outputs[0]
    assert expected.finish_reason == "stop" and expected.stop_reason == stop
    full = baseline[index].outputs[0].text
    assert expected.text == full[:full.index(stop) + (len(stop) if include else 0)]
    deltas = list(llm.generate_stream(PROMPTS[index], params, output_kind="delta"))
    assert "".join(o.outputs[0].text for o in deltas) == expected.text
    assert [t for o in deltas for t in o.outputs[0].token_ids] == expected.token_ids
    assert deltas[-1].finished and deltas[-1].outputs[0].stop_reason == stop
    cumulative = list(llm.generate_stream(PROMPTS[index], params, output_kind="cumulative"))
    for a, b in zip(cumulative, cumulative[1:]):  # never takes text back
        assert b.outputs[0].text.startswith(a.outputs[0].text)
    assert cumulative[-1].outputs[0] == expected
    assert_clean(llm)


def test_outputs_of_different_prompts_interleave(llm):
    outputs = list(llm.generate_stream(PROMPTS, greedy(), output_kind="delta"))
    first_finish = next(i for i, o in enumerate(outputs) if o.finished)
    before = [o.prompt_index for o in outputs[:first_finish]]
    assert set(before) == set(range(len(PROMPTS)))  # all stream before any finishes
    assert all(before.count(i) >= 2 for i in range(len(PROMPTS)))
    # batched steps: prompt indices alternate rather than come one request at a time
    switches = sum(a != b for a, b in zip(before, before[1:]))
    assert switches >= len(before) // 2
    assert_clean(llm)


def test_break_aborts_and_frees(llm, baseline):
    seen = []
    for output in llm.generate_stream(PROMPTS, greedy(), output_kind="delta"):
        seen.append(output)
        if len(seen) == 7:
            break
    assert not any(o.finished for o in seen)
    assert_clean(llm)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0] for o in outs] == [b.outputs[0] for b in baseline]
    assert_clean(llm)


def test_close_of_a_held_generator_aborts(llm, baseline):
    stream = llm.generate_stream(PROMPTS, greedy(), output_kind="cumulative")
    first = next(stream)
    assert llm.engine.has_unfinished_requests()
    request = llm.engine.scheduler.get_request(first.request_id)
    stream.close()
    assert request.finish_reason == "abort"
    assert_clean(llm)
    outs = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)
    assert [o.outputs[0] for o in outs] == [b.outputs[0] for b in baseline[:2]]


def test_exception_in_consumer_aborts(llm):
    with pytest.raises(KeyError):
        for _ in llm.generate_stream(PROMPTS, greedy()):
            raise KeyError("consumer failed")
    assert_clean(llm)


def test_validation_happens_before_anything_is_queued(llm):
    bad = [PROMPTS[0], {"prompt_token_ids": [10**9]}]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate_stream(bad, greedy())  # raises at the call, not on iteration
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate_stream(PROMPTS, [greedy()])
    with pytest.raises(ValueError, match="output_kind"):
        llm.generate_stream(PROMPTS, greedy(), output_kind="FINAL_ONLY")
    assert_clean(llm)
    stream = llm.generate_stream(PROMPTS, greedy())
    assert not llm.engine.has_unfinished_requests()  # queued only once iterated
    stream.close()
    assert_clean(llm)
