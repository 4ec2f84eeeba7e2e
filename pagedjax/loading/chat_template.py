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
