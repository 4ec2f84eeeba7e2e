"""TemplateWorker: request-supplied chat templates rendered in a child process, bounded.

A template is code from the client: a loop can run for hours and an expression can build
gigabytes, and a thread running it could be neither stopped nor kept from holding the GIL.
So such templates render in a separate, small Python process (template_child.py): a render
that runs past its time limit kills the process (a new one starts for the next job), its
address space is capped, its output size is capped, and it keeps only a few compiled
templates (an LRU), so neither time nor memory of the server depends on what clients send.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import warnings
from typing import Any, Optional

from .errors import APIError

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "template_child.py")
_MEMORY_BYTES = 512 << 20  # the child's address-space cap
_START_TIMEOUT_S = 30.0


class TemplateWorker:
    """Renders chats with client templates in a child process, one job at a time (jobs
    queue on a lock); every failure is an APIError(400) naming `chat_template`."""

    def __init__(self, timeout_s: float, max_chars: int, cache_size: int):
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.cache_size = cache_size
        self.compiled_templates = 0  # as the child last reported
        self.restarts = 0  # children killed for running too long, or died
        self._process: Optional[asyncio.subprocess.Process] = None
        self._lock: Optional[asyncio.Lock] = None

    async def render(self, template: str, messages: list[dict[str, Any]], *,
                     add_generation_prompt: bool, continue_final_message: bool,
                     special_tokens: dict[str, Optional[str]],
                     tools: Optional[list[dict]] = None) -> str:
        """The rendered chat; APIError(400) when the template fails, runs longer than
        `timeout_s`, needs too much memory, or renders more than `max_chars`."""
        job = json.dumps({"template": template, "messages": messages,
                          "add_generation_prompt": add_generation_prompt,
                          "continue_final_message": continue_final_message,
                          "special_tokens": special_tokens, "max_chars": self.max_chars,
                          "tools": tools})
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            process = await self._started()
            process.stdin.write(job.encode("ascii") + b"\n")
            try:
                await process.stdin.drain()
                line = await asyncio.wait_for(process.stdout.readline(), self.timeout_s)
            except TimeoutError:
                self._kill()
                raise APIError(400, f"chat_template: rendering took longer than "
                                    f"{self.timeout_s:g}s", "chat_template") from None
            except asyncio.CancelledError:
                self._kill()  # its reply, still to come, must not answer the next job
                raise
            except (ConnectionError, ValueError):  # ValueError: a line over the limit
                line = b""
            if not line:
                self._kill()
                raise APIError(400, "chat_template: the template worker died rendering it "
                                    "(out of memory?)", "chat_template")
        reply = json.loads(line)
        self.compiled_templates = reply["cached"]
        if "error" in reply:
            raise APIError(400, f"chat_template: {reply['error']}", "chat_template")
        return reply["text"]

    async def close(self) -> None:
        """Stop the child process (the next render starts a new one)."""
        if self._process is not None and self._process.returncode is None:
            self._process.stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), 2)
            except TimeoutError:
                self._kill()
        self._process = None

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            with warnings.catch_warnings():
                # JAX warns on any fork; this one is followed by exec at once (no deadlock).
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                        category=RuntimeWarning)
                # -I: isolated (no user site, no PYTHON* variables, no cwd on sys.path).
                spawn = asyncio.create_subprocess_exec(
                    sys.executable, "-I", _CHILD, str(self.cache_size), str(_MEMORY_BYTES),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL, limit=8 * self.max_chars + (1 << 16))
                self._process = await asyncio.wait_for(spawn, _START_TIMEOUT_S)
        return self._process

    def _kill(self) -> None:
        process, self._process = self._process, None
        self.restarts += 1
        if process is not None and process.returncode is None:
            process.kill()  # asyncio reaps it
