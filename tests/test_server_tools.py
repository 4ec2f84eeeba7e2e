"""Structured outputs and tool calling through the server, with the official openai client
and LangChain's ChatOpenAI, on the tiny random Llama: every constraint keeps a random
model's output parseable (schemas here are bounded: enums, integer ranges, booleans)."""

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.helpers.engines import STRUCTURED_SETTINGS, make_llm, one_step_shape
from tests.helpers.servers import API_KEY, ServerThread, sse_events, wait_idle

# ChatML plus Hermes-style tools: the tools' names in a system turn (the tiny tokenizer
# spends a token per byte of a whole definition), calls and results as tags.
TOOL_TEMPLATE = """{% if tools %}<|im_start|>system
Tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}<|im_end|>
{% endif %}{% for message in messages %}{% if message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_ARGS = {"type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": False}
TIME_ARGS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS,
                                           "description": "Weather forecast for a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}}]
ARGS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
REPORT = {"type": "object",
          "properties": {"level": {"enum": ["low", "high"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 50},
                         "ok": {"type": "boolean"}},
          "required": ["level", "score", "ok"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
# A random model would fill every gap JSON allows with whitespace: compact JSON here.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
# Forces the Hermes format, to test the "auto" parser on a model that knows no tools.
HERMES_CALL = (r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}'
               r'\n</tool_call>')


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    days: int = Field(ge=1, le=7)
    sunny: bool


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    llm = one_step_shape(make_llm(tiny_llama_dir, **STRUCTURED_SETTINGS), 64, 16)
    running = ServerThread(llm, api_key=API_KEY, chat_template=TOOL_TEMPLATE)
    yield running
    wait_idle(llm)
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def check_calls(message, count=None):
    """The message's tool calls, each with an id, a known name and valid arguments."""
    calls = message.tool_calls
    assert calls and (count is None or len(calls) == count)
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])
    return calls


def test_response_format_json_schema_and_json_object(client, server):
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "report", "schema": REPORT, "strict": True}}
    chat = client.chat.completions.create(model="tiny", messages=USER, seed=1, max_tokens=40,
                                          response_format=schema_format, extra_body=COMPACT)
    jsonschema.validate(json.loads(chat.choices[0].message.content), REPORT)
    completion = client.completions.create(
        model="tiny", prompt="report:", seed=2, max_tokens=40, n=2,
        extra_body={"response_format": schema_format, **COMPACT})
    for choice in completion.choices:
        jsonschema.validate(json.loads(choice.text), REPORT)
    # A random model rarely closes an object: bias it towards "}" (unconstrained, that
    # bias would give "}}}}"), and the constraint makes it the JSON object "{}".
    brace = server.state.tokenizer.encode("}", add_special_tokens=False)[0]
    chat = client.chat.completions.create(model="tiny", messages=USER, temperature=0,
                                          max_tokens=30, logit_bias={str(brace): 50},
                                          response_format={"type": "json_object"},
                                          extra_body=COMPACT)
    assert json.loads(chat.choices[0].message.content) == {}


def test_vllm_structured_outputs_extra_body(client):
    choice = client.completions.create(
        model="tiny", prompt="pick:", max_tokens=10, seed=3,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}})
    assert choice.choices[0].text in ("alpha", "beta gamma")
    chat = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=20, seed=4,
        extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}})
    text = chat.choices[0].message.content
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-"


def test_bad_constraints_are_400s_naming_the_field(client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}),
         "response_format", "uniqueItems"),
        (dict(extra_body={"structured_outputs": {"regex": "(ab"}}), "structured_outputs",
         "unclosed group"),
        (dict(extra_body={"structured_outputs": {"json": {}, "choice": ["a"]}}),
         "structured_outputs", "exactly one"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice", "not one of the tools"),
        (dict(tool_choice="required"), "tool_choice", "needs tools"),
        (dict(tools=TOOLS, tool_choice="required",
              response_format={"type": "json_object"}), "response_format", "combined"),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=5,
                                           **kwargs)
        error = caught.value.body
        assert error["param"] == param and words in error["message"], error
    ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert ok.choices[0].finish_reason == "length"  # the engine kept serving


def test_named_and_required_tool_choice(client):
    named = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=40, seed=5,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert check_calls(choice.message, 1)[0].function.name == "get_weather"
    required = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=60, seed=6,
        tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls"
    check_calls(required.choices[0].message, 1)


def test_auto_tool_choice_parses_hermes_calls_whole_and_streamed(client):
    forced = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="auto",
                  max_tokens=120, seed=7,
                  extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    reply = client.chat.completions.create(**forced)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = check_calls(choice.message, 1)[0]
    assert call.function.name == "get_time"
    stream = client.chat.completions.create(**forced, stream=True)
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert not any("<tool_call>" in (d.delta.content or "") for d in deltas)
    parts = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_time"
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == json.loads(
        call.function.arguments)  # same seed, same call
    assert deltas[-1].finish_reason == "tool_calls"
    # Unforced, the random model writes text: no call, plain content.
    free = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                          max_tokens=8, seed=8)
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content


def test_streamed_named_tool_call_arguments_concatenate_to_json(client):
    stream = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=40, seed=9, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    parts = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert len(parts) > 2  # the arguments arrived as they were generated
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert all(p.index == 0 for p in parts) and not any(p.id for p in parts[1:])
    arguments = json.loads("".join(p.function.arguments or "" for p in parts))
    jsonschema.validate(arguments, WEATHER_ARGS)
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_results_round_trip_through_the_chat_template(client, server):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22C"}]
    body = {"model": "tiny", "messages": messages, "tools": TOOLS}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(server.url + "/tokenize", json=body, headers=headers).json()["tokens"]
    prompt = server.state.tokenizer.decode(tokens, skip_special_tokens=False)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}' in prompt
    assert "<tool_response>\nsunny, 22C\n</tool_response>" in prompt
    assert "Tools: get_weather get_time" in prompt  # the template saw the tools
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                           max_tokens=4)
    assert reply.usage.prompt_tokens == len(tokens)


def test_langchain_chat_openai(server):
    llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key=API_KEY,
                     temperature=0, max_tokens=8, max_retries=0)
    answer = llm.invoke("Hello there")
    assert isinstance(answer.content, str) and answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("Hello there"))
    assert streamed == answer.content
    batch = llm.batch(["Hello there", "Good morning", "Hi"])
    assert [m.content for m in batch][0] == answer.content and len(batch) == 3

    structured = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key=API_KEY,
                            temperature=0.8, seed=10, max_tokens=60, max_retries=0,
                            extra_body=COMPACT)
    forecast = structured.with_structured_output(Forecast, method="json_schema").invoke(
        "Forecast for Paris?")
    assert isinstance(forecast, Forecast)

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": WEATHER_ARGS}}
    tooled = structured.bind_tools([weather], tool_choice="get_weather")
    message = tooled.invoke("Weather in Rome for three days?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER_ARGS)


def test_sse_tool_call_chunks_are_openai_shaped(server):
    body = {"model": "tiny", "messages": USER, "tools": TOOLS, "stream": True,
            "max_tokens": 40, "seed": 11,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers=headers) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    first = next(e for e in events[:-1] if e["choices"][0]["delta"].get("tool_calls"))
    assert first["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_time"
