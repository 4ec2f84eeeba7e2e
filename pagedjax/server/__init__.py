"""The OpenAI-compatible HTTP server (`pagedjax serve`)."""

from .app import ServerState, build_app
from .async_engine import AsyncEngine
from .config import ServerConfig
from .http_server import build_http_server, run_server
from .launch import create_server_state, serve

__all__ = ["AsyncEngine", "ServerConfig", "ServerState", "build_app", "build_http_server",
           "create_server_state", "run_server", "serve"]
