"""Chat rendering for the server: request templates in the bounded worker process render
what the tokenizer renders, and no template can stall, bloat or crash the server
(issue 22's finding 3)."""

import asyncio

import pytest

from pagedjax.loading import Tokenizer
from pagedjax.server import ServerConfig
from pagedjax.server.errors import APIError
from pagedjax.server.protocol import ChatMessage
from pagedjax.server.templates import ChatRenderer
from tests.helpers.tiny_models import CHATML_TEMPLATE

MESSAGES = [ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content=[{"type": "text", "text": "hello "},
                                                   {"type": "text", "text": "there"}])]
PLAIN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return Tokenizer.from_hf_dir(tiny_llama_dir)


def run_with(tokenizer, check, trust=True, **limits):
    """Run `check(renderer)` on a fresh ChatRenderer, then stop its worker."""
    config = ServerConfig(trust_request_chat_template=trust, template_timeout_s=1.0, **limits)
    renderer = ChatRenderer(tokenizer, CHATML_TEMPLATE, config)

    async def run():
        try:
            return await check(renderer)
        finally:
            await renderer.close()

    return asyncio.run(run())


def render_error(renderer, template):
    async def attempt():
        with pytest.raises(APIError) as info:
            await renderer.render(MESSAGES, add_generation_prompt=True,
                                  request_template=template)
        assert info.value.status == 400 and info.value.param == "chat_template"
        return info.value.message
    return attempt()


def test_request_and_server_templates_render_as_the_tokenizer_does(tokenizer):
    async def check(renderer):
        for continue_final in (False, True):
            expected = tokenizer.apply_chat_template(
                PLAIN, add_generation_prompt=not continue_final,
                continue_final_message=continue_final, chat_template=CHATML_TEMPLATE)
            for template in (CHATML_TEMPLATE, None):  # the worker, the server's own
                text = await renderer.render(MESSAGES, add_generation_prompt=not continue_final,
                                             continue_final_message=continue_final,
                                             request_template=template)
                assert text == expected
    run_with(tokenizer, check)


def test_templates_are_bounded_in_time_output_and_memory(tokenizer):
    async def check(renderer):
        endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                   "{% endfor %}")
        assert "longer than 1s" in await render_error(renderer, endless)
        assert renderer.worker.restarts == 1
        assert "characters" in await render_error(renderer, "{{ 'x' * 5000 }}")
        assert "memory" in await render_error(renderer, "{{ 'x' * 4000000000 }}")
        assert "ZeroDivisionError" in await render_error(renderer, "{{ 1 / 0 }}")
        assert "syntax" in await render_error(renderer, "{% for %}")
        # still serving, with at most template_cache_size compiled templates kept
        for i in range(8):
            text = await renderer.render(MESSAGES, add_generation_prompt=False,
                                         request_template="{{ messages[0].content }}%d" % i)
            assert text == f"hi{i}"
        assert renderer.worker.compiled_templates == 3
    run_with(tokenizer, check, template_max_chars=1000, template_cache_size=3)


def test_request_templates_need_the_trust_flag(tokenizer):
    async def check(renderer):
        assert "--trust-request-chat-template" in await render_error(renderer, "{{ 1 }}")
        with pytest.raises(APIError) as info:  # the server's template failing: messages
            await renderer.render([ChatMessage(role="user")], add_generation_prompt=True)
        assert info.value.status == 400 and info.value.param == "messages"
    run_with(tokenizer, check, trust=False)
