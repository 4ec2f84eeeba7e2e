"""The OpenAI-compatible FastAPI app: routes, auth, body limits and error bodies."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedjax

from .async_engine import AsyncEngine
from .errors import APIError, error_response
from .logprobs_format import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest)
from .serving import (check_n, collect, make_choices, new_id, resolve_max_tokens,
                      run_choices, sampling_params_for, usage)


@dataclass
class ServerState:
    """Everything the routes need; one per app (no globals)."""

    async_engine: AsyncEngine
    tokenizer: object
    served_model_names: tuple[str, ...]
    metrics: ServerMetrics
    api_key: Optional[str] = None
    chat_template: Optional[str] = None
    max_request_bytes: int = 1 << 20

    @property
    def engine(self):
        """The (single-threaded) engine; touch only what is safe from the event loop."""
        return self.async_engine.engine


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`'s engine."""
    app = FastAPI(title="pagedjax", version=pagedjax.__version__)
    app.state.server = state
    _install_middleware(app, state)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not state.async_engine.is_healthy:
            return error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedjax.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pagedjax",
             "max_model_len": state.engine.max_model_len}
            for name in state.served_model_names]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(state, body.model)
        if body.messages is not None:
            text = _render_chat(state, body.messages, body.add_generation_prompt, False, None)
            tokens = state.tokenizer.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            tokens = state.tokenizer.encode(body.prompt,
                                            add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "either prompt or messages is required", "prompt")
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(state, body.model)
        vocab = state.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        model = _check_model(state, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        check_n(body.n)
        prompts = _completion_prompts(state, body.prompt)
        max_len = state.engine.max_model_len
        params = [sampling_params_for(
            body, logprobs=body.logprobs, seed=body.seed,
            max_tokens=resolve_max_tokens(body.max_tokens, len(ids), max_len, 16, "max_tokens"))
            for ids, _ in prompts]
        request_id = new_id("cmpl")
        choices = make_choices(state.engine, prompts, body.n, params, request_id)
        created = int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created,
                "model": model}

        def choice_json(choice, text, token_ids, logprobs, finish_reason, stop_reason):
            return {"index": choice.index, "text": text,
                    "logprobs": completion_logprobs(logprobs, token_ids, state.tokenizer),
                    "finish_reason": finish_reason, "stop_reason": stop_reason}

        if body.stream:
            return _stream(state, base, choices, body, choice_json, first_delta=None)
        await collect(state.async_engine, choices, http.is_disconnected)
        return {**base, "choices": [choice_json(c, c.text, c.token_ids or [], c.logprobs,
                                                c.finish_reason, c.stop_reason)
                                    for c in choices],
                "usage": usage(choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        model = _check_model(state, body.model)
        check_n(body.n)
        top_logprobs = body.top_logprobs or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        text = _render_chat(state, body.messages, body.add_generation_prompt,
                            body.continue_final_message, body.chat_template)
        token_ids = state.tokenizer.encode(text, add_special_tokens=False)
        requested = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = resolve_max_tokens(requested, len(token_ids), state.engine.max_model_len,
                                        None, field)
        params = sampling_params_for(body, max_tokens=max_tokens, seed=body.seed,
                                     logprobs=top_logprobs if body.logprobs else None)
        request_id = new_id("chatcmpl")
        choices = make_choices(state.engine, [(token_ids, text)], body.n, [params],
                               request_id)
        base = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": model}

        def choice_json(choice, content, token_ids, logprobs, finish_reason, stop_reason,
                        key="message"):
            message = {"role": "assistant", "content": content} if key == "message" else (
                {"content": content} if content else {})
            return {"index": choice.index, key: message,
                    "logprobs": chat_logprobs(logprobs, token_ids, state.tokenizer,
                                              top_logprobs),
                    "finish_reason": finish_reason, "stop_reason": stop_reason}

        if body.stream:
            stream_base = {**base, "object": "chat.completion.chunk"}
            return _stream(state, stream_base, choices, body,
                           lambda *a: choice_json(*a, key="delta"),
                           first_delta=lambda c: {"index": c.index,
                                                  "delta": {"role": "assistant",
                                                            "content": ""},
                                                  "logprobs": None, "finish_reason": None})
        await collect(state.async_engine, choices, http.is_disconnected)
        return {**base, "choices": [choice_json(c, c.text, c.token_ids or [], c.logprobs,
                                                c.finish_reason, c.stop_reason)
                                    for c in choices],
                "usage": usage(choices)}

    return app


def _stream(state: ServerState, base: dict, choices, body, choice_json, first_delta):
    """Server-sent events: one chunk per update, a usage chunk if asked, then [DONE]."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        if first_delta is not None:
            for choice in choices:
                yield _sse({**base, "choices": [first_delta(choice)]})
        async for choice, update in run_choices(state.async_engine, choices):
            choice.apply(update)
            if not update.new_text and not update.finished and update.new_logprobs is None:
                continue
            chunk = choice_json(choice, update.new_text, update.new_token_ids,
                                update.new_logprobs, update.finish_reason,
                                update.stop_reason)
            yield _sse({**base, "choices": [chunk]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(choices)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _check_model(state: ServerState, model: Optional[str]) -> str:
    if model is None:
        return state.served_model_names[0]
    if model not in state.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist.", "model")
    return model


def _completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], Optional[str]]]:
    """A completion `prompt` (str, [str], [int], [[int]]) as (token ids, text) pairs."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for item in prompt:
        if isinstance(item, str):
            out.append((state.tokenizer.encode(item), item))
        else:
            out.append((list(item), None))
        if not out[-1][0]:
            raise APIError(400, "prompt must not be empty", "prompt")
    return out


def _render_chat(state: ServerState, messages, add_generation_prompt: bool,
                 continue_final_message: bool, chat_template: Optional[str]) -> str:
    conversation = [m.model_dump(exclude_none=True) for m in messages]
    for message in conversation:
        if isinstance(message.get("content"), list):  # [{"type": "text", "text": ...}]
            message["content"] = "".join(part.get("text", "") for part in message["content"])
    try:
        return state.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template or state.chat_template)
    except ValueError as error:
        raise APIError(400, str(error), "messages") from None


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413, whether it announces
    its length or streams in chunks (then it is cut off as soon as it grows too big)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than {self.max_bytes} bytes"
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, message)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes HTTPExceptions raised while reading the body through.
                    raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


def _install_middleware(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(BodySizeLimit, max_bytes=state.max_request_bytes)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return error_response(401, "Unauthorized: a valid API key is required")
        return await call_next(request)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request body')}"
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(error).__name__}: {error}")
