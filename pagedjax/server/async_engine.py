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
from pagedjax.output_stream import DeltaTracker, SequenceDelta, sequences
from pagedjax.request import Request

from .metrics import ServerMetrics

logger = logging.getLogger("pagedjax.server")


@dataclass
class _Stream:
    """Where the engine thread sends one request's deltas (all its sequences)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    deltas: DeltaTracker = field(default_factory=DeltaTracker)
    unfinished: int = 1  # sequences not finished yet
    last_token_time: dict = field(default_factory=dict)  # sequence index -> time


class AsyncEngine:
    """Runs `engine` on a background thread; `generate` streams a request's updates."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, log_interval_s: float = 5.0):
        self.engine = engine
        self.metrics = metrics
        self.log_interval_s = log_interval_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # by request id
        self._streams_by_seq: dict[str, _Stream] = {}  # by each sequence's request id
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

    async def generate(self, request: Request) -> AsyncIterator[SequenceDelta]:
        """Queue `request` (built by engine.make_request; with n > 1 its n sequences share
        the prompt's pages) and yield each sequence's deltas until all finished. If the
        consumer stops early (client gone), every sequence is aborted."""
        if not self.is_healthy:
            raise RuntimeError("the engine is not running")
        stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue(),
                         unfinished=len(sequences(request)))
        self._commands.put(("add", stream))
        remaining = stream.unfinished
        try:
            while remaining:
                delta = await stream.updates.get()
                if isinstance(delta, BaseException):
                    raise delta
                remaining -= int(delta.finished)
                yield delta
        finally:
            if remaining:
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
            for stream in list(self._streams.values()):
                self._abort(stream)
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
                self._abort(self._streams.pop(payload))
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
        for seq in sequences(stream.request):
            self._streams_by_seq[seq.request_id] = stream
        self._streams[stream.request.request_id] = stream

    def _abort(self, stream: _Stream) -> None:
        for seq in sequences(stream.request):
            self._streams_by_seq.pop(seq.request_id, None)
            self.engine.abort_request(seq.request_id)
        self.metrics.aborted.inc()

    def _step(self) -> None:
        result = self.engine.step_with_updates()
        now = time.monotonic()
        self.metrics.observe_step(self.engine)
        changed = {r.request_id: r for r in result.updated + result.finished}
        for request_id, seq in changed.items():
            stream = self._streams_by_seq.get(request_id)
            if stream is None:
                continue
            delta = stream.deltas.delta(seq)
            if delta is None:
                continue
            if delta.new_token_ids:
                last = stream.last_token_time.get(delta.index)
                if last is None:
                    self.metrics.time_to_first_token.observe(now - seq.arrival_time)
                else:
                    self.metrics.inter_token_latency.observe(now - last)
                stream.last_token_time[delta.index] = now
            if delta.finished:
                self._streams_by_seq.pop(request_id, None)
                self.metrics.observe_finished(seq, now)
                stream.unfinished -= 1
                if not stream.unfinished:
                    self._streams.pop(stream.request.request_id, None)
            stream.loop.call_soon_threadsafe(stream.updates.put_nowait, delta)

    def _log_stats(self) -> None:
        queues = self.engine.queue_stats()
        usage = self.engine.kv_cache_stats().usage
        throughput = self.metrics.recent_throughput()
        logger.info(
            "running: %d reqs, waiting: %d reqs, KV usage: %.1f%%, prompt throughput: "
            "%.1f tok/s, generation throughput: %.1f tok/s, preemptions: %d",
            queues.num_running, queues.num_waiting, 100 * usage, throughput[0],
            throughput[1], queues.num_preemptions)

