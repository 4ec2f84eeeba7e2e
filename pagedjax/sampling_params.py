"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


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

    def __post_init__(self):
        _check_int("n", self.n, minimum=1)
        if self.n != 1:
            raise ValueError("n: only n=1 is supported so far (parallel sampling is planned)")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be < 2**63, got {self.seed}")
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

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0


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


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
