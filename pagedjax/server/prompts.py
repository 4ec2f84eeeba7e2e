"""Request text in, token ids out: text checked at the edge, long texts tokenized off the
event loop (a 1 MiB prompt takes long enough to stall every other client)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from .errors import APIError

_INLINE_CHARS = 4096  # texts longer than this are tokenized on a worker thread


def reject_lone_surrogates(value: Any, path: str = "") -> None:
    """APIError(400) naming the field when a string anywhere in `value` (a request body
    as plain data) holds a lone surrogate: JSON allows "\\ud800", Unicode text does not,
    and the tokenizer could not encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            field = path or "body"
            raise APIError(400, f"{field}: the text holds a lone surrogate (a \\ud800-\\udfff "
                                f"escape without its pair), which is not valid Unicode",
                           field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_lone_surrogates(key, path)
            reject_lone_surrogates(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            reject_lone_surrogates(item, f"{path}.{i}" if path else str(i))


async def encode(tokenizer, text: str, field: str, add_special_tokens: bool = True
                 ) -> list[int]:
    """Token ids of `text` (long ones tokenized on a worker thread); APIError(400) naming
    `field` for text the tokenizer cannot take."""
    reject_lone_surrogates(text, field)
    try:
        if len(text) <= _INLINE_CHARS:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)
    except (ValueError, TypeError) as error:
        raise APIError(400, f"{field}: {error}", field) from None


def count_prompts(prompt: Any) -> int:
    """How many prompts a completion `prompt` (str, [str], [int], [[int]]) holds."""
    if isinstance(prompt, str) or not prompt:
        return 1
    if all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


async def completion_prompts(tokenizer, prompt: Any) -> list[tuple[list[int], Optional[str]]]:
    """A completion `prompt` (str, [str], [int], [[int]]) as (token ids, text) pairs."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for item in prompt:
        if isinstance(item, str):
            out.append((await encode(tokenizer, item, "prompt"), item))
        else:
            out.append((list(item), None))
        if not out[-1][0]:
            raise APIError(400, "prompt must not be empty", "prompt")
    return out
