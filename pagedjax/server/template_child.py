"""The chat-template worker process: renders request-supplied chat templates, one job at a
time, with a memory cap and a small LRU of compiled templates.

Started by template_worker.TemplateWorker as a plain script (`python -I template_child.py
CACHE_SIZE MEMORY_BYTES`), so it imports only jinja2 and pagedjax/loading/chat_template.py
(loaded by path: importing the pagedjax package would import jax). Protocol: one JSON job
per line on stdin, one JSON reply per line on stdout ({"text"} or {"error"}, plus
"cached": compiled templates held). The parent kills it when a job runs too long.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import resource
import sys



def _load_chat_template_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "loading",
                        "chat_template.py")
    spec = importlib.util.spec_from_file_location("pagedjax_chat_template", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(chat, compile_template, job: dict) -> str:
    template = compile_template(job["template"])
    messages = job["messages"]
    tools = job.get("tools")
    if not job["continue_final_message"]:
        return chat.render_chat_template(template, messages,
                                         add_generation_prompt=job["add_generation_prompt"],
                                         special_tokens=job["special_tokens"], tools=tools)
    return chat.render_continuing_final_message(template, messages,
                                                special_tokens=job["special_tokens"],
                                                tools=tools)


def main() -> None:
    """Serve render jobs from stdin until it closes."""
    cache_size, memory_bytes = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    chat = _load_chat_template_module()
    compile_template = functools.lru_cache(maxsize=cache_size)(chat.compile_chat_template)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            text = _render(chat, compile_template, job)
            if len(text) > job["max_chars"]:
                reply = {"error": f"the rendered chat has {len(text)} characters, more than "
                                  f"the {job['max_chars']} allowed"}
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"error": "rendering the chat template needed more memory than allowed"}
        except Exception as error:  # noqa: BLE001 - any template failure is the client's
            reply = {"error": f"the chat template failed to render: "
                              f"{type(error).__name__}: {error}"}
        reply["cached"] = compile_template.cache_info().currsize
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
