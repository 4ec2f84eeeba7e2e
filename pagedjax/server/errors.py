"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}, and the
handlers that turn every failure of a route into one (never a bare 500 page)."""

from __future__ import annotations

import json
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "NotFoundError",
          408: "invalid_request_error", 413: "invalid_request_error",
          500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error a handler turns into an HTTP status with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """The OpenAI error object for HTTP `status` (also sent as a stream's error event)."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None,
                   close: bool = False) -> Response:
    """The JSON response for an error of HTTP `status`; `close` ends the connection (the
    request body was not read to its end)."""
    # ASCII JSON: a message quoting the client's text may hold a lone surrogate, which
    # UTF-8 cannot encode.
    headers = {"connection": "close"} if close else None
    return Response(json.dumps(error_body(status, message, param)), status_code=status,
                    media_type="application/json", headers=headers)


def param_of(message: str, fields: set[str]) -> Optional[str]:
    """The request field a ValueError message starts with, if it names one."""
    first = message.split(" ", 1)[0].rstrip(":,")
    return first if first in fields else None


def _is_type_tag(part) -> bool:
    # pydantic names the union member an error came from ("str", "list[int]"): not a field
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "dict", "list"}
                                      or "[" in part)


def install_error_handlers(app: FastAPI) -> None:
    """APIError, invalid bodies and HTTP errors as OpenAI error bodies (the catch-all for
    anything else is the ErrorBoundary middleware, which keeps the connection open)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> Response:
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> Response:
        problems = error.errors()
        first = problems[0] if problems else {}
        location = [str(part) for part in first.get("loc", ())
                    if part != "body" and not _is_type_tag(part)]
        param = ".".join(location) or None
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request body')}"
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return error_response(error.status_code, str(error.detail),
                              close=error.status_code in (408, 413))
