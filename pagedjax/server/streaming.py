"""Server-sent events for streamed completions: a chunk per update, the usage chunk if
asked, then `data: [DONE]`; a failure after the first byte is sent as an OpenAI error
event before the [DONE] (the status line has gone out already)."""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Awaitable, Callable, Optional, Sequence

from fastapi.responses import StreamingResponse

from .errors import APIError, error_body
from .request_stream import RequestHandle
from .serving import Choice, run_choices, usage

logger = logging.getLogger("pagedjax.server")


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


def stream_response(handles: Sequence[RequestHandle], choices: Sequence[Choice], base: dict,
                    choice_json: Callable, first_delta: Optional[Callable],
                    include_usage: bool,
                    disconnected: Callable[[], Awaitable[None]]) -> StreamingResponse:
    """The event stream of accepted requests `handles` producing `choices`: chunks are
    `base` plus one choice made by `choice_json(choice, text, token_ids, logprobs,
    finish_reason, stop_reason)`; `first_delta(choice)` (chat) opens each choice."""

    async def events():
        try:
            if first_delta is not None:
                for choice in choices:
                    yield sse({**base, "choices": [first_delta(choice)]})
            async with aclosing(run_choices(handles, choices, disconnected)) as updates:
                async for choice, update in updates:
                    choice.apply(update)
                    if (not update.new_text and not update.finished
                            and update.new_logprobs is None):
                        continue
                    chunk = choice_json(choice, update.new_text, update.new_token_ids,
                                        update.new_logprobs, update.finish_reason,
                                        update.stop_reason)
                    yield sse({**base, "choices": [chunk]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(choices)})
        except APIError as error:
            if error.status == 499:  # the client left: nobody to tell
                return
            yield sse(error_body(error.status, error.message, error.param))
        except Exception as error:  # noqa: BLE001 - reported in-stream, then [DONE]
            logger.exception("stream failed")
            yield sse(error_body(500, f"internal error: {type(error).__name__}: {error}"))
        yield "data: [DONE]\n\n"

    return _EventStream(events(), handles)


class _EventStream(StreamingResponse):
    """A StreamingResponse that aborts its requests however it ends, even when the client
    leaves before the first event (then the generator above never starts)."""

    def __init__(self, content, handles: Sequence[RequestHandle]):
        super().__init__(content, media_type="text/event-stream")
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.close()
