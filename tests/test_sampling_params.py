"""SamplingParams: vLLM defaults, validation (ValueError naming the field), immutability."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from pagedjax.sampling_params import SamplingParams

INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", "1"), ("n", True),
    ("temperature", -0.1), ("temperature", -1), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", -math.inf), ("temperature", "0.7"),
    ("temperature", None), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", 2),
    ("top_p", math.nan), ("top_p", "0.9"),
    ("top_k", -2), ("top_k", -10), ("top_k", 5.0), ("top_k", 2.5), ("top_k", "5"),
    ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.nan), ("min_p", "0.1"),
    ("seed", -1), ("seed", True), ("seed", 1.0), ("seed", "7"), ("seed", 2**64),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 16.0), ("max_tokens", "16"),
    ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 1.5),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("stop_token_ids", ["a"]), ("stop_token_ids", [1.5]), ("stop_token_ids", [-1]),
    ("stop_token_ids", [2, -3]), ("stop_token_ids", 5), ("stop_token_ids", [True]),
    ("skip_special_tokens", 0), ("skip_special_tokens", "no"), ("skip_special_tokens", None),
    # beyond the device dtypes (int32 / float32) or vLLM's greedy threshold
    ("top_k", 2**31), ("top_k", 1099511627776), ("n", 2**31), ("max_tokens", 2**31),
    ("min_tokens", 2**40), ("stop_token_ids", [2**31]), ("logprobs", 2**40),
    ("temperature", 1e-6), ("temperature", 1e39), ("top_p", 1e-40),
    ("repetition_penalty", 1e-40), ("repetition_penalty", 1e39), ("logit_bias", {5: 1e39}),
    ("logit_bias", {2**31: 1.0}), ("allowed_token_ids", [2**31]),
]


def _assert_names_field(excinfo, field):
    message = str(excinfo.value)
    assert re.search(rf"(?<![A-Za-z_]){field}(?![A-Za-z_])", message), (
        f"message {message!r} does not name {field}")


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**{field: value})
    _assert_names_field(excinfo, field)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(min_tokens=5, max_tokens=4)
    _assert_names_field(excinfo, "min_tokens")
    # Equal is fine, and so is any min_tokens when max_tokens is unbounded.
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000


def test_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed) == (16, 0, None)
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.stop_token_ids == ()
    assert not p.is_greedy


VALID = [
    ("temperature", 0), ("temperature", 0.0), ("temperature", 1e-4), ("temperature", 2),
    ("temperature", 100.0),
    ("top_p", 1), ("top_p", 1.0), ("top_p", 1e-6), ("top_p", 0.5),
    ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", 50),
    ("min_p", 0), ("min_p", 0.0), ("min_p", 0.5), ("min_p", 1.0),
    ("seed", None), ("seed", 0), ("seed", 42), ("seed", 2**32 + 5), ("seed", 2**63 - 1),
    ("top_k", 2**31 - 1), ("temperature", 1e-5), ("max_tokens", 2**31 - 1),
    ("max_tokens", None), ("max_tokens", 1), ("max_tokens", 4096),
    ("min_tokens", 0), ("min_tokens", 16),
    ("ignore_eos", True), ("ignore_eos", False),
    ("skip_special_tokens", False),
    ("n", 1),
]


@pytest.mark.parametrize("field,value", VALID, ids=[f"{f}={v!r}" for f, v in VALID])
def test_valid_value_accepted(field, value):
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == value


@pytest.mark.parametrize("temperature,greedy", [
    (0, True), (0.0, True), (1e-4, False), (0.7, False), (1.0, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


@pytest.mark.parametrize("given,expected", [
    ([1, 2, 3], (1, 2, 3)),
    ((7,), (7,)),
    ([], ()),
    (None, ()),
    (range(3), (0, 1, 2)),
    ([0], (0,)),
])
def test_stop_token_ids_become_tuple(given, expected):
    p = SamplingParams(stop_token_ids=given)
    assert isinstance(p.stop_token_ids, tuple)
    assert p.stop_token_ids == expected


def test_stop_token_ids_copied_from_caller_list():
    ids = [5, 6]
    p = SamplingParams(stop_token_ids=ids)
    ids.append(7)
    assert p.stop_token_ids == (5, 6)


def test_frozen():
    p = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 5
    assert p.temperature == 0.5
    # replace() re-validates.
    assert dataclasses.replace(p, top_k=3).top_k == 3
    with pytest.raises(ValueError):
        dataclasses.replace(p, top_k=-2)


def test_equal_params_are_equal_and_hashable():
    a = SamplingParams(temperature=0.5, stop_token_ids=[1, 2])
    b = SamplingParams(temperature=0.5, stop_token_ids=(1, 2))
    assert a == b and hash(a) == hash(b)
