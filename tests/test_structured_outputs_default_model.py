"""Structured outputs on the default model (SmolLM2-135M-Instruct): 32 sampled constrained
completions (JSON schemas, regexes, choices, an EBNF grammar, one request with n=4), batched
with unconstrained requests in a pool small enough to preempt, all parse and validate."""

import dataclasses
import json
import re

import jsonschema
import pytest

from pagedjax import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers.engines import one_step_shape

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 10},
                   "minItems": 1, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "skills", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"},
    },
    "required": ["items", "express"],
    "additionalProperties": False,
}
REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
           r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"]
CHOICES = ["positive", "negative", "neutral"]
# Sums and differences of up to three small numbers, one of them maybe in parentheses.
ARITHMETIC_GBNF = """
root ::= term | term op term | term op term op term
term ::= num | "(" num op num ")"
op ::= " + " | " - "
num ::= [1-9] | [1-9] [0-9]
"""
_NUM = r"[1-9][0-9]?"
_TERM = rf"(?:{_NUM}|\({_NUM} [+-] {_NUM}\))"
ARITHMETIC = re.compile(rf"{_TERM}(?: [+-] {_TERM}){{0,2}}")


@pytest.fixture(scope="module")
def llm():
    llm = LLM(max_model_len=512, block_size=16, num_blocks=40, max_num_seqs=32,
              max_num_batched_tokens=64)
    return one_step_shape(llm, 64, 32)  # each program of this model compiles for seconds


def constrained(kind, value, seed, **extra):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=160,
                          structured_outputs=StructuredOutputsParams(**{kind: value}), **extra)


def test_sampled_constrained_outputs_validate_under_preemption_and_n4(llm):
    requests = (
        [("Describe a fictional person as JSON: ", constrained("json", PERSON, i))
         for i in range(5)]
        + [("An online order as JSON: ", constrained("json", json.dumps(ORDER), 10 + i))
           for i in range(3)]
        + [(f"Write an example ({pattern}): ", constrained("regex", pattern, 20 + i))
           for i, pattern in enumerate(REGEXES * 3)][:8]
        + [(f"Review {i}: the food was cold. Sentiment: ", constrained("choice", CHOICES, 30 + i))
           for i in range(8)]
        + [("A small sum: ", constrained("grammar", ARITHMETIC_GBNF, 40 + i)) for i in range(4)]
        + [("Describe a fictional person as JSON: ", constrained("json", PERSON, 50, n=4))]
    )
    plain = [(f"Tell me a fact about the number {i}.",
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for i in range(4)]
    batch = requests[:16] + plain + requests[16:]
    outputs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)

    checked = 0
    for (_, params), output in zip(batch, outputs):
        constraint = params.structured_outputs
        assert len(output.outputs) == params.n
        for completion in output.outputs:
            text = completion.text
            if constraint is None:
                assert len(completion.token_ids) == 24
                continue
            assert completion.finish_reason == "stop", (text, completion.finish_reason)
            if constraint.kind == "json":
                jsonschema.validate(json.loads(text), constraint.json)
            elif constraint.kind == "regex":
                assert re.fullmatch(constraint.regex, text), text
            elif constraint.kind == "choice":
                assert text in CHOICES
            else:
                assert ARITHMETIC.fullmatch(text), text
            checked += 1
    assert checked == 32
    # The n=4 children each followed their own grammar state to different objects.
    assert len({c.text for c in outputs[-1].outputs}) == 4
    stats = llm.engine.queue_stats()
    assert stats.num_preemptions > 0  # the small pool made some sequences recompute
    assert llm.engine.stats.max_seqs_in_step >= 24  # constrained and plain rows together
    # Constrained steps take one program with bitmasks ([B, 49152 / 32] words) for the
    # one step shape; steps without a constrained row would take the plain one.
    keys = llm.engine.runner.compiled_keys
    assert [key.bitmask_words for key in keys if key.bitmask_words] == [1536]
    assert {dataclasses.replace(key, bitmask_words=0) for key in keys} == {
        llm.engine.buckets.key_for(64, 32)}
