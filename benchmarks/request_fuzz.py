"""Hypothesis strategies for hostile-but-fair request bodies (valid ones, and valid ones
with a field or two wrong), and the check every response must pass: 2xx, or 4xx with an
OpenAI error body; never a 5xx, in-stream included.

Shared by tests/test_server_validation.py (a bounded number of examples) and
benchmarks/fuzz_server.py (long runs), which imports it as a sibling module.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from hypothesis import strategies as st

MODEL = "tiny"
SURROGATES = ["\ud800", "a\udfffb", "\udc00x"]
HUGE_INTS = [-2**63 - 1, -2**63, -2**31, -1, 2**31, 2**40, 2**63, 2**64, 10**30]
ODD_FLOATS = [-1.0, 0.0, 1e-45, 1e-40, 1e-6, 1e39, 1e300, -1e300, float("nan"),
              float("inf"), float("-inf")]
TEMPLATES = ["{{ messages[0]['content'] }}",
             "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"]
BAD_TEMPLATES = ["{% for %}", "{{ 1 / 0 }}", "{{ messages + 1 }}", "{{ 'x' * 3000000 }}",
                 "{{ raise_exception('no') }}", "", "{{ undefined_name.attr }}"]


def _text(min_size: int = 0) -> st.SearchStrategy:
    return st.one_of(st.text(min_size=max(min_size, 1), max_size=24),
                     st.sampled_from(["Hi there", "once upon a time", "<|im_end|> x"]))


def _token_ids() -> st.SearchStrategy:
    return st.lists(st.integers(0, 100), min_size=1, max_size=6)


def _valid_sampling() -> dict:
    """Valid values of the fields both endpoints share (each key is optional)."""
    return {
        "temperature": st.one_of(st.just(0.0), st.floats(0.1, 2)),
        "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
        "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "n": st.integers(1, 3), "seed": st.integers(-2**63, 2**63 - 1),
        "min_tokens": st.integers(0, 1),
        "stop": st.one_of(_text(1), st.lists(_text(1), min_size=1, max_size=3)),
        "stop_token_ids": st.lists(st.integers(0, 100), max_size=3),
        "logit_bias": st.dictionaries(st.integers(0, 100).map(str), st.floats(-100, 100),
                                      max_size=3),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(),
        "include_stop_str_in_output": st.booleans(), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "model": st.just(MODEL), "user": st.text(max_size=8),
    }


def _bad_value() -> st.SearchStrategy:
    """A value wrong for (almost) any field: out of range, of the wrong type, or text
    that is not valid Unicode."""
    return st.one_of(st.sampled_from(HUGE_INTS), st.sampled_from(ODD_FLOATS),
                     st.sampled_from(SURROGATES), st.none(), st.booleans(),
                     st.text(max_size=4), st.lists(st.integers(-2, 2**40), max_size=2),
                     st.dictionaries(st.text(max_size=2), st.integers(0, 2), max_size=1),
                     st.lists(st.dictionaries(st.sampled_from(["type", "text", "role"]),
                                              st.one_of(st.none(), st.integers(), _text()),
                                              max_size=2), max_size=2))


def _corrupted(valid: st.SearchStrategy, fields: list[str], extra_bad: dict
               ) -> st.SearchStrategy:
    """A valid body with 0, 1 or 2 of `fields` replaced by bad values (`extra_bad`: more
    bad values for some fields)."""

    @st.composite
    def build(draw):
        body = draw(valid)
        for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
            field = draw(st.sampled_from(fields))
            extra = [extra_bad[field]] if field in extra_bad else []
            bad = st.one_of(_bad_value(), *extra)
            body[field] = draw(bad)
        return body

    return build()


def completion_bodies() -> st.SearchStrategy:
    """POST /v1/completions bodies: valid ones, and ones with a field or two wrong."""
    prompt = st.one_of(_text(1), st.lists(_text(1), min_size=1, max_size=3), _token_ids(),
                       st.lists(_token_ids(), min_size=1, max_size=2))
    valid = st.fixed_dictionaries(
        {"prompt": prompt, "max_tokens": st.integers(1, 8)},
        optional={**_valid_sampling(), "logprobs": st.integers(0, 5)})
    fields = ["prompt", "max_tokens", "logprobs", "echo", *_valid_sampling()]
    return _corrupted(valid, fields, {"prompt": st.sampled_from(
        [[], [[]], "", [2**40], [-1, 5], ["ok", 5], "Hi" * 400, ["Hi"] * 300])})


def chat_bodies() -> st.SearchStrategy:
    """POST /v1/chat/completions bodies, request chat templates included."""
    part = st.fixed_dictionaries({"type": st.just("text"), "text": _text()})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]),
         "content": st.one_of(_text(1), st.lists(part, min_size=1, max_size=2))})
    valid = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3),
         "max_completion_tokens": st.integers(1, 8)},
        optional={**_valid_sampling(), "logprobs": st.booleans(),
                  "top_logprobs": st.integers(0, 5), "add_generation_prompt": st.booleans(),
                  "continue_final_message": st.booleans(),
                  "chat_template": st.sampled_from(TEMPLATES)})
    fields = ["messages", "max_completion_tokens", "max_tokens", "logprobs", "top_logprobs",
              "add_generation_prompt", "continue_final_message", "chat_template",
              *_valid_sampling()]
    messages_bad = st.sampled_from([
        [], [{"role": "user"}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": 5, "content": "hi"}], [{"role": "user", "content": "a\ud800", "name": 3}]])
    return _corrupted(valid, fields, {"messages": messages_bad,
                                      "chat_template": st.sampled_from(BAD_TEMPLATES)})


def requests() -> st.SearchStrategy:
    """(path, body): a JSON body for either endpoint, or (rarely) a few raw bytes."""
    return st.one_of(st.tuples(st.just("/v1/completions"), completion_bodies()),
                     st.tuples(st.just("/v1/chat/completions"), chat_bodies()),
                     st.tuples(st.just("/v1/completions"), completion_bodies()),
                     st.tuples(st.just("/v1/chat/completions"), chat_bodies()),
                     st.tuples(st.sampled_from(["/v1/completions", "/tokenize"]),
                               st.binary(max_size=16)))


def encode_body(body: Any) -> bytes:
    """The request's bytes (JSON with NaN / Infinity and escaped surrogates, as Python's
    json module writes them)."""
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode("ascii")


def check_response(status: int, content_type: str, text: str) -> Optional[str]:
    """None when the response is 2xx or an OpenAI-shaped 4xx (a stream: its events end in
    [DONE] and any error event is a 4xx); otherwise what is wrong."""
    if status >= 500 or not (200 <= status < 300 or 400 <= status < 500):
        return f"status {status}: {text[:300]}"
    if status >= 400:
        error = json.loads(text).get("error")
        if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
            return f"status {status} without an OpenAI error body: {text[:300]}"
        return None
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream without [DONE]: {text[-300:]}"
        for event in events[:-1]:
            error = json.loads(event).get("error")
            if error is not None and not 400 <= error.get("code", 500) < 500:
                return f"stream error event {error}"
        return None
    if "choices" not in json.loads(text) and "tokens" not in json.loads(text):
        return f"2xx without choices: {text[:300]}"
    return None
