"""One request between the engine thread and its handler: the engine-thread side
(`EngineStream`: deltas, timings, what the failure triage needs) and the handler side
(`RequestHandle`: an async iterator of its deltas)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from pagedjax.output_stream import DeltaTracker, SequenceDelta, sequences
from pagedjax.request import Request

ACCEPTED = object()  # the engine thread took the request (its first message)


@dataclass(eq=False)
class EngineStream:
    """Where the engine thread sends one request's deltas (all its sequences). Compared
    by identity."""

    request: Request
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    deltas: DeltaTracker = field(default_factory=DeltaTracker)
    unfinished: int = 1  # sequences not finished yet
    last_token_time: dict = field(default_factory=dict)  # sequence index -> time
    in_engine: bool = False
    delivered: bool = False  # a delta reached the handler: not rebuilt, not a suspect

    @property
    def request_id(self) -> str:
        """The request's id (the handler aborts by it)."""
        return self.request.request_id

    @property
    def is_suspect(self) -> bool:
        """In the engine, scheduled at least once, and without output yet: a possible
        cause of a failed step."""
        return (self.in_engine and not self.delivered
                and self.request.first_scheduled_time is not None)

    def send(self, item) -> None:
        """Hand `item` (a delta, an APIError or ACCEPTED) to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def observe_timing(self, delta: SequenceDelta, seq: Request, now: float, metrics) -> None:
        """Record time to first token / between tokens of this delta's sequence."""
        if not delta.new_token_ids:
            return
        last = self.last_token_time.get(delta.index)
        if last is None:
            metrics.time_to_first_token.observe(now - seq.arrival_time)
        else:
            metrics.inter_token_latency.observe(now - last)
        self.last_token_time[delta.index] = now

    def restart(self, request: Request) -> None:
        """Follow `request`, a fresh copy of this one's (nothing was delivered yet)."""
        request.arrival_time = self.request.arrival_time
        self.request = request
        self.deltas = DeltaTracker()
        self.unfinished = len(sequences(request))
        self.last_token_time.clear()
        self.in_engine = False


class RequestHandle:
    """An accepted request: iterate its deltas (of every sequence) until all finished;
    `close()` before that aborts it. An engine error arrives raised, as an APIError."""

    def __init__(self, stream: EngineStream, num_sequences: int,
                 on_close: Callable[[str, bool], None]):
        self._stream = stream  # its fields are the engine thread's: only its queue is read
        self._on_close = on_close  # (request id, abort it)
        self._remaining = num_sequences
        self._open = True

    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> SequenceDelta:
        if not self._remaining or not self._open:
            raise StopAsyncIteration
        item = await self._stream.updates.get()
        if isinstance(item, BaseException):
            self._remaining = 0  # the engine thread has dropped it already
            self.close()
            raise item
        self._remaining -= int(item.finished)
        if not self._remaining:
            self.close()
        return item

    def close(self) -> None:
        """Stop following the request, aborting it if it has not finished."""
        if self._open:
            self._open = False
            self._on_close(self._stream.request_id, self._remaining > 0)
