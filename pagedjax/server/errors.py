"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "NotFoundError",
          413: "invalid_request_error", 500: "internal_server_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error a handler turns into an HTTP status with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    """The JSON response for an error of HTTP `status`."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def param_of(message: str, fields: set[str]) -> Optional[str]:
    """The request field a ValueError message starts with, if it names one."""
    first = message.split(" ", 1)[0].rstrip(":,")
    return first if first in fields else None
