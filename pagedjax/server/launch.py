"""Build a server around an LLM and run it with uvicorn."""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from pagedjax.llm import LLM

from .app import ServerState
from .async_engine import AsyncEngine
from .config import ServerConfig
from .http_server import run_server
from .metrics import ServerMetrics
from .templates import ChatRenderer


def create_server_state(llm: LLM, *, served_model_names: Sequence[str] = (),
                        api_key: Optional[str] = None, chat_template: Optional[str] = None,
                        log_interval_s: float = 5.0,
                        config: Optional[ServerConfig] = None) -> ServerState:
    """Wrap `llm`'s engine in a started AsyncEngine, ready for `build_app`.

    The served name defaults to the model argument (or "SmolLM2-135M-Instruct" for the
    default model); `api_key` falls back to the PAGEDJAX_API_KEY environment variable;
    `config` holds the server's limits and timeouts (ServerConfig's defaults when None).
    """
    config = config or ServerConfig()
    names = tuple(served_model_names) or (_default_name(llm.model),)
    metrics = ServerMetrics(names[0])
    async_engine = AsyncEngine(llm.engine, metrics, log_interval_s=log_interval_s)
    async_engine.start()
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    tokenizer = llm.get_tokenizer()
    return ServerState(async_engine=async_engine, tokenizer=tokenizer,
                       served_model_names=names, metrics=metrics,
                       chat=ChatRenderer(tokenizer, chat_template, config),
                       api_key=api_key or os.environ.get("PAGEDJAX_API_KEY") or None,
                       config=config)


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000, warmup: bool = True,
          **state_kwargs) -> int:
    """Serve `llm` over HTTP until interrupted (compiling every bucket first by default,
    so no request ever waits on a compile). Returns the exit status: 0, or 1 when the
    engine failed (the server stops by itself then, for a supervisor to restart it)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(message)s")
    log = logging.getLogger("pagedjax.server")
    if warmup:
        log.info("warming up: compiling %d step programs",
                 len(llm.engine.warmup_keys()))
        seconds = llm.warmup()
        log.info("warmup done in %.1fs", seconds)
    state = create_server_state(llm, **state_kwargs)
    return run_server(state, host, port)


def _default_name(model: Optional[str]) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    return str(model).rstrip("/")
