"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20  # most top logprobs per token; the jitted step always computes this many
# The device holds every integer option (and token id) in int32 arrays and every float one
# in float32: values outside these ranges are rejected here, before a step could overflow.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32; below it precision is gone
MIN_TEMPERATURE = 1e-5  # smaller positive ones overflow float32 logits (vLLM's sampling eps)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls, validated at construction.

    Defaults follow vLLM: `temperature=1.0`, `top_p=1.0`, `top_k=0` (disabled; -1 is
    accepted too), `min_p=0.0`, `max_tokens=16`. `temperature=0` means greedy.
    `max_tokens=None` generates until EOS or `max_model_len`.
    `stop` strings end generation when they appear in the output text, which is cut just
    before the stop string (just after it with `include_stop_str_in_output`); the token ids
    are kept as generated. Like EOS and `stop_token_ids`, stop strings are only checked
    once `min_tokens` tokens exist.
    `seed` makes a request's random draws depend only on (seed, token index), never on the
    rest of the batch; without it the engine derives one from its own seed and the
    request's arrival order.
    `repetition_penalty` (HF semantics, over prompt + output tokens: a positive logit is
    divided by it, a negative one multiplied), `presence_penalty` and `frequency_penalty`
    (over output tokens: logit -= presence * (count > 0) + frequency * count),
    `logit_bias` (token id -> value added to its logit; stored as a sorted tuple of
    pairs) and `allowed_token_ids` (only these can be sampled) apply before temperature,
    to greedy requests too, in vLLM's order: allowed, bias, repetition, frequency/presence.
    `bad_words` (needs a tokenizer) are tokenized as vLLM does, with and without a leading
    space; a bad word's last token is banned whenever the output ends with its other tokens.
    `logprobs=k` (0..MAX_LOGPROBS=20) returns, for every generated token, the sampled
    token's logprob and rank plus the k most likely tokens. As in vLLM v1, these are RAW
    logprobs: log_softmax of the model's logits, before penalties, bias and temperature
    (unless the engine's `logprobs_mode` asks for processed ones, or logits).
    `prompt_logprobs=k` (0..20) returns, for each prompt token after the first, its raw
    logprob given the tokens before it (and its rank) plus the k most likely tokens there
    (RequestOutput.prompt_logprobs: a list aligned with the prompt, first entry None).
    `skip_special_tokens` drops special tokens from the output text;
    `spaces_between_special_tokens` (only matters with skip_special_tokens=False) puts a
    space between a special token's text and the text around it, vLLM's slow-tokenizer rule.
    Integer options must fit int32 and float ones float32 (the device's dtypes); `top_k`
    is also checked against the model's vocabulary when a request is built, as are token
    ids (`stop_token_ids`, `logit_bias`, `allowed_token_ids`). A positive `temperature`
    must be at least 1e-5 (use 0 for greedy).
    `n > 1` (parallel sampling) samples n completions of one prompt whose prompt KV is
    computed once and shared (copy-on-write); completion i draws with the seed
    `pagedjax.parallel_sampling.child_seed(seed, i)`, so it equals an n=1 request with that
    seed.
    `structured_outputs` (a StructuredOutputsParams: JSON schema, regex, choice, grammar or
    any JSON object) constrains what is generated: tokens the constraint refuses are
    masked out before penalties and sampling (structured_outputs.py); logprobs stay raw.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    skip_special_tokens: bool = True
    stop: Optional[Union[str, list[str], tuple[str, ...]]] = None
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Union[dict[int, float], tuple[tuple[int, float], ...]]] = None
    allowed_token_ids: Optional[Union[list[int], tuple[int, ...]]] = None
    bad_words: Optional[Union[list[str], tuple[str, ...]]] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    spaces_between_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None

    def __post_init__(self):
        _check_int("n", self.n, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(
                f"skip_special_tokens must be a bool, got {self.skip_special_tokens!r}")
        try:
            stop_ids = tuple(self.stop_token_ids or ())
        except TypeError:
            raise ValueError(
                f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}") from None
        for token_id in stop_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        object.__setattr__(self, "stop_token_ids", stop_ids)
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a bool, "
                             f"got {self.include_stop_str_in_output!r}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids",
                           _normalize_allowed(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", _normalize_bad_words(self.bad_words))
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS} (the most top "
                                 f"logprobs returned per token), got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be <= {MAX_LOGPROBS}, "
                                 f"got {self.prompt_logprobs}")
        if not isinstance(self.spaces_between_special_tokens, bool):
            raise ValueError(f"spaces_between_special_tokens must be a bool, "
                             f"got {self.spaces_between_special_tokens!r}")
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}")

    @property
    def uses_penalties(self) -> bool:
        """True when any penalty, logit_bias or allowed_token_ids is set."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.logit_bias is not None
                or self.allowed_token_ids is not None or self.bad_words is not None)

    def check_token_ids(self, vocab_size: int,
                        tokenizer: Any = None) -> tuple[tuple[int, ...], ...]:
        """Reject logit_bias / allowed_token_ids / stop_token_ids ids outside
        [0, vocab_size); return the bad words' token id sequences (vLLM's tokenization: each
        word as given and with one leading space, the latter only when it gives a different
        first token and the same length)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias or ()]),
                          ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("stop_token_ids", self.stop_token_ids)):
            for token in ids:
                if token >= vocab_size:
                    raise ValueError(f"{name}: token id {token} is outside the "
                                     f"vocabulary [0, {vocab_size})")
        if not self.bad_words:
            return ()
        if tokenizer is None:
            raise ValueError("bad_words: bad words need a tokenizer, and this engine has none")
        sequences: list[tuple[int, ...]] = []
        for word in self.bad_words:
            plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            if plain:
                sequences.append(plain)
            spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                sequences.append(spaced)
        for ids in sequences:
            for token in ids:
                if not 0 <= token < vocab_size:
                    raise ValueError(f"bad_words: token id {token} is outside the "
                                     f"vocabulary [0, {vocab_size})")
        return tuple(sequences)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0

    @property
    def stop_holdback(self) -> int:
        """Characters of streamed text to hold back while a request runs: a stop string is
        cut at its start, which can lie up to len(stop) - 1 characters back in text that
        has already been produced."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(stop) for stop in self.stop) - 1


def _normalize_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must hold strings, got {s!r}")
        if not s:
            raise ValueError("stop: stop strings must be non-empty")
    return tuple(stop)


def _normalize_logit_bias(bias) -> Optional[tuple[tuple[int, float], ...]]:
    if bias is None:
        return None
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)):
        items = list(bias)
        if not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in items):
            raise ValueError(f"logit_bias must map token ids to floats, got {bias!r}")
    else:
        raise ValueError(f"logit_bias must be a dict of token id -> float, got {bias!r}")
    out = {}
    for token, value in items:
        if isinstance(token, str) and token.lstrip("-").isdigit():
            token = int(token)  # JSON object keys arrive as strings
        _check_int("logit_bias", token, minimum=0)
        _check_number("logit_bias", value)
        out[int(token)] = float(value)
    return tuple(sorted(out.items())) or None


def _normalize_bad_words(words) -> Optional[tuple[str, ...]]:
    if words is None:
        return None
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, (list, tuple)):
        raise ValueError(f"bad_words must be a list of strings, got {words!r}")
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"bad_words must hold non-empty strings, got {word!r}")
    return tuple(words) or None


def _normalize_allowed(allowed) -> Optional[tuple[int, ...]]:
    if allowed is None:
        return None
    if isinstance(allowed, (str, bytes)) or not isinstance(allowed, (list, tuple)):
        raise ValueError(f"allowed_token_ids must be a list of ints, got {allowed!r}")
    if not allowed:
        raise ValueError("allowed_token_ids: the list is empty (nothing could be sampled)")
    for token in allowed:
        _check_int("allowed_token_ids", token, minimum=0)
    return tuple(sorted(set(int(t) for t in allowed)))


def _check_int(name: str, value, minimum: int, maximum: int = INT32_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:
        raise ValueError(f"{name} must fit in float32 (0 or a magnitude in "
                         f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}]), got {value!r}")
