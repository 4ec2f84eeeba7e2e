"""The OpenAI-compatible HTTP server (`pagedjax serve`)."""

from .app import ServerState, build_app
from .async_engine import AsyncEngine
from .launch import create_server_state, serve

__all__ = ["AsyncEngine", "ServerState", "build_app", "create_server_state", "serve"]
