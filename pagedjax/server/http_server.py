"""uvicorn for the app: read timeouts on every connection, a shutdown deadline, and an exit
status that tells a supervisor whether the engine failed."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .app import ServerState, build_app
from .async_engine import AsyncEngine

logger = logging.getLogger("pagedjax.server")

_MAX_HEADER_BYTES = 64 * 1024  # a request's headers larger than this get a 400
_SHUTDOWN_GRACE_S = 5.0  # after the deadline: time for the failed requests' last bytes


def protocol_with_read_timeout(seconds: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose next request's headers have not
    all arrived `seconds` after it opened or after its first bytes (uvicorn alone keeps a
    half-sent or silent connection open forever)."""

    class ReadTimeoutProtocol(AutoHTTPProtocol):
        """uvicorn's protocol plus one timer per connection, armed while it waits for a
        request's headers."""

        _pagedjax_timer: Optional[asyncio.TimerHandle] = None
        _pagedjax_bytes_after: object = None  # the cycle after which new bytes came

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._pagedjax_arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._pagedjax_bytes_after = self.cycle  # the start of a next request
                self._pagedjax_arm()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._pagedjax_timer is not None:
                self._pagedjax_timer.cancel()
                self._pagedjax_timer = None
            super().connection_lost(exc)

        def _pagedjax_arm(self) -> None:
            if self._pagedjax_timer is None:  # else the earlier, sooner deadline stands
                self._pagedjax_timer = self.loop.call_later(seconds, self._pagedjax_expire,
                                                            self.cycle)

        def _pagedjax_expire(self, cycle_then) -> None:
            self._pagedjax_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is cycle_then:  # no request's headers completed in time
                self.transport.close()
            elif self.cycle.response_complete and self._pagedjax_bytes_after is self.cycle:
                self._pagedjax_arm()  # a next request began meanwhile: its own deadline
            # else: a request is in flight, or the connection idles (keep-alive's job)

    return ReadTimeoutProtocol


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown gives in-flight requests `shutdown_timeout_s` to
    finish and then fails the rest (an error event on streams, 503 otherwise), and which
    stops by itself when the engine fails unrecoverably."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine,
                 shutdown_timeout_s: float):
        super().__init__(config)
        self.async_engine = async_engine
        self.shutdown_timeout_s = shutdown_timeout_s
        async_engine.notify_on_failure(self._engine_failed)

    def _engine_failed(self, error: BaseException) -> None:
        # Called on the engine thread: only flips uvicorn's exit flag.
        self.should_exit = True

    def run_until_stopped(self) -> int:
        """Serve until interrupted or until the engine fails, then stop the engine;
        returns the process exit status: 0, or 1 after an engine failure (so a supervisor
        restarts the server)."""
        try:
            self.run()
        finally:
            self.async_engine.shutdown()
        failure = self.async_engine.failure
        if failure is not None:
            logger.critical("exiting with status 1: the engine failed (%s: %s); a "
                            "supervisor should restart the server", type(failure).__name__,
                            failure)
            return 1
        return 0

    async def shutdown(self, sockets=None) -> None:
        """Drain the engine (with its deadline) while uvicorn closes the connections."""
        drain = asyncio.ensure_future(self.async_engine.drain(self.shutdown_timeout_s))
        try:
            await super().shutdown(sockets)
        finally:
            await drain


def build_http_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000,
                      log_level: str = "info") -> GracefulServer:
    """The uvicorn server for `state`'s app, with `state.config`'s timeouts."""
    config = state.config
    uvicorn_config = uvicorn.Config(
        build_app(state), host=host, port=port, log_level=log_level,
        http=protocol_with_read_timeout(config.request_read_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s,
        timeout_graceful_shutdown=config.shutdown_timeout_s + _SHUTDOWN_GRACE_S,
        h11_max_incomplete_event_size=_MAX_HEADER_BYTES)
    return GracefulServer(uvicorn_config, state.async_engine, config.shutdown_timeout_s)


def run_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> int:
    """Serve `state` until interrupted or until the engine fails; the exit status (see
    GracefulServer.run_until_stopped)."""
    return build_http_server(state, host, port, log_level).run_until_stopped()
