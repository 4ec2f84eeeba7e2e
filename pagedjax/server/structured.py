"""A request body's output constraint: OpenAI's `response_format` or vLLM's
`structured_outputs`, as one StructuredOutputsParams checked against the engine's grammar
compiler (a bad schema, regex or grammar is a 400 naming the field, before anything runs)."""

from __future__ import annotations

from typing import Optional

from pagedjax.structured_outputs import KINDS, StructuredOutputsParams

from .errors import APIError


def requested_constraint(body) -> tuple[Optional[StructuredOutputsParams], Optional[str]]:
    """The constraint a completion or chat body asks for and the field it came from
    ("response_format" or "structured_outputs"), or (None, None). A `structured_outputs`
    object with options only (`disable_any_whitespace`) applies them to response_format's
    JSON. APIError(400) for an ill-formed constraint, or one in both fields."""
    fmt, extra = body.response_format, body.structured_outputs
    wants_format = fmt is not None and fmt.type != "text"
    has_kind = extra is not None and any(extra.get(k) not in (None, False) for k in KINDS)
    if wants_format and has_kind:
        raise APIError(400, "response_format and structured_outputs cannot both give a "
                            "constraint", "structured_outputs")
    field = "structured_outputs" if has_kind or not wants_format else "response_format"
    try:
        if not wants_format:
            if extra is None:
                return None, None
            if not has_kind and extra:  # options only: checked, and nothing to apply them to
                StructuredOutputsParams.from_dict({**extra, "json_object": True})
                return None, None
            return StructuredOutputsParams.from_dict(extra), field
        options = {k: v for k, v in (extra or {}).items() if k not in KINDS}
        if fmt.type == "json_object":
            return StructuredOutputsParams.from_dict({"json_object": True, **options}), field
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format: type json_schema needs json_schema.schema",
                           "response_format")
        return StructuredOutputsParams.from_dict(
            {"json": fmt.json_schema.json_schema, **options}), field
    except ValueError as error:
        raise APIError(400, _message(error, field), field) from None


def check_constraint(engine, params: Optional[StructuredOutputsParams],
                     field: Optional[str]) -> None:
    """Compile `params` for `engine` now (it is cached for the request that follows), so
    an unsupported schema, regex or grammar is a 400 naming `field`."""
    if params is None:
        return
    try:
        engine.input_processor.grammars.state_for(params)
    except ValueError as error:
        raise APIError(400, _message(error, field), field) from None


def _message(error: ValueError, field: str) -> str:
    """The error's text for a client who sent `field` (structured_outputs' own messages
    already name their key)."""
    message = str(error)
    if message.startswith("structured_outputs"):
        if field == "structured_outputs":
            return message
        message = message.split(": ", 1)[-1]
    return f"{field}: {message}"
