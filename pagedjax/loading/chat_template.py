"""Rendering HF chat templates (Jinja) the way transformers' `apply_chat_template` does.

Templates come from model files on the Hub, so they are untrusted code: they run in Jinja's
immutable sandbox. The environment options and helpers (`raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape) match transformers so the same template renders the
same text here.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson HTML-escapes '<', '>' and '&', which would change tool schemas.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandboxed environment configured like transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat template has a syntax error: {err}") from err


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, Optional[str]],
    tools: Optional[list] = None,
    documents: Optional[list] = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with the variables transformers passes to a chat template.

    `tools` and `documents` are passed even when None because templates test
    `tools is not none`, which an undefined variable would pass.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
    context = dict(special_tokens)
    context.update(kwargs)
    try:
        return template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template failed to render: {err}") from err


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def tag_final_message(messages: Sequence[Any]) -> tuple[list, str]:
    """A copy of `messages` whose last message's text ends with CONTINUE_TAG, and that
    text (the last text block when the content is a list of blocks)."""
    if not messages or not isinstance(messages[-1], dict):
        raise ValueError("continue_final_message: the conversation has no final message")
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        final_text = content
        last["content"] = content + CONTINUE_TAG
    elif isinstance(content, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in content]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                final_text = block["text"]
                block["text"] = block["text"] + CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message: the final message has no text to continue")
        last["content"] = blocks
    else:
        raise ValueError("continue_final_message: the final message has no content to continue")
    return list(messages[:-1]) + [last], final_text


def render_continuing_final_message(template: jinja2.Template, messages: Sequence[Any], *,
                                    special_tokens: dict[str, Optional[str]],
                                    **kwargs: Any) -> str:
    """Render `messages` with the last one left open for the model to continue
    (transformers' way: tag the end of its text, render, cut at the tag)."""
    messages, final_text = tag_final_message(messages)
    rendered = render_chat_template(template, messages, add_generation_prompt=False,
                                    special_tokens=special_tokens, **kwargs)
    tag = CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message: the final message does not appear in "
                         "the rendered chat (the chat template changed or dropped it)")
    cut = rendered.rindex(tag)
    if rendered[cut:cut + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:cut]
    return rendered[:cut].rstrip()  # the template trimmed the message's trailing space
