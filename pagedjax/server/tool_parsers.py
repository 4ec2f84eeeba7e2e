"""Tool calls out of generated text, whole or streamed.

Three shapes: "named" (tool_choice names a function: the whole output is its arguments),
"required" (the output is a JSON array of {"name", "parameters"}, both constrained by
server/tools.py) and "auto" (the model chose; its family's format is parsed: Hermes / Qwen
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, or Llama 3's bare JSON
`{"name": ..., "parameters": ...}`, optionally after `<|python_tag|>`). Only names of the
request's tools count as calls; anything else stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(HERMES_START) + r"(.*?)(?:" + re.escape(HERMES_END)
                           + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text, with an id."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self) -> dict:
        """The OpenAI `tool_calls` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _call_from(value: Any, names: Sequence[str], args_keys=("arguments", "parameters")
               ) -> Optional[ToolCall]:
    """A ToolCall from a decoded {"name", "arguments" | "parameters"} object, or None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = next((value[k] for k in args_keys if k in value), {})
    if isinstance(arguments, str):  # some models send the arguments JSON-encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_hermes(text: str, names: Sequence[str]) -> tuple[Optional[str], list[ToolCall]]:
    """Hermes / Qwen: content before the first <tool_call>, and every block's call."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for block in _HERMES_BLOCK.findall(text[start:]):
        try:
            call = _call_from(json.loads(block.strip()), names)
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []  # a block that is no call of ours: all of it is content
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def parse_llama3_json(text: str, names: Sequence[str]) -> tuple[Optional[str], list[ToolCall]]:
    """Llama 3: the whole output one JSON call (or several joined by ';')."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            value, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return text, []
        call = _call_from(value, names)
        if call is None:
            return text, []
        calls.append(call)
        while position < len(body) and body[position] in " \n\t\r;":
            position += 1
    return None, calls


def parse_auto(text: str, names: Sequence[str]) -> tuple[Optional[str], list[ToolCall]]:
    """`tool_choice="auto"`: (content, calls) by the Hermes format, else Llama 3's."""
    content, calls = parse_hermes(text, names)
    if calls:
        return content, calls
    return parse_llama3_json(text, names)


def parse_required(text: str, names: Sequence[str]) -> list[ToolCall]:
    """`tool_choice="required"`: the JSON array of {"name", "parameters"} ([] if cut)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    calls = [_call_from(item, names, ("parameters", "arguments"))
             for item in (items if isinstance(items, list) else [])]
    return calls if calls and all(calls) else []


def parse_tool_calls(mode: str, text: str, names: Sequence[str],
                     named: Optional[str] = None) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a finished output under tool `mode` ("named", "required",
    "auto"); content is the text itself when no call was made."""
    if mode == "named":
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [ToolCall(named, json.dumps(arguments, ensure_ascii=False))]
    if mode == "required":
        calls = parse_required(text, names)
        return (None, calls) if calls else (text, [])
    return parse_auto(text, names)


class ToolCallStream:
    """One streamed choice's text turned into OpenAI delta fields: content as it comes,
    tool calls as `tool_calls` deltas whose `arguments` concatenate to JSON. Named calls
    stream their arguments as generated; other calls are sent whole once parsed (auto
    content is streamed until a call might start, and that text is held back)."""

    def __init__(self, mode: str, names: Sequence[str], named: Optional[str] = None):
        self.mode, self.names, self.named = mode, list(names), named
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content or arguments
        self.holding = mode == "required"  # everything from `sent` on waits for the end
        self.call_id: Optional[str] = None  # the named call's, once announced
        self.made_calls = False

    def feed(self, new_text: str) -> dict:
        """The delta fields for `new_text` (possibly none: {})."""
        self.text += new_text
        if self.mode == "named":
            return self._named_delta()
        if self.holding:
            return {}
        start = self.text.find(HERMES_START, self.sent)
        if start >= 0:
            self.holding = True
            return self._content_until(start)
        head = self.text.lstrip()
        if not self.text[:self.sent].strip() and (
                head.startswith("{") or head.startswith(PYTHON_TAG)):
            self.holding = True  # a Llama 3 JSON call may be coming
            return {}
        if not head or PYTHON_TAG.startswith(head):
            return {}
        return self._content_until(len(self.text) - _partial_tag(self.text))

    def finish(self) -> dict:
        """The last delta fields, once the choice ended."""
        if self.mode == "named":
            return self._named_delta()
        rest = self.text[self.sent:]
        content, calls = parse_tool_calls(self.mode, rest, self.names)
        self.sent = len(self.text)
        if not calls:
            return {"content": rest} if rest else {}
        self.made_calls = True
        delta = {"tool_calls": [{"index": i, **call.to_json()}
                                for i, call in enumerate(calls)]}
        if content:
            delta["content"] = content
        return delta

    def _named_delta(self) -> dict:
        arguments, self.sent = self.text[self.sent:], len(self.text)
        if self.call_id is not None and not arguments:
            return {}
        entry: dict = {"index": 0, "function": {"arguments": arguments}}
        if self.call_id is None:
            self.call_id = ToolCall(self.named, "").id
            self.made_calls = True
            entry = {"index": 0, "id": self.call_id, "type": "function",
                     "function": {"name": self.named, "arguments": arguments}}
        return {"tool_calls": [entry]}

    def _content_until(self, end: int) -> dict:
        content, self.sent = self.text[self.sent:end], max(self.sent, end)
        return {"content": content} if content else {}


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that could begin a <tool_call> tag."""
    for size in range(min(len(HERMES_START) - 1, len(text)), 0, -1):
        if HERMES_START.startswith(text[-size:]):
            return size
    return 0
