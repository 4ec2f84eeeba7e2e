"""What front ends show of running requests: deltas with held-back text, and RequestOutputs.

`LLM.generate` / `generate_stream` and the server's async engine both follow requests
through this module, so text is held back, split into deltas and finished the same way
offline and served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .request import Request

OUTPUT_KINDS = ("delta", "cumulative", "final")  # vLLM's RequestOutputKind


@dataclass(frozen=True)
class SequenceDelta:
    """What is new in one sequence since the last delta of it."""

    index: int  # the sequence's completion index (its child index when n > 1)
    new_token_ids: list[int]
    new_text: str
    new_logprobs: Optional[list]  # one {token_id: Logprob} per new token, when asked
    finished: bool
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]
    num_prompt_tokens: int
    num_output_tokens: int
    first_token: int  # index of new_token_ids[0] in the sequence's output
    text_so_far: str  # every visible character up to the end of new_text


class DeltaTracker:
    """Remembers how much of each sequence was shown; gives what is new."""

    def __init__(self):
        self._shown: dict[int, tuple[int, int]] = {}  # id(seq) -> (tokens, characters)

    def delta(self, seq: Request) -> Optional[SequenceDelta]:
        """What `seq` has new since its last delta, or None when nothing is. While it runs,
        the last `stop_holdback` characters stay hidden: a stop string could still cut
        them, and streamed text is never taken back."""
        tokens_done, chars_done = self._shown.get(id(seq), (0, 0))
        finished = seq.is_finished
        text = seq.output_text
        visible = len(text)
        if not finished:
            visible = max(chars_done, visible - seq.sampling_params.stop_holdback)
        num_tokens = len(seq.output_token_ids)
        if not finished and num_tokens == tokens_done and visible == chars_done:
            return None
        if finished:
            self._shown.pop(id(seq), None)
        else:
            self._shown[id(seq)] = (num_tokens, visible)
        new_logprobs = None
        if seq.sampling_params.logprobs is not None:
            new_logprobs = list((seq.logprobs or [])[tokens_done:])
        return SequenceDelta(
            index=seq.child_index, new_token_ids=list(seq.output_token_ids[tokens_done:]),
            new_text=text[chars_done:visible], new_logprobs=new_logprobs, finished=finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_token_ids), num_output_tokens=num_tokens,
            first_token=tokens_done, text_so_far=text[:visible])


def sequences(request: Request) -> list[Request]:
    """The sequences of one prompt: the request itself, or its n sequences when n > 1."""
    return request.sequences or [request]


class OutputStream:
    """Follows the requests of one `generate` call and turns each step's changes into
    RequestOutputs of one kind: "delta" (only what is new), "cumulative" (everything so
    far) or "final" (one per prompt, with all its completions, once all finished)."""

    def __init__(self, output_kind: str):
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.output_kind = output_kind
        self._deltas = DeltaTracker()
        # sequence request_id -> (prompt index, parent request, sequence), unfinished
        self._pending: dict[str, tuple[int, Request, Request]] = {}

    def add(self, request: Request, prompt_index: int) -> None:
        """Follow `request` (and its parallel sequences), the prompt at `prompt_index`."""
        for seq in sequences(request):
            self._pending[seq.request_id] = (prompt_index, request, seq)

    @property
    def unfinished_ids(self) -> list[str]:
        """Request ids of the sequences not finished yet."""
        return list(self._pending)

    def outputs(self, changed: Iterable[Request]) -> list[tuple[RequestOutput, bool]]:
        """RequestOutputs for the followed sequences among `changed` (and any that ended
        elsewhere, e.g. aborted), each with True when it completes its prompt."""
        by_id: dict[str, Request] = {}
        for request in changed:
            if request.request_id in self._pending:
                by_id.setdefault(request.request_id, request)
        for request_id, (_, _, seq) in self._pending.items():
            if seq.is_finished:
                by_id.setdefault(request_id, seq)
        results = []
        for request_id, seq in by_id.items():
            index, parent, _ = self._pending[request_id]
            if seq.is_finished:
                del self._pending[request_id]
            group_done = not any(s.request_id in self._pending for s in sequences(parent))
            output = self._output(seq, parent, index, group_done)
            if output is not None:
                results.append((output, seq.is_finished and group_done))
        return results

    def _output(self, seq: Request, parent: Request, index: int,
                group_done: bool) -> Optional[RequestOutput]:
        group = sequences(parent)
        if self.output_kind == "final":
            if not (seq.is_finished and group_done):
                return None
            output = to_request_output(parent, index)
            if len(group) > 1:
                output.outputs = [to_request_output(s, index).outputs[0] for s in group]
            return output
        delta = self._deltas.delta(seq)
        if delta is None:
            return None
        if self.output_kind == "cumulative":
            output = to_request_output(seq, index, text=delta.text_so_far)
        else:
            output = to_request_output(seq, index, text=delta.new_text,
                                       token_ids=delta.new_token_ids,
                                       logprobs_from=delta.first_token)
        if len(group) > 1:
            output.request_id = parent.request_id
            output.finished = seq.is_finished and group_done
        return output


def to_request_output(request: Request, prompt_index: Optional[int] = None,
                      text: Optional[str] = None, token_ids: Optional[Sequence[int]] = None,
                      logprobs_from: int = 0) -> RequestOutput:
    """`request` as a RequestOutput; `text` / `token_ids` replace the full ones (deltas),
    and a delta's logprobs are those of its tokens (from index `logprobs_from` on);
    `cumulative_logprob` is always the running total."""
    params = request.sampling_params
    logprobs = None
    if params.logprobs is not None:
        logprobs = list((request.logprobs or [])[logprobs_from:])
    cumulative = request.cumulative_logprob
    if cumulative is None and params.logprobs is not None:
        cumulative = 0.0
    completion = CompletionOutput(
        index=request.child_index, text=request.output_text if text is None else text,
        token_ids=list(request.output_token_ids if token_ids is None else token_ids),
        cumulative_logprob=cumulative, logprobs=logprobs,
        finish_reason=request.finish_reason, stop_reason=request.stop_reason)
    metrics = RequestMetrics(arrival_time=request.arrival_time,
                             first_scheduled_time=request.first_scheduled_time,
                             first_token_time=request.first_token_time,
                             finished_time=request.finished_time,
                             num_preemptions=request.num_preemptions)
    prompt_logprobs = None
    if params.prompt_logprobs is not None:
        prompt_logprobs = list(request.prompt_logprobs or [None])
    return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                         prompt_token_ids=list(request.prompt_token_ids),
                         outputs=[completion], finished=request.is_finished,
                         metrics=metrics, prompt_index=prompt_index,
                         prompt_logprobs=prompt_logprobs,
                         num_cached_tokens=request.num_cached_tokens or 0)
