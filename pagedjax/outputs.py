"""Result objects with vLLM's names: RequestOutput holding CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """One token's log probability (by default raw: log_softmax of the model's logits; see
    EngineConfig.logprobs_mode), its rank among the vocabulary (1 = most likely) and its
    text (None without a tokenizer)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    """One generated continuation of a prompt.

    With `SamplingParams.logprobs=k`, `logprobs` holds one dict per generated token,
    {token_id: Logprob}, with the sampled token plus the k most likely ones, and
    `cumulative_logprob` the sum of the sampled tokens' logprobs; both None otherwise.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None  # "stop", "length" or "abort"
    stop_reason: Optional[int | str] = None

    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock milestones of a request (time.monotonic seconds)."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> Optional[float]:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """Everything generated for one prompt, in the order prompts were given.

    `prompt_index` is the prompt's position in the list given to `generate` /
    `generate_stream` (streamed outputs of different prompts interleave; map them back
    with it). In a DELTA stream, `outputs[0].text` / `.token_ids` hold only what is new.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default=None)
    prompt_index: Optional[int] = None
    # With SamplingParams.prompt_logprobs=k: one entry per prompt token, None for the
    # first, then {token_id: Logprob} with the prompt token plus the k most likely ones.
    prompt_logprobs: Optional[list] = None
    # Prompt tokens whose KV came from the prefix cache (vLLM's field).
    num_cached_tokens: int = 0
