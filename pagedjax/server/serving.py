"""Turning OpenAI requests into engine requests, and running them (streamed or not)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from contextlib import aclosing
from dataclasses import dataclass, fields
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence

from pagedjax.output_stream import SequenceDelta
from pagedjax.request import Request
from pagedjax.sampling_params import SamplingParams
from pagedjax.structured_outputs import StructuredOutputsParams

from .async_engine import AsyncEngine
from .errors import APIError, param_of
from .request_stream import RequestHandle

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} | {"max_completion_tokens",
                                                                "top_logprobs", "prompt",
                                                                "messages"}
MAX_N = 16


@dataclass
class Choice:
    """One completion being produced: its index, and its text / tokens so far. `request`
    is its prompt's engine request (all n completions of a prompt share it)."""

    index: int
    prompt_index: int
    request: Request
    text: str = ""
    token_ids: list = None
    logprobs: list = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None

    def apply(self, update: SequenceDelta) -> None:
        """Fold an engine update into this choice."""
        self.text += update.new_text
        self.token_ids = (self.token_ids or []) + update.new_token_ids
        if update.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + update.new_logprobs
        if update.finished:
            self.finish_reason = update.finish_reason
            self.stop_reason = update.stop_reason


def new_id(prefix: str) -> str:
    """An OpenAI-looking id, e.g. cmpl-3f2a..."""
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params_for(body, *, max_tokens: Optional[int], logprobs: Optional[int],
                        seed: Optional[int],
                        structured_outputs: Optional[StructuredOutputsParams] = None,
                        ) -> SamplingParams:
    """SamplingParams from an OpenAI body (its output constraint already made:
    server/structured.py); invalid values raise APIError(400) naming them."""
    logit_bias = None
    if body.logit_bias:
        try:
            logit_bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from None
    optional = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "min_p": body.min_p, "repetition_penalty": body.repetition_penalty}
    try:
        return SamplingParams(
            max_tokens=max_tokens, seed=reduce_seed(seed), stop=body.stop,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=logit_bias, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
            stop_token_ids=body.stop_token_ids or (), logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            structured_outputs=structured_outputs,
            **{k: v for k, v in optional.items() if v is not None})
    except ValueError as error:
        raise APIError(400, str(error), param_of(str(error), _SAMPLING_FIELDS)) from None


def reduce_seed(seed: Optional[int]) -> Optional[int]:
    """An OpenAI seed (any signed 64-bit int, as vLLM takes) reduced to SamplingParams'
    range [0, 2**63); APIError(400) outside int64."""
    if seed is None:
        return None
    if not -2**63 <= seed < 2**63:
        raise APIError(400, f"seed must fit in a signed 64-bit integer, got {seed}", "seed")
    return seed % 2**63


def check_n(n: int, num_prompts: int = 1, max_sequences: Optional[int] = None) -> None:
    """Reject an `n` outside 1..MAX_N, or prompts x n over `max_sequences`."""
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {n}", "n")
    if max_sequences is not None and num_prompts * n > max_sequences:
        raise APIError(400, f"prompt: {num_prompts} prompts x n={n} = {num_prompts * n} "
                            f"sequences, more than this server takes in one request "
                            f"({max_sequences})", "prompt" if num_prompts > 1 else "n")


def resolve_max_tokens(requested: Optional[int], prompt_len: int, max_model_len: int,
                       default: Optional[int], field: str) -> Optional[int]:
    """The max_tokens to use; a request that can't fit the context is a 400 (as vLLM)."""
    if prompt_len >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} "
                            f"tokens. However, your prompt has {prompt_len} tokens.", "prompt")
    if requested is None:
        return default
    if requested < 1:
        raise APIError(400, f"{field} must be at least 1, got {requested}", field)
    if prompt_len + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} "
                            f"tokens. However, you requested {prompt_len + requested} tokens "
                            f"({prompt_len} in the prompt, {requested} in the completion).",
                       field)
    return requested


def make_choices(engine, prompts: Sequence[tuple[list[int], Optional[str]]], n: int,
                 params: Sequence[SamplingParams], request_prefix: str) -> list[Choice]:
    """One Choice per (prompt, sample); choice i of prompt p has index p * n + i.

    Each prompt is one engine request with `n` sequences: the prompt is prefilled once
    and its pages shared, and with a seed sample i uses `child_seed(seed, i)`, as
    `LLM.generate` gives for `SamplingParams(n=n, seed=seed)` offline."""
    choices = []
    for prompt_index, ((token_ids, text), sampling) in enumerate(zip(prompts, params)):
        try:
            request = engine.make_request(token_ids, dataclasses.replace(sampling, n=n),
                                          prompt=text,
                                          request_id=f"{request_prefix}-{prompt_index}")
        except ValueError as error:
            raise APIError(400, str(error), param_of(str(error), _SAMPLING_FIELDS)) from None
        choices += [Choice(index=prompt_index * n + i, prompt_index=prompt_index,
                           request=request) for i in range(n)]
    return choices


async def start_choices(async_engine: AsyncEngine, choices: Sequence[Choice]
                        ) -> list[RequestHandle]:
    """Hand every prompt's request to the engine; returns once all were accepted (they
    batch together), or raises the first refusal (an APIError) with none left running."""
    requests = {}
    for choice in choices:
        requests.setdefault(choice.prompt_index, choice.request)
    added = await asyncio.gather(*[async_engine.add_request(r) for r in requests.values()],
                                 return_exceptions=True)
    handles = [h for h in added if isinstance(h, RequestHandle)]
    for outcome in added:
        if isinstance(outcome, BaseException):
            for handle in handles:
                handle.close()
            raise outcome
    return handles


async def run_choices(handles: Sequence[RequestHandle], choices: Sequence[Choice],
                      disconnected: Optional[Callable[[], Awaitable[None]]] = None
                      ) -> AsyncIterator[tuple[Choice, SequenceDelta]]:
    """Yield (choice, delta) as the accepted requests' deltas arrive. Closing this early,
    an engine error, or `disconnected()` returning (the client left: APIError 499)
    aborts every request still running."""
    by_prompt: dict[int, list[Choice]] = {}
    for choice in choices:
        by_prompt.setdefault(choice.prompt_index, []).append(choice)
    updates: asyncio.Queue = asyncio.Queue()

    async def pump(handle: RequestHandle, group: list[Choice]) -> None:
        try:
            async for delta in handle:
                await updates.put((group[delta.index], delta))
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            await updates.put((group[0], error))
        finally:
            handle.close()

    tasks = [asyncio.create_task(pump(h, g)) for h, g in zip(handles, by_prompt.values())]
    gone = asyncio.ensure_future(disconnected() if disconnected else asyncio.Event().wait())
    try:
        remaining = len(choices)
        while remaining:
            get = asyncio.ensure_future(updates.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise APIError(499, "client disconnected")
            choice, update = get.result()
            if isinstance(update, Exception):
                raise update
            if update.finished:
                remaining -= 1
            yield choice, update
    finally:
        gone.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(gone, *tasks, return_exceptions=True)
        for handle in handles:
            handle.close()


async def collect(handles: Sequence[RequestHandle], choices: Sequence[Choice],
                  disconnected: Callable[[], Awaitable[None]]) -> None:
    """Run choices to completion, folding updates into them; every request is aborted if
    `disconnected()` returns first (the client went away)."""
    async with aclosing(run_choices(handles, choices, disconnected)) as updates:
        async for choice, update in updates:
            choice.apply(update)


def usage(choices: Sequence[Choice]) -> dict:
    """OpenAI `usage`: prompt tokens counted once per prompt, completion tokens summed;
    `prompt_tokens_details.cached_tokens`: prompt tokens read from the prefix cache."""
    requests = {choice.prompt_index: choice.request for choice in choices}
    prompt = sum(len(r.prompt_token_ids) for r in requests.values())
    cached = sum(r.num_cached_tokens or 0 for r in requests.values())
    completion = sum(len(choice.token_ids or []) for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
