"""`tools` and `tool_choice` of a chat request: what the chat template sees, what constrains
the output, and the assistant message made of the output.

As in vLLM: a named `tool_choice` constrains the output to that function's arguments
schema and `"required"` to a JSON array of calls of the given tools, so both work with any
model; `"auto"` lets the model choose and parses its family's format (tool_parsers.py);
`"none"` generates text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from pagedjax.structured_outputs import StructuredOutputsParams

from .errors import APIError
from .tool_parsers import ToolCallStream, parse_tool_calls

TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools: `mode` None (no tools, or "none"), "named",
    "required" or "auto"; `names` of the tools; `named` the forced function's;
    `constraint` what the output must follow (named / required); `template_tools` the
    tools as the chat template gets them (None without tools)."""

    mode: Optional[str] = None
    names: tuple[str, ...] = ()
    named: Optional[str] = None
    constraint: Optional[StructuredOutputsParams] = None
    template_tools: Optional[list[dict]] = None

    def message(self, text: str) -> tuple[dict, bool]:
        """The assistant message of a finished output, and whether it calls tools."""
        if self.mode is None:
            return {"role": "assistant", "content": text}, False
        content, calls = parse_tool_calls(self.mode, text, self.names, self.named)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.to_json() for call in calls]
        return message, bool(calls)


def plan_tools(body) -> ToolPlan:
    """The ToolPlan of a chat body; APIError(400) naming the field when `tool_choice` is
    not one of TOOL_CHOICES or a function of `tools`, or needs tools there are none of."""
    tools = body.tools or []
    choice = body.tool_choice
    names = tuple(tool.function.name for tool in tools)
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools have the same name", "tools")
    named = None
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise APIError(400, "tool_choice: a named choice is {\"type\": \"function\", "
                                "\"function\": {\"name\": ...}}", "tool_choice")
        if named not in names:
            raise APIError(400, f"tool_choice: {named!r} is not one of the tools "
                                f"({', '.join(names) or 'none given'})", "tool_choice")
        mode = "named"
    elif choice is None:
        mode = "auto" if tools else None
    elif choice not in TOOL_CHOICES:
        raise APIError(400, f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a "
                            f"named function, got {choice!r}", "tool_choice")
    elif choice == "required" and not tools:
        raise APIError(400, "tool_choice: \"required\" needs tools", "tool_choice")
    else:
        mode = None if choice == "none" or not tools else choice
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools] or None
    return ToolPlan(mode, names, named, _constraint(mode, tools, named,
                                                    body.parallel_tool_calls),
                    template_tools)


def _constraint(mode: Optional[str], tools: list, named: Optional[str],
                parallel: bool) -> Optional[StructuredOutputsParams]:
    """Named: the function's arguments schema; required: an array of calls (one at most
    without parallel_tool_calls). Compact JSON, as OpenAI's arguments are."""
    def schema_of(tool) -> dict:
        return tool.function.parameters or {"type": "object"}

    if mode == "named":
        tool = next(t for t in tools if t.function.name == named)
        return StructuredOutputsParams(json=schema_of(tool), disable_any_whitespace=True)
    if mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "parameters": schema_of(tool)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in tools]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        array["maxItems"] = 1
    return StructuredOutputsParams(json=array, disable_any_whitespace=True)


def template_messages(messages: list[dict]) -> list[dict]:
    """Chat messages as chat templates expect them: tool calls' JSON `arguments` are
    objects (as HF templates for Llama 3, Qwen or Hermes render them with tojson), and an
    assistant message made of tool calls has content "" (templates that know no tools
    concatenate it)."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_with_decoded_arguments(call) for call in calls]
            if message.get("content") is None:
                message["content"] = ""
        out.append(message)
    return out


def _with_decoded_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class AssistantReplies:
    """The assistant messages (or streamed deltas) of one chat request's choices under
    its ToolPlan; a streamed choice keeps a ToolCallStream."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._streams: dict[int, ToolCallStream] = {}

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole message of a finished choice, and whether it calls tools."""
        return self.plan.message(text)

    def delta(self, index: int, new_text: str, finished: bool) -> tuple[dict, bool]:
        """Choice `index`'s delta fields for `new_text` (plus the last ones when
        `finished`), and whether the choice has called tools so far."""
        plan = self.plan
        if plan.mode is None:
            return ({"content": new_text} if new_text else {}), False
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = ToolCallStream(plan.mode, plan.names, plan.named)
        fields = stream.feed(new_text)
        if finished:
            for name, value in stream.finish().items():
                fields[name] = fields.get(name, type(value)()) + value
        return fields, stream.made_calls
