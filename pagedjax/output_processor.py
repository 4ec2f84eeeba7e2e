"""Output processing after each step: every stop rule, detokenizing, logprobs.

The scheduler appends sampled tokens; this module then decides, for each sequence that got
one, whether it ends (EOS, stop token ids, max_tokens, max_model_len, stop strings),
extends its text and its logprobs, and records prompt logprobs of prefilled chunks. It
only reads and writes a request's output fields; ending a request (freeing its pages) is
the scheduler's, given the decisions returned here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .batching import needs_prompt_logprobs
from .outputs import Logprob
from .request import Request


@dataclass(frozen=True)
class StopDecision:
    """A request that ends after this step, and why (vLLM's finish/stop reasons)."""

    request: Request
    finish_reason: str  # "stop" or "length"
    stop_reason: Optional[int | str] = None  # the stop token id or string that fired


class OutputProcessor:
    """Applies one step's sampled tokens to their requests' outputs."""

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer  # None: no text, no stop strings
        self.max_model_len = max_model_len

    def process(self, scheduled: Sequence, logprobs: Any = None,
                prompt_logprobs: Any = None) -> list[StopDecision]:
        """Process the chunks of a step whose tokens the scheduler just appended (StepLogprobs
        rows follow the chunks); returns the requests that end now."""
        if prompt_logprobs is not None:
            self._add_prompt_logprobs(scheduled, prompt_logprobs)
        decisions = []
        for i, chunk in enumerate(scheduled):
            request = chunk.request
            if not chunk.samples or request.is_finished:  # aborted before its token came
                continue
            token = request.output_token_ids[-1]
            decision = self.check_stop(request, token)
            if logprobs is not None and request.sampling_params.logprobs is not None:
                self._add_logprobs(request, token, logprobs, i)
            if request.detokenizer is not None:
                decision = self._add_text(request, token, decision)
            if decision is not None:
                decisions.append(decision)
        return decisions

    def check_stop(self, request: Request, token_id: int) -> Optional[StopDecision]:
        """The decision `token_id` makes for `request` by tokens and lengths alone, or None.
        As in vLLM, a stop token id is its own stop_reason and EOS has none."""
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        past_min = num_output >= params.min_tokens
        if past_min and not params.ignore_eos and token_id in request.eos_token_ids:
            return StopDecision(request, "stop")
        if past_min and token_id in params.stop_token_ids:
            return StopDecision(request, "stop", token_id)
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return StopDecision(request, "length")
        if request.num_tokens >= self.max_model_len:
            return StopDecision(request, "length")
        return None

    def _add_text(self, request: Request, token: int,
                  decision: Optional[StopDecision]) -> Optional[StopDecision]:
        """Detokenize `token` and apply stop strings (vLLM semantics): a stop token's text
        is left out unless include_stop_str_in_output; a stop string is searched only where
        it could end in the new text, once min_tokens exist, and the text is cut before it
        (after it with include_stop_str_in_output) while token ids are kept."""
        params = request.sampling_params
        by_stop_token = decision is not None and decision.finish_reason == "stop"
        delta = ""
        if not by_stop_token or params.include_stop_str_in_output:
            delta = request.detokenizer.add(token)
        if decision is not None:
            delta += request.detokenizer.flush()
        request.output_text += delta
        if (by_stop_token or not params.stop or not delta
                or len(request.output_token_ids) < params.min_tokens):
            return decision
        match = find_stop_string(request.output_text, len(delta), params.stop)
        if match is None:
            return decision
        index, stop_str = match
        if params.include_stop_str_in_output:
            index += len(stop_str)
        request.output_text = request.output_text[:index]
        return StopDecision(request, "stop", stop_str)  # wins over a length stop

    def _entry(self, token: int, logprob: float, rank: int, top_ids, top_logprobs,
               k: int) -> dict:
        """{token_id: Logprob}: the given token first, then the k most likely ones."""
        entry = {token: Logprob(logprob, rank, self._decode_token(token))}
        for top_rank, (top_id, top_lp) in enumerate(zip(top_ids[:k].tolist(),
                                                        top_logprobs[:k].tolist())):
            if top_id not in entry:
                entry[top_id] = Logprob(float(top_lp), top_rank + 1, self._decode_token(top_id))
        return entry

    def _add_logprobs(self, request: Request, token: int, logprobs: Any, row: int) -> None:
        sampled = float(logprobs.sampled_logprob[row])
        entry = self._entry(token, sampled, int(logprobs.sampled_rank[row]),
                            logprobs.top_ids[row], logprobs.top_logprobs[row],
                            request.sampling_params.logprobs)
        if request.logprobs is None:
            request.logprobs, request.cumulative_logprob = [], 0.0
        request.logprobs.append(entry)
        request.cumulative_logprob += sampled

    def _add_prompt_logprobs(self, scheduled: Sequence, logprobs: Any) -> None:
        """Extend `request.prompt_logprobs` ([None] + one entry per prompt token after the
        first, vLLM's layout) with the positions each chunk covered; positions already
        recorded (a recompute after preemption) are not added again."""
        offset = 0
        for chunk in scheduled:
            request, start = chunk.request, chunk.start_position
            if needs_prompt_logprobs(chunk):
                prompt = request.prompt_token_ids
                if request.prompt_logprobs is None:
                    request.prompt_logprobs = [None]
                entries = request.prompt_logprobs
                for pos in range(start, min(start + chunk.num_new_tokens, len(prompt) - 1)):
                    if len(entries) != pos + 1:
                        continue
                    i = offset + pos - start
                    entries.append(self._entry(
                        prompt[pos + 1], float(logprobs.sampled_logprob[i]),
                        int(logprobs.sampled_rank[i]), logprobs.top_ids[i],
                        logprobs.top_logprobs[i], request.sampling_params.prompt_logprobs))
            offset += chunk.num_new_tokens

    def _decode_token(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])


def find_stop_string(text: str, num_new_chars: int,
                     stop: Sequence[str]) -> Optional[tuple[int, str]]:
    """The earliest stop string that ends within the last `num_new_chars` of `text`, as
    (start index, string); ties go to the one listed first."""
    best = None
    for stop_str in stop:
        start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    return best
