"""Pure ASGI middleware: body size and read-time limits, API-key auth, the error boundary.

Pure ASGI on purpose: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) hands the
route a wrapped `receive` on which a client's disconnect is never seen, so requests whose
client left would run to the end.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Optional

from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import error_response

logger = logging.getLogger("pagedjax.server")


class RequestLimits:
    """A body over `max_bytes` is a 413, whether it announces its length or streams in
    chunks (cut off as soon as it grows too big); a body that has not fully arrived
    `read_timeout_s` after the route first asks for it is a 408."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body larger than {self.max_bytes} bytes"
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, too_big, close=True)(scope, receive, send)
        received = 0
        body_done = False
        deadline: Optional[float] = None

        async def limited_receive():
            nonlocal received, body_done, deadline
            if body_done:  # only a disconnect can come now: wait for it as long as it takes
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.read_timeout_s
            try:
                event = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                # FastAPI passes HTTPExceptions raised while reading the body through.
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {self.read_timeout_s:g}s"
                ) from None
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                body_done = not event.get("more_body", False)
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, too_big)
            return event

        await self.app(scope, limited_receive, send)


class ApiKeyAuth:
    """Requests to /v1 and to `paths` need `Authorization: Bearer <api_key>` (401
    otherwise)."""

    def __init__(self, app, api_key: Optional[str], paths: tuple[str, ...] = ()):
        self.app = app
        self.api_key = api_key
        self.paths = paths

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] == "http" and self.api_key
                and (path.startswith("/v1") or path in self.paths)):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                response = error_response(401, "Unauthorized: a valid API key is required")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ErrorBoundary:
    """Anything a route raises that no handler caught becomes a 500 with an OpenAI error
    body, logged once; the connection stays usable (Starlette's own last-resort handler
    re-raises, and the server then closes the connection)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - the boundary: reported, never raised
            logger.exception("unhandled error in %s %s", scope.get("method"),
                             scope.get("path"))
            if started:
                raise  # mid-response: nothing can be sent any more
            response = error_response(500, f"internal error: {type(error).__name__}: {error}")
            await response(scope, receive, send)
