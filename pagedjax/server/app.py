"""The OpenAI-compatible FastAPI app: its routes (middleware in middleware.py, error
bodies in errors.py, streaming in streaming.py)."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response

import pagedjax
from pagedjax.sampling_params import MAX_LOGPROBS

from .async_engine import AsyncEngine
from .config import ServerConfig
from .errors import APIError, error_response, install_error_handlers
from .logprobs_format import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .control import CONTROL_PATHS, add_control_routes
from .middleware import ApiKeyAuth, ErrorBoundary, RequestLimits
from .prompts import completion_prompts, count_prompts, encode, reject_lone_surrogates
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest)
from .serving import (check_n, collect, make_choices, new_id, resolve_max_tokens,
                      sampling_params_for, start_choices, usage)
from .streaming import stream_response
from .structured import check_constraint, requested_constraint
from .templates import ChatRenderer
from .tools import AssistantReplies, plan_tools


@dataclass
class ServerState:
    """Everything the routes need; one per app (no globals)."""

    async_engine: AsyncEngine
    tokenizer: object
    served_model_names: tuple[str, ...]
    metrics: ServerMetrics
    chat: ChatRenderer
    api_key: Optional[str] = None
    config: ServerConfig = field(default_factory=ServerConfig)

    @property
    def engine(self):
        """The (single-threaded) engine; touch only what is safe from the event loop."""
        return self.async_engine.engine


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`'s engine."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await state.chat.close()

    app = FastAPI(title="pagedjax", version=pagedjax.__version__, lifespan=lifespan)
    app.state.server = state
    # Outermost last: the error boundary, then auth, then the body limits.
    app.add_middleware(RequestLimits, max_bytes=state.config.max_request_bytes,
                       read_timeout_s=state.config.request_read_timeout_s)
    app.add_middleware(ApiKeyAuth, api_key=state.api_key, paths=CONTROL_PATHS)
    app.add_middleware(ErrorBoundary)
    install_error_handlers(app)
    if state.config.enable_control_endpoints:
        add_control_routes(app, state)

    @app.get("/health")
    async def health() -> Response:
        engine = state.async_engine
        if engine.failure is not None:
            return error_response(503, f"the engine failed: {engine.failure}")
        if not engine.is_healthy:
            return error_response(503, "the engine is not running (shutting down)")
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
        reject_lone_surrogates(body.model_dump())
        _check_model(state, body.model)
        if body.messages is not None:
            text = await state.chat.render(
                body.messages, add_generation_prompt=body.add_generation_prompt,
                tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []] or None)
            tokens = await encode(state.tokenizer, text, "messages", add_special_tokens=False)
        elif body.prompt is not None:
            tokens = await encode(state.tokenizer, body.prompt, "prompt",
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
        decode = state.tokenizer.decode
        if len(body.tokens) > 4096:  # a long list: decoded off the event loop
            return {"prompt": await asyncio.to_thread(decode, body.tokens,
                                                      skip_special_tokens=False)}
        return {"prompt": decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        reject_lone_surrogates(body.model_dump())
        model = _check_model(state, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        check_n(body.n, count_prompts(body.prompt), state.config.max_sequences_per_request)
        prompts = await completion_prompts(state.tokenizer, body.prompt)
        max_len = state.engine.max_model_len
        constraint, constraint_field = requested_constraint(body)
        check_constraint(state.engine, constraint, constraint_field)
        params = [sampling_params_for(
            body, logprobs=body.logprobs, seed=body.seed, structured_outputs=constraint,
            max_tokens=resolve_max_tokens(body.max_tokens, len(ids), max_len, 16, "max_tokens"))
            for ids, _ in prompts]
        request_id = new_id("cmpl")
        choices = make_choices(state.engine, prompts, body.n, params, request_id)
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": model}

        def choice_json(choice, text, token_ids, logprobs, finish_reason, stop_reason):
            return {"index": choice.index, "text": text,
                    "logprobs": completion_logprobs(logprobs, token_ids, state.tokenizer),
                    "finish_reason": finish_reason, "stop_reason": stop_reason}

        handles = await start_choices(state.async_engine, choices)
        if body.stream:
            return stream_response(handles, choices, base, choice_json, None,
                                   _include_usage(body), _disconnect_waiter(http))
        await collect(handles, choices, _disconnect_waiter(http))
        return {**base, "choices": [choice_json(c, c.text, c.token_ids or [], c.logprobs,
                                                c.finish_reason, c.stop_reason)
                                    for c in choices],
                "usage": usage(choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        reject_lone_surrogates(body.model_dump())
        model = _check_model(state, body.model)
        check_n(body.n, 1, state.config.max_sequences_per_request)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                                f"{body.top_logprobs}", "top_logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        top_logprobs = body.top_logprobs or 0
        tools = plan_tools(body)
        constraint, constraint_field = requested_constraint(body)
        if tools.constraint is not None:
            if constraint is not None:
                raise APIError(400, f"{constraint_field} cannot be combined with a "
                                    f"{tools.mode} tool_choice", constraint_field)
            constraint, constraint_field = tools.constraint, "tools"
        check_constraint(state.engine, constraint, constraint_field)
        text = await state.chat.render(body.messages,
                                       add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message,
                                       request_template=body.chat_template,
                                       tools=tools.template_tools)
        token_ids = await encode(state.tokenizer, text, "messages", add_special_tokens=False)
        # max_completion_tokens wins over the deprecated max_tokens; 0 is a value (a 400).
        field_name = ("max_tokens" if body.max_completion_tokens is None
                      else "max_completion_tokens")
        requested = getattr(body, field_name)
        max_tokens = resolve_max_tokens(requested, len(token_ids), state.engine.max_model_len,
                                        None, field_name)
        params = sampling_params_for(body, max_tokens=max_tokens, seed=body.seed,
                                     logprobs=top_logprobs if body.logprobs else None,
                                     structured_outputs=constraint)
        request_id = new_id("chatcmpl")
        choices = make_choices(state.engine, [(token_ids, text)], body.n, [params],
                               request_id)
        base = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": model}

        replies = AssistantReplies(tools)

        def choice_json(choice, content, token_ids, logprobs, finish_reason, stop_reason,
                        key="message"):
            message, called = (replies.message(content) if key == "message" else
                               replies.delta(choice.index, content, finish_reason is not None))
            if called and finish_reason == "stop":
                finish_reason = "tool_calls"
            return {"index": choice.index, key: message,
                    "logprobs": chat_logprobs(logprobs, token_ids, state.tokenizer,
                                              top_logprobs),
                    "finish_reason": finish_reason, "stop_reason": stop_reason}

        handles = await start_choices(state.async_engine, choices)
        if body.stream:
            return stream_response(
                handles, choices, {**base, "object": "chat.completion.chunk"},
                lambda *a: choice_json(*a, key="delta"),
                lambda c: {"index": c.index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None},
                _include_usage(body), _disconnect_waiter(http))
        await collect(handles, choices, _disconnect_waiter(http))
        return {**base, "choices": [choice_json(c, c.text, c.token_ids or [], c.logprobs,
                                                c.finish_reason, c.stop_reason)
                                    for c in choices],
                "usage": usage(choices)}

    return app


def _check_model(state: ServerState, model: Optional[str]) -> str:
    if model is None:
        return state.served_model_names[0]
    if model not in state.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist.", "model")
    return model


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _disconnect_waiter(http: Request):
    """A coroutine function returning once the client has disconnected (the body is read
    by now, so the only message left to receive is the disconnect)."""

    async def wait() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    return wait
