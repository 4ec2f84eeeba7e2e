"""What the scheduler decides for one step: which requests run, and their token ranges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: `num_new_tokens` tokens from `start_position` on.

    `samples` is fixed at scheduling time: True when this chunk reaches the end of the
    request's known tokens, so the step produces a new token for it (a decode, or the last
    prefill chunk). Earlier prefill chunks only fill the KV cache.
    """

    request: Request
    num_new_tokens: int
    start_position: int
    samples: bool = field(init=False)
    # A just-forked parallel-sampling child: no tokens of its own this step; it samples
    # its first token from the logits of `logits_source` (its parent's last prompt token).
    logits_source: Optional[Request] = None

    def __post_init__(self):
        end = self.start_position + self.num_new_tokens
        object.__setattr__(self, "samples", end == self.request.num_tokens)

    @property
    def token_ids(self) -> list[int]:
        """The token ids fed to the model for this request this step."""
        end = self.start_position + self.num_new_tokens
        return self.request.all_token_ids[self.start_position:end]

    @property
    def seq_len(self) -> int:
        """Context length after this step (tokens whose K/V will be in the cache)."""
        return self.start_position + self.num_new_tokens


@dataclass
class SchedulerOutput:
    """What one `Scheduler.schedule()` call decided.

    `scheduled` lists running requests first (decodes and continuing prefill chunks, in
    admission order), then newly admitted ones. `preempted` are the requests sent back to
    the waiting queue this step. `finished` are requests the scheduler had to end itself
    because a single sequence outgrew the whole KV pool (finish_reason "length"); `update`
    returns them too, so pass every output to `update`, even an empty one.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    # Copy-on-write page copies (src, dst) to run on the device before this step.
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Total tokens fed to the model this step."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_seqs(self) -> int:
        """Sequences in this step's batch."""
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run on the device."""
        return not self.scheduled
