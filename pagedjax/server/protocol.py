"""OpenAI request bodies (plus vLLM's extra sampling fields) as pydantic models.

Unknown fields are ignored, as OpenAI and vLLM do; a known field of the wrong type is a
400 with an OpenAI-style error body (see app.py).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    """`stream_options`: whether the last chunk carries `usage`."""

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the output must follow."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """`response_format`: "text", "json_object" (any JSON object) or "json_schema"."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained output: OpenAI's response_format, or vLLM's structured_outputs object
    # (json, regex, choice, grammar, json_object; see server/structured.py).
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[dict[str, Any]] = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False


class ChatMessage(BaseModel):
    """One chat message; `content` may be a string or a list of text parts
    ({"type": "text", "text": str}); other part types are refused."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for i, part in enumerate(content):
                if part.get("type", "text") != "text":
                    raise ValueError(f"part {i} has type {part.get('type')!r}: only text "
                                     f"parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: a text part needs a string 'text'")
        return content

    def text_content(self) -> Optional[str]:
        """The content as one string (text parts joined), or None."""
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content


class FunctionDefinition(BaseModel):
    """A tool's function: its name and the JSON schema of its arguments."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(BaseModel):
    """One entry of `tools`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ChatTool]] = None
    # "none", "auto", "required", or {"type": "function", "function": {"name": ...}}
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt or chat messages."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatTool]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: list[int]
