"""Structured outputs on the tiny random Llama: params validation, the device bitmask,
grammar states that follow (and roll back with) their sequence's tokens, bad constraints
as ValueErrors, batch invariance of unconstrained neighbours, and decode calls falling
back to single steps."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import SamplingParams, StructuredOutputsParams
from pagedjax.sampler import sample
from pagedjax.step_input import SamplingTensors
from pagedjax.token_bitmask import apply_token_bitmask, unpack_bitmask
from tests.helpers.engines import STRUCTURED_SETTINGS, make_llm, one_step_shape

DIGITS = StructuredOutputsParams(regex=r"[0-9]{2,4}-(ab|cd)")
SMALL_JSON = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return one_step_shape(make_llm(tiny_llama_dir, **STRUCTURED_SETTINGS), 64, 16)


def test_params_need_exactly_one_valid_constraint():
    assert StructuredOutputsParams(json='{"type": "integer"}').json == {"type": "integer"}
    assert StructuredOutputsParams(choice=["a", "b"]).kind == "choice"
    for bad, field in [({}, "exactly one"), (dict(regex="a", choice=["a"]), "exactly one"),
                       (dict(json="{nope"), "structured_outputs.json"),
                       (dict(choice="ab"), "structured_outputs.choice"),
                       (dict(choice=["a", ""]), "structured_outputs.choice"),
                       (dict(grammar=""), "structured_outputs.grammar"),
                       (dict(json_object="yes"), "structured_outputs.json_object")]:
        with pytest.raises(ValueError, match=field):
            StructuredOutputsParams(**bad)
    with pytest.raises(ValueError, match="unknown keys guided_json"):
        StructuredOutputsParams.from_dict({"guided_json": {}})
    with pytest.raises(ValueError, match="structured_outputs must be a Structured"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_bitmask_masks_logits_before_greedy_and_random_rows():
    rng = np.random.default_rng(0)
    vocab = 70  # three words, the last one partly used
    bits = rng.random((4, 96)) < 0.1
    bits[:, 0] = True  # every row allows something
    words = np.packbits(bits, axis=-1, bitorder="little").view(np.int32)  # [4, 3]
    assert np.array_equal(np.asarray(unpack_bitmask(jnp.asarray(words), vocab)),
                          bits[:, :vocab])
    logits = jnp.asarray(rng.normal(size=(4, vocab)).astype(np.float32))
    masked = np.asarray(apply_token_bitmask(logits, jnp.asarray(words)))
    assert np.all(np.isneginf(masked[~bits[:, :vocab]]))
    assert np.array_equal(masked[bits[:, :vocab]], np.asarray(logits)[bits[:, :vocab]])
    sampling = SamplingTensors(
        temperature=jnp.asarray([0.0, 1.0, 0.0, 2.0]), top_p=jnp.ones(4),
        top_k=jnp.zeros(4, jnp.int32), min_p=jnp.zeros(4),
        seed_words=jnp.asarray(rng.integers(0, 2**32, (4, 2)), jnp.uint32),
        sample_index=jnp.zeros(4, jnp.int32), token_bitmask=jnp.asarray(words))
    tokens = np.asarray(jax.jit(sample)(logits, sampling))
    assert all(bits[row, token] for row, token in enumerate(tokens))
    assert tokens[0] == np.argmax(masked[0])  # greedy takes the best allowed token


def test_grammar_state_follows_and_rolls_back_tokens(llm):
    tokenizer = llm.get_tokenizer()
    state = llm.engine.input_processor.grammars.state_for(DIGITS)
    masks = llm.engine.grammar_bitmasks
    ids = tokenizer.encode("12-cd", add_special_tokens=False)
    seen = []
    for count in range(len(ids) + 1):
        state.sync(ids[:count])
        masks.fill([state])
        seen.append(state.mask.copy())
    assert state.matcher.is_accepting()
    eos = tokenizer.eos_token_id
    assert (seen[-1][eos // 32] >> (eos % 32)) & 1  # complete: EOS is allowed
    state.sync(ids[:1])  # tokens taken back: the state is where it was after one
    masks.fill([state])
    assert np.array_equal(state.mask, seen[1])
    fork = state.fork()
    fork.sync(ids[:2])
    assert state.num_tokens == 1 and fork.num_tokens == 2  # independent copies


def test_bad_constraints_are_value_errors_and_the_engine_keeps_serving(llm):
    for constraint, problem in [
            (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}),
             "uniqueItems"),
            (StructuredOutputsParams(json={"type": "wat"}), "wat"),
            (StructuredOutputsParams(regex="(ab"), "unclosed group"),
            (StructuredOutputsParams(grammar="start: missing_rule"), "missing_rule"),
            (StructuredOutputsParams(grammar="root ::= ("), "structured_outputs.grammar")]:
        with pytest.raises(ValueError, match=problem):
            llm.generate("hi", SamplingParams(structured_outputs=constraint), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate("hi", SamplingParams(max_tokens=12, seed=3, structured_outputs=DIGITS),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(DIGITS.regex, out.text) and out.finish_reason == "stop"


def test_unconstrained_requests_are_batch_invariant_next_to_constrained(llm):
    prompts = [[5, 17, 42, 99, 7], [8, 9, 10, 11, 12, 13], [30, 31, 32], [250, 251, 4, 6]]
    plain = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
             SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True)]
    alone = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], plain, use_tqdm=False)
    constrained = [
        SamplingParams(seed=1, max_tokens=40, structured_outputs=StructuredOutputsParams(
            json=SMALL_JSON, disable_any_whitespace=True)),
        SamplingParams(seed=2, max_tokens=40, n=3, structured_outputs=DIGITS)]
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         plain + constrained, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids
                                                          for o in alone]
    value = json.loads(mixed[2].outputs[0].text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99
    assert all(re.fullmatch(DIGITS.regex, c.text) for c in mixed[3].outputs)
    assert any(key.bitmask_words for key in llm.engine.runner.compiled_keys)


def test_decode_calls_fall_back_to_single_steps_for_constrained_batches(tiny_llama_dir):
    llm = one_step_shape(make_llm(tiny_llama_dir, **STRUCTURED_SETTINGS,
                                  num_scheduler_steps=4), 64, 16)
    outputs = llm.generate(["a", "b"], [
        SamplingParams(seed=4, max_tokens=24, structured_outputs=DIGITS),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)], use_tqdm=False)
    assert re.fullmatch(DIGITS.regex, outputs[0].outputs[0].text)
    assert len(outputs[1].outputs[0].token_ids) == 24
    # Steps with the constrained row were single steps with bitmasks; the plain row's
    # tail, once alone, ran as decode calls.
    keys = llm.engine.runner.compiled_keys
    assert any(k.bitmask_words for k in keys) and any(k.decode_call for k in keys)
    assert not any(k.bitmask_words and k.decode_call for k in keys)
