"""Chat messages -> prompt text, never on the event loop.

The server's template (the model's, or `--chat-template`) is the operator's: it renders on
a worker thread. A template sent in a request is the client's code: it is refused unless
the server trusts request templates (vLLM's `--trust-request-chat-template`), and then
renders in the TemplateWorker process, bounded in time, memory and output. Every failure
of a template, whoever wrote it, is the request's 400.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from .config import ServerConfig
from .errors import APIError
from .protocol import ChatMessage
from .template_worker import TemplateWorker
from .tools import template_messages


class ChatRenderer:
    """Renders chats for one server: its tokenizer, its template, its limits."""

    def __init__(self, tokenizer, chat_template: Optional[str], config: ServerConfig):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.trust_request_templates = config.trust_request_chat_template
        self.worker = TemplateWorker(config.template_timeout_s, config.template_max_chars,
                                     config.template_cache_size)

    async def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool,
                     continue_final_message: bool = False,
                     request_template: Optional[str] = None,
                     tools: Optional[list[dict]] = None) -> str:
        """The prompt text of `messages` (the template also gets `tools`, OpenAI's tool
        definitions, when given); APIError(400) when it cannot be rendered."""
        conversation = [m.model_dump(exclude_none=True) for m in messages]
        for message, original in zip(conversation, messages):
            if isinstance(original.content, list):
                message["content"] = original.text_content()
        conversation = template_messages(conversation)
        if continue_final_message and add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt are not "
                                "compatible: pass add_generation_prompt=false",
                           "continue_final_message")
        named = getattr(self.tokenizer, "named_chat_templates", {})
        if request_template is not None and request_template not in named:
            if not self.trust_request_templates:
                raise APIError(400, "chat_template: this server does not accept chat "
                                    "templates in requests (start it with "
                                    "--trust-request-chat-template)", "chat_template")
            return await self.worker.render(
                request_template, conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                special_tokens=self._special_tokens(), tools=tools)
        try:
            return await asyncio.to_thread(
                self.tokenizer.apply_chat_template, conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=request_template or self.chat_template, tools=tools)
        except Exception as error:  # noqa: BLE001 - a template failing on these messages
            raise APIError(400, f"messages: the chat template failed to render them: "
                                f"{type(error).__name__}: {error}", "messages") from None

    async def close(self) -> None:
        """Stop the template worker process."""
        await self.worker.close()

    def _special_tokens(self) -> dict[str, Optional[str]]:
        tok = self.tokenizer
        return {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.id_to_token(tok.pad_token_id),
                "unk_token": tok.id_to_token(tok.unk_token_id)}
