"""The routes an RL controller drives the server with, under vLLM's names: POST /pause,
/resume, /sleep, /wake_up; GET /is_paused, /is_sleeping. Only served with
`ServerConfig.enable_control_endpoints`, and behind the API key when one is set."""

from __future__ import annotations

from fastapi import FastAPI

from pagedjax.engine import EngineNotReady

from .errors import APIError

CONTROL_PATHS = ("/pause", "/resume", "/is_paused", "/sleep", "/wake_up", "/is_sleeping")


def add_control_routes(app: FastAPI, state) -> None:
    """Add the control routes for `state`'s AsyncEngine (a ServerState) to `app`."""
    engine = state.async_engine

    @app.post("/pause")
    async def pause(mode: str = "abort", clear_cache: bool = True) -> dict:
        try:
            await engine.pause_generation(mode=mode, clear_cache=clear_cache)
        except ValueError as error:
            raise APIError(400, str(error), "mode") from None
        return {"status": "paused"}

    @app.post("/resume")
    async def resume() -> dict:
        try:
            await engine.resume_generation()
        except EngineNotReady as error:
            raise APIError(409, str(error)) from None
        return {"status": "resumed"}

    @app.get("/is_paused")
    async def is_paused() -> dict:
        return {"is_paused": engine.is_paused}

    @app.post("/sleep")
    async def sleep(level: int = 1, mode: str = "abort") -> dict:
        try:
            await engine.sleep(level=level, mode=mode)
        except ValueError as error:
            raise APIError(400, str(error), str(error).split()[0]) from None  # level, mode
        return {"status": "sleeping", "level": level}

    @app.post("/wake_up")
    async def wake_up() -> dict:
        await engine.wake_up()
        return {"status": "awake"}

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        return {"is_sleeping": engine.is_sleeping}
