"""AsyncEngine: one engine thread keeps stepping while asyncio handlers add requests.

The engine itself is plain, single-threaded Python: only the engine thread touches it.
Handlers talk to that thread through a command queue (add / abort / fail all / call) and get
each request's progress back on an asyncio queue, so concurrent HTTP requests are
continuously batched together, and a client that goes away aborts its request and frees its
KV blocks. A step that raises fails the request that caused it (engine_failures.py), not the
thread; only an engine failure stops it, and then the server exits for a supervisor to
restart it. An RL controller can pause generation, put the engine to sleep and swap its
weights: all of it runs on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Optional

from pagedjax.engine import Engine, EngineNotReady
from pagedjax.flax_params import params_from_flax
from pagedjax.output_stream import SequenceDelta, sequences
from pagedjax.request import Request

from .engine_failures import FailureTriage
from .errors import APIError
from .metrics import LiveStats, ServerMetrics
from .request_stream import ACCEPTED, EngineStream, RequestHandle

logger = logging.getLogger("pagedjax.server")

# vLLM's pause modes: what happens to requests in flight (new ones wait for resume in all).
PAUSE_MODES = ("abort", "wait", "keep")


class AsyncEngine:
    """Runs `engine` on a background thread; `add_request` queues a request on it."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, log_interval_s: float = 5.0):
        self.engine = engine
        self.metrics = metrics
        self.log_interval_s = log_interval_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, EngineStream] = {}  # by request id (engine thread)
        self._streams_by_seq: dict[str, EngineStream] = {}  # by each sequence's request id
        self._triage = FailureTriage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
        self._failure: Optional[BaseException] = None
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self._draining = False
        self._in_flight = 0  # requests handed out and not closed (event loop side)
        self._paused = False  # new requests wait in _held (engine thread)
        self._frozen = False  # requests in flight don't step either (pause mode "keep")
        self._held: list[EngineStream] = []  # accepted while paused, in arrival order
        self._live = LiveStats()
        metrics.watch(self.live_stats)

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread (requests still in it are failed with a 503)."""
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503), give those in flight `timeout_s` to finish, then fail
        the rest (their streams get an error event, their responses a 503)."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._in_flight and loop.time() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        if self._in_flight and self._thread.is_alive():
            logger.warning("shutdown deadline: failing %d requests still in flight",
                           self._in_flight)
            self._commands.put(("fail_all", None))
            deadline = loop.time() + 2.0
            while self._in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)

    def notify_on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (on the engine thread) if the engine fails; at once if
        it has failed already."""
        self._failure_callbacks.append(callback)
        if self._failure is not None:
            callback(self._failure)

    @property
    def is_healthy(self) -> bool:
        """True while the engine thread runs and the server is not shutting down."""
        return self._thread.is_alive() and self._failure is None and not self._draining

    @property
    def failure(self) -> Optional[BaseException]:
        """The error that stopped the engine, if one did."""
        return self._failure

    def live_stats(self) -> LiveStats:
        """The queues and KV usage as of the engine thread's last command or step."""
        return self._live

    # ---- requests (event-loop side) ------------------------------------------------

    async def add_request(self, request: Request) -> RequestHandle:
        """Queue `request` (built by engine.make_request; with n > 1 its n sequences share
        the prompt's pages); returns once the engine thread accepted it. Raises APIError:
        400 when the scheduler refuses it, 503 when the engine is not serving."""
        if self._draining:
            raise APIError(503, "the server is shutting down")
        if not self.is_healthy:
            raise APIError(503, "the engine is not running")
        num_sequences = len(sequences(request))
        stream = EngineStream(request, asyncio.get_running_loop(), asyncio.Queue(),
                              unfinished=num_sequences)
        self._in_flight += 1
        self._commands.put(("add", stream))
        try:
            first = await self._first_message(stream)
        except BaseException:
            self._closed(request.request_id, True)
            raise
        if first is not ACCEPTED:
            self._in_flight -= 1
            raise first
        # Not stream.unfinished: the engine thread may have counted it down already.
        return RequestHandle(stream, num_sequences, self._closed)

    async def _first_message(self, stream: EngineStream):
        while True:
            try:
                return await asyncio.wait_for(stream.updates.get(), 1.0)
            except TimeoutError:
                if not self._thread.is_alive():  # it stopped before reading our command
                    raise APIError(503, "the engine is not running") from None

    async def generate(self, request: Request) -> AsyncIterator[SequenceDelta]:
        """`add_request`, then yield every delta; stopping early aborts the request."""
        handle = await self.add_request(request)
        try:
            async for delta in handle:
                yield delta
        finally:
            handle.close()

    def _closed(self, request_id: str, abort: bool) -> None:
        self._in_flight -= 1
        if abort:
            self._commands.put(("abort", request_id))

    # ---- pause, sleep, weights (event-loop side; vLLM's names) ---------------------

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """Stop generating, e.g. for a weight update; new requests wait for
        `resume_generation`. Requests in flight: "abort" ends them now (finish_reason
        "abort"), "wait" lets them finish first (this returns then), "keep" freezes them
        where they are, to continue on resume. `clear_cache` forgets cached prefixes
        (not with "keep"). Raises ValueError for an unknown mode."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        await self._on_engine_thread(lambda: self._pause(mode))
        if mode == "wait":
            while await self._on_engine_thread(self.engine.has_unfinished_requests):
                await asyncio.sleep(0.02)
        if clear_cache and mode != "keep":
            await self._on_engine_thread(self.engine.reset_prefix_cache)

    async def resume_generation(self) -> None:
        """Undo `pause_generation`: frozen requests continue, waiting ones start. Raises
        EngineNotReady while the engine sleeps (wake it up instead)."""
        await self._on_engine_thread(self._resume)

    @property
    def is_paused(self) -> bool:
        """True between `pause_generation` (or `sleep`) and `resume_generation`."""
        return self._paused

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Pause (`mode` "abort" or "wait": a freed KV pool cannot keep requests), then
        free the KV pool (level 1) and the weights too (level 2) on the engine thread.
        New requests wait for `wake_up`. Raises ValueError for a bad level or mode."""
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        if mode not in ("abort", "wait"):
            raise ValueError(f"mode must be 'abort' or 'wait' (sleep frees the KV pool, so "
                             f"no request can be kept), got {mode!r}")
        await self.pause_generation(mode)
        await self._on_engine_thread(lambda: self.engine.sleep(level))

    async def wake_up(self) -> None:
        """Reallocate the KV pool and resume generation (weights dropped by level 2 come
        back with `update_params`)."""
        await self._on_engine_thread(self.engine.wake_up)
        await self.resume_generation()

    @property
    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up`."""
        return self.engine.is_sleeping

    async def update_params(self, params) -> None:
        """Swap in new weights between steps (LLM.update_params' rules: no recompile, no
        copy of device arrays in the engine's dtype, cached prefixes invalidated)."""
        params = params_from_flax(params)
        await self._on_engine_thread(lambda: self.engine.set_params(params))

    async def _on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between steps; its result, or its exception
        raised here (APIError 503 when the engine thread is gone)."""
        if not self._thread.is_alive():
            raise APIError(503, "the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", (fn, loop, future)))
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), 1.0)
            except TimeoutError:
                if not self._thread.is_alive() and not future.done():
                    raise APIError(503, "the engine is not running") from None

    # ---- engine thread -------------------------------------------------------------

    def _run(self) -> None:
        last_log = time.monotonic()
        final_error = APIError(503, "the server is shutting down")
        try:
            while not self._stop.is_set():
                self._admit_held()
                self._drain_commands(block=not self._can_step())
                self._admit_held()
                if self._can_step():
                    self._step()
                self._publish()
                if time.monotonic() - last_log >= self.log_interval_s:
                    self._log_stats()
                    last_log = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - the engine failed: reported, exit
            self._failure = error
            final_error = APIError(500, f"the engine failed ({type(error).__name__}: "
                                        f"{error}); the server is restarting")
            logger.critical("engine failed: %s: %s", type(error).__name__, error,
                            exc_info=error)
            for callback in self._failure_callbacks:
                try:
                    callback(error)
                except Exception:  # noqa: BLE001 - one listener must not silence the rest
                    logger.exception("engine failure callback failed")
        finally:
            for stream in list(self._streams.values()):
                try:
                    self._drop(stream, final_error)
                except Exception:  # noqa: BLE001 - a failed engine may refuse aborts too
                    pass
            while True:  # requests sent after the last drain: tell them too
                try:
                    kind, payload = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    payload.send(final_error)
                elif kind == "call":
                    _, loop, future = payload
                    _settle(loop, future, error=final_error)
            self._publish_safely()

    def _can_step(self) -> bool:
        return not self._frozen and self.engine.has_unfinished_requests()

    def _admit_held(self) -> None:
        if self._paused:  # suspects of a failed step wait for resume like new requests
            return
        for stream in self._triage.admit():
            self._enter_engine(stream)

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
                self._drop(self._streams[payload], None)
                self.metrics.aborted.inc()
            elif kind == "fail_all":
                for stream in list(self._streams.values()):
                    self._drop(stream, APIError(503, "the server is shutting down"))
            elif kind == "call":
                self._call(*payload)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop,
              future: asyncio.Future) -> None:
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 - the caller's to handle
            _settle(loop, future, error=error)
        else:
            _settle(loop, future, result=result)

    def _pause(self, mode: str) -> None:
        self._paused = True
        self._frozen = mode == "keep"
        if mode == "abort":
            self._abort_in_flight()

    def _resume(self) -> None:
        if self.engine.is_sleeping:
            raise EngineNotReady("the engine is asleep: wake_up resumes it")
        self._paused = self._frozen = False
        held, self._held = self._held, []
        for stream in held:
            self._enter_engine(stream)

    def _abort_in_flight(self) -> None:
        """End every request in the engine now; their handlers get a last delta with
        finish_reason "abort" (streams: a final chunk; others: a normal response)."""
        now = time.monotonic()
        for stream in [s for s in self._streams.values() if s.in_engine]:
            live = [seq for seq in sequences(stream.request) if not seq.is_finished]
            for seq in live:
                self.engine.abort_request(seq.request_id)
            for seq in live:
                self._deliver(stream, seq, now)
            self.metrics.aborted.inc()

    def _add(self, stream: EngineStream) -> None:
        if stream.request_id in self._streams:
            stream.send(APIError(400, f"request id {stream.request_id} is in use"))
            return
        self._streams[stream.request_id] = stream
        if self._paused:
            self._held.append(stream)
            stream.send(ACCEPTED)
        elif self._triage.active:  # suspects of a failed step go first, alone
            self._triage.hold(stream)
            stream.send(ACCEPTED)
        elif self._enter_engine(stream):
            stream.send(ACCEPTED)

    def _enter_engine(self, stream: EngineStream) -> bool:
        """Add the stream's request to the engine; on refusal fail it (False)."""
        try:
            self.engine.add_request(stream.request)
        except EngineNotReady as error:  # e.g. woken from sleep level 2 without weights
            self._drop(stream, APIError(503, str(error)))
            return False
        except ValueError as error:
            self._drop(stream, APIError(400, str(error)))
            return False
        except Exception as error:  # noqa: BLE001 - this request's problem, not the engine's
            logger.exception("adding request %s failed", stream.request_id)
            self._drop(stream, APIError(500, f"{type(error).__name__}: {error}"))
            return False
        stream.in_engine = True
        for seq in sequences(stream.request):
            self._streams_by_seq[seq.request_id] = stream
        return True

    def _drop(self, stream: EngineStream, error: Optional[APIError]) -> None:
        """Forget a stream: abort what is left of it in the engine, and send its handler
        `error` (None: the handler left)."""
        self._streams.pop(stream.request_id, None)
        self._triage.cleared(stream)
        if stream in self._held:
            self._held.remove(stream)
        try:
            for seq in sequences(stream.request):
                self._streams_by_seq.pop(seq.request_id, None)
                if stream.in_engine:
                    self.engine.abort_request(seq.request_id)
        finally:
            stream.in_engine = False
            if error is not None:
                stream.send(error)

    def _step(self) -> None:
        try:
            result = self.engine.step_with_updates()
        except Exception as error:  # noqa: BLE001 - judged: a request fails, or the engine
            self._step_failed(error)
            return
        now = time.monotonic()
        self.metrics.observe_step(self.engine)
        changed = {r.request_id: r for r in result.updated + result.finished}
        for request_id, seq in changed.items():
            stream = self._streams_by_seq.get(request_id)
            if stream is not None:
                self._deliver(stream, seq, now)

    def _deliver(self, stream: EngineStream, seq: Request, now: float) -> None:
        """Send the stream's handler what is new in its sequence `seq`; forget the stream
        once its last sequence finished."""
        delta = stream.deltas.delta(seq)
        if delta is None:
            return
        stream.observe_timing(delta, seq, now, self.metrics)
        if not stream.delivered:
            stream.delivered = True
            self._triage.cleared(stream)
        if delta.finished:
            self._streams_by_seq.pop(seq.request_id, None)
            self.metrics.observe_finished(seq, now)
            stream.unfinished -= 1
            if not stream.unfinished:
                self._streams.pop(stream.request_id, None)
                stream.in_engine = False
        stream.send(delta)

    def _step_failed(self, error: Exception) -> None:
        """Fail the request that broke the step, or hold the suspects back; re-raise when
        no request can be blamed (an engine failure)."""
        suspects = [s for s in self._streams.values() if s.is_suspect]
        verdict = self._triage.verdict(error, suspects)
        if verdict.fatal:
            raise error
        if verdict.guilty is not None:
            stream = verdict.guilty
            logger.error("engine step failed (%s: %s): failing request %s",
                         type(error).__name__, error, stream.request_id,
                         exc_info=error)
            self.metrics.failed.inc()
            self._drop(stream, APIError(500, f"the request failed in the engine "
                                             f"({type(error).__name__}: {error})"))
            return
        logger.warning("engine step failed (%s: %s) with %d new requests in it: "
                       "re-admitting them by halves to find the one that fails",
                       type(error).__name__, error, len(verdict.readmit))
        for stream in verdict.readmit:
            self._take_out(stream)

    def _take_out(self, stream: EngineStream) -> None:
        """Abort a suspect in the engine and give it a fresh request (it has no output to
        lose), to be re-admitted by the triage."""
        for seq in sequences(stream.request):
            self._streams_by_seq.pop(seq.request_id, None)
            self.engine.abort_request(seq.request_id)
        stream.in_engine = False
        old = stream.request
        try:
            fresh = self.engine.make_request(old.prompt_token_ids, old.sampling_params,
                                             prompt=old.prompt, request_id=old.request_id)
        except ValueError as error:
            self._drop(stream, APIError(400, str(error)))
            return
        stream.restart(fresh)

    def _publish(self) -> None:
        queues = self.engine.queue_stats()
        self._live = LiveStats(num_running=queues.num_running,
                               num_waiting=queues.num_waiting + self._triage.num_held,
                               kv_usage=self.engine.kv_cache_stats().usage,
                               max_seqs_in_step=self.engine.stats.max_seqs_in_step)

    def _publish_safely(self) -> None:
        try:
            self._publish()
        except Exception:  # noqa: BLE001 - a failed engine may not answer: keep the last
            pass

    def _log_stats(self) -> None:
        live = self._live
        throughput = self.metrics.recent_throughput()
        logger.info(
            "running: %d reqs, waiting: %d reqs, KV usage: %.1f%%, prompt throughput: "
            "%.1f tok/s, generation throughput: %.1f tok/s, preemptions: %d",
            live.num_running, live.num_waiting, 100 * live.kv_usage, throughput[0],
            throughput[1], self.engine.queue_stats().num_preemptions)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *,
            result: Any = None, error: Optional[BaseException] = None) -> None:
    """Complete an engine-thread call's future on its event loop (if still open)."""
    def complete() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(complete)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
