"""Request: one sequence's host-side state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A prompt being generated for. Built by the input processor; its scheduling state
    (status, pages, computed and output tokens) is the scheduler's to change, its output
    fields (text, logprobs) the output processor's.

    `num_computed_tokens` counts tokens whose K/V are in the cache. After a preemption by
    recompute it drops to 0 and prompt + output tokens are prefilled again.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int] = frozenset()
    prompt: Optional[str] = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None  # the stop token id or stop string that fired
    output_text: str = ""  # detokenized output, cut at a matched stop string
    detokenizer: Optional[Any] = None  # an IncrementalDetokenizer (None: no tokenizer)
    num_preemptions: int = 0
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # from SamplingParams.bad_words
    # With SamplingParams.logprobs: one {token_id: Logprob} per output token, and the sum
    # of the sampled tokens' logprobs (both filled by the output processor).
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    # With SamplingParams.prompt_logprobs: [None] + one {token_id: Logprob} per prompt
    # token after the first, filled chunk by chunk as the prompt is prefilled.
    prompt_logprobs: Optional[list] = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    # Parallel sampling (SamplingParams.n > 1): the parent (child_index 0) holds all n
    # sequences in `sequences` and, until its prompt is prefilled, the n - 1 children not
    # yet forked in `pending_children`. Each child is a Request of its own.
    child_index: int = 0
    sequences: list = field(default_factory=list)
    pending_children: list = field(default_factory=list)
    # Prefix caching: the keys of the request's full pages (prefix_cache.PrefixCache,
    # computed for weights version `block_hashes_version`), the weights version its cached
    # KV was computed with (-1: none yet), and how many prompt tokens its first admission
    # found in the cache (vLLM's num_cached_tokens).
    block_hashes: list = field(default_factory=list)
    block_hashes_version: int = -1
    kv_weights_version: int = -1
    num_cached_tokens: Optional[int] = None
    # Keep the KV pages when the request finishes (not when it is aborted), so that
    # Engine.fork_request can continue from them, until Engine.release_request frees them.
    retain_blocks: bool = False
    # With SamplingParams.structured_outputs: this sequence's structured_outputs.GrammarState
    # (its own, a parallel-sampling child's included), following output_token_ids.
    grammar: Optional[Any] = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt tokens followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """True once a stop condition fired or the request was aborted."""
        return self.status is RequestStatus.FINISHED
