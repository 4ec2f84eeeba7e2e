"""AsyncEngine: one engine thread keeps stepping while asyncio handlers add requests.

The engine itself is plain, single-threaded Python: only the engine thread touches it.
Handlers talk to that thread through a command queue (add / abort) and get each request's
progress back on an asyncio queue, so concurrent HTTP requests are continuously batched
together, and a client that goes away aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from pagedjax.engine import Engine
from pagedjax.request import Request

from .metrics import ServerMetrics

logger = logging.getLogger("pagedjax.server")


@dataclass(frozen=True)
class RequestUpdate:
    """A request's progress after a step: what is new since the previous update."""

    new_token_ids: list[int]
    new_text: str
    new_logprobs: Optional[list]  # one {token_id: Logprob} per new token, when asked
    finished: bool
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _Stream:
    """Where the engine thread sends one request's updates."""

    request: Request
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    sent_tokens: int = 0
    sent_chars: int = 0
    last_token_time: Optional[float] = field(default=None)


class AsyncEngine:
    """Runs `engine` on a background thread; `generate` streams a request's updates."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, log_interval_s: float = 5.0):
        self.engine = engine
        self.metrics = metrics
        self.log_interval_s = log_interval_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
        self._error: Optional[BaseException] = None

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread (pending requests are aborted)."""
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    @property
    def is_healthy(self) -> bool:
        """False once the engine thread has died."""
        return self._thread.is_alive() and self._error is None

    # ---- requests (event-loop side) ------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestUpdate]:
        """Queue `request` (built by engine.make_request) and yield its updates until it
        finishes. If the consumer stops early (client gone), the request is aborted."""
        if not self.is_healthy:
            raise RuntimeError("the engine is not running")
        stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", stream))
        finished = False
        try:
            while not finished:
                update = await stream.updates.get()
                if isinstance(update, BaseException):
                    raise update
                finished = update.finished
                yield update
        finally:
            if not finished:
                self._commands.put(("abort", request.request_id))

    # ---- engine thread -------------------------------------------------------------

    def _run(self) -> None:
        last_log = time.monotonic()
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                self._drain_commands(block=not busy)
                if self.engine.has_unfinished_requests():
                    self._step()
                if time.monotonic() - last_log >= self.log_interval_s:
                    self._log_stats()
                    last_log = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - reported to every waiting client
            self._error = error
            logger.exception("engine thread died")
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.updates.put_nowait,
                                                 RuntimeError(f"engine failed: {error}"))
        finally:
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
            self._streams.clear()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "add":
                self._add(payload)
            elif kind == "abort" and payload in self._streams:
                self._streams.pop(payload)
                self.engine.abort_request(payload)
                self.metrics.aborted.inc()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, stream: _Stream) -> None:
        try:
            self.engine.add_request(stream.request)
        except ValueError as error:
            stream.loop.call_soon_threadsafe(stream.updates.put_nowait, error)
            return
        self._streams[stream.request.request_id] = stream

    def _step(self) -> None:
        result = self.engine.step_with_updates()
        now = time.monotonic()
        self.metrics.observe_step(self.engine, result)
        changed = {r.request_id: r for r in result.updated + result.finished}
        for request_id, request in changed.items():
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            update = self._update_for(stream, request)
            if update.new_token_ids:
                if stream.last_token_time is None:
                    self.metrics.time_to_first_token.observe(now - request.arrival_time)
                else:
                    self.metrics.inter_token_latency.observe(now - stream.last_token_time)
                stream.last_token_time = now
            if request.is_finished:
                self._streams.pop(request_id, None)
                self.metrics.observe_finished(request, now)
            stream.loop.call_soon_threadsafe(stream.updates.put_nowait, update)

    def _update_for(self, stream: _Stream, request: Request) -> RequestUpdate:
        finished = request.is_finished
        text = request.output_text
        visible = len(text) if finished else max(
            stream.sent_chars, len(text) - request.sampling_params.stop_holdback)
        new_tokens = request.output_token_ids[stream.sent_tokens:]
        new_logprobs = (request.logprobs[stream.sent_tokens:]
                        if request.logprobs is not None else None)
        update = RequestUpdate(
            new_token_ids=list(new_tokens), new_text=text[stream.sent_chars:visible],
            new_logprobs=new_logprobs, finished=finished,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids))
        stream.sent_tokens = len(request.output_token_ids)
        stream.sent_chars = visible
        return update

    def _log_stats(self) -> None:
        engine = self.engine
        stats = engine.kv_cache_stats()
        throughput = self.metrics.recent_throughput()
        logger.info(
            "running: %d reqs, waiting: %d reqs, KV usage: %.1f%%, prompt throughput: "
            "%.1f tok/s, generation throughput: %.1f tok/s, preemptions: %d",
            engine.scheduler.num_running, engine.scheduler.num_waiting, 100 * stats.usage,
            throughput[0], throughput[1], engine.scheduler.num_preemptions)

