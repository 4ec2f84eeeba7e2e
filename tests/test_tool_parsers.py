"""Tool calls parsed out of model text (server/tool_parsers.py): Hermes / Qwen tags, Llama 3
JSON, the constrained "required" array, and the same texts streamed in pieces."""

import json

import pytest

from pagedjax.server.tool_parsers import ToolCallStream, parse_tool_calls

NAMES = ["get_weather", "get_time"]
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
          '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
          '</tool_call>')
LLAMA3 = ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; '
          '{"name": "get_weather", "parameters": {"city": "Rome"}}')


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_auto_parses_hermes_and_llama3_calls_of_known_tools_only():
    content, calls = parse_tool_calls("auto", HERMES, NAMES)
    assert content == "Let me check."
    assert calls_of(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    assert len({c.id for c in calls}) == 2 and calls[0].id.startswith("call_")
    content, calls = parse_tool_calls("auto", LLAMA3, NAMES)
    assert content is None
    assert calls_of(calls) == [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Rome"})]
    for text in ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                 '{"name": "get_time", "parameters": {"zone": "UTC"}} and more',
                 "<tool_call>{not json</tool_call>", "just text {with braces}"]:
        assert parse_tool_calls("auto", text, NAMES) == (text, [])


def test_named_and_required_outputs():
    content, calls = parse_tool_calls("named", '{"zone": "UTC"}', NAMES, "get_time")
    assert content is None and calls_of(calls) == [("get_time", {"zone": "UTC"})]
    assert parse_tool_calls("named", '{"zone": "UT', NAMES, "get_time")[1] == []  # cut
    text = '[{"name": "get_time", "parameters": {"zone": "UTC"}}]'
    assert calls_of(parse_tool_calls("required", text, NAMES)[1]) == [
        ("get_time", {"zone": "UTC"})]
    assert parse_tool_calls("required", text[:-3], NAMES) == (text[:-3], [])


def stream(mode, text, size, named=None):
    """Feed `text` in pieces of `size` characters; returns the content and the tool-call
    deltas, merged per call index."""
    parser = ToolCallStream(mode, NAMES, named)
    deltas = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)]
    deltas.append(parser.finish())
    content = "".join(d.get("content", "") for d in deltas)
    merged = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            call = merged.setdefault(part["index"], {"name": None, "arguments": "", "ids": []})
            call["ids"] += [part["id"]] if "id" in part else []
            call["name"] = part["function"].get("name", call["name"])
            call["arguments"] += part["function"].get("arguments", "")
    return content, [merged[i] for i in sorted(merged)], parser.made_calls, deltas


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_streamed_calls_concatenate_to_the_whole_parse(size):
    content, calls, made, deltas = stream("auto", HERMES, size)
    assert made and content == "Let me check.\n"  # the text before the tag, as it came
    assert not any("<" in d.get("content", "") for d in deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == calls_of(
        parse_tool_calls("auto", HERMES, NAMES)[1])
    assert all(len(c["ids"]) == 1 for c in calls)
    content, calls, made, _ = stream("auto", "  " + LLAMA3, size)
    assert made and not content.strip() and [c["name"] for c in calls] == ["get_time",
                                                                           "get_weather"]
    plain = "a < b, and {x} is not a call"
    content, calls, made, _ = stream("auto", plain, size)
    assert (content, calls, made) == (plain, [], False)
    arguments = '{"city": "Paris", "days": 3}'
    content, calls, made, deltas = stream("named", arguments, size, named="get_weather")
    assert made and content == "" and calls == [
        {"name": "get_weather", "arguments": arguments, "ids": calls[0]["ids"]}]
    assert len(calls[0]["ids"]) == 1
    if size == 1:  # named arguments stream as they come
        assert sum(bool(d.get("tool_calls")) for d in deltas) == len(arguments)
