"""The RL controller's endpoints (vLLM's names): /pause in its three modes, /resume,
/sleep, /wake_up, /is_paused, /is_sleeping — what happens to requests in flight and to new
ones, over real sockets."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import pytest

from pagedjax import SamplingParams
from pagedjax.loading import load_model
from pagedjax.server import ServerConfig
from tests.helpers.servers import API_KEY, ServerThread, slow_steps, wait_idle

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "the cat sat on the mat"
LONG = {"model": "tiny", "prompt": "a dog", "max_tokens": 100, "temperature": 0,
        "ignore_eos": True}
SHORT = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
         "ignore_eos": True}


@pytest.fixture(scope="module")
def offline(llm):
    """SHORT's greedy text, computed before any server owns the engine."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text


@pytest.fixture
def server(llm, offline):
    running = ServerThread(llm, config=ServerConfig(enable_control_endpoints=True),
                           api_key=API_KEY)
    yield running
    running.stop()
    wait_idle(llm)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def post(server, path, body=None, **params):
    return httpx.post(server.url + path, json=body, params=params, headers=HEADERS,
                      timeout=60)


def get(server, path):
    return httpx.get(server.url + path, headers=HEADERS, timeout=10).json()


def complete(server, body) -> dict:
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def wait_for_tokens(llm, since: int) -> None:
    deadline = time.monotonic() + 10
    while llm.engine.stats.num_generated_tokens == since:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_abort_ends_requests_in_flight_and_new_ones_wait_for_resume(server, llm, offline,
                                                                    pool, monkeypatch):
    slow_steps(monkeypatch, llm)  # LONG takes 2 s
    running = pool.submit(complete, server, LONG)
    wait_for_tokens(llm, llm.engine.stats.num_generated_tokens)
    assert post(server, "/pause").json() == {"status": "paused"}  # mode=abort
    aborted = running.result(timeout=10)
    assert aborted["finish_reason"] == "abort"
    assert get(server, "/is_paused") == {"is_paused": True}
    waiting = pool.submit(complete, server, SHORT)
    time.sleep(0.3)
    assert not waiting.done() and not llm.engine.has_unfinished_requests()
    assert post(server, "/resume").json() == {"status": "resumed"}
    assert waiting.result(timeout=10)["text"] == offline
    assert get(server, "/is_paused") == {"is_paused": False}


def test_keep_freezes_requests_in_flight_until_resume(server, llm, pool, monkeypatch):
    slow_steps(monkeypatch, llm)
    running = pool.submit(complete, server, {**LONG, "max_tokens": 40})
    wait_for_tokens(llm, llm.engine.stats.num_generated_tokens)
    post(server, "/pause", mode="keep")
    frozen = llm.engine.stats.num_generated_tokens
    time.sleep(0.3)
    assert llm.engine.stats.num_generated_tokens == frozen and not running.done()
    post(server, "/resume")
    finished = running.result(timeout=10)
    assert finished["finish_reason"] == "length"
    assert llm.engine.stats.num_generated_tokens - frozen > 0


def test_wait_returns_once_requests_in_flight_finished(server, llm, offline, pool,
                                                       monkeypatch):
    slow_steps(monkeypatch, llm)
    before = llm.engine.stats.num_generated_tokens
    running = pool.submit(complete, server, SHORT)
    wait_for_tokens(llm, before)
    assert post(server, "/pause", mode="wait").status_code == 200
    # returned once the request's last token was out (its response may still be on the way)
    assert llm.engine.stats.num_generated_tokens - before == SHORT["max_tokens"]
    assert not llm.engine.has_unfinished_requests()
    assert running.result(timeout=10)["text"] == offline
    post(server, "/resume")


def test_sleep_frees_the_pool_and_wake_up_serves_the_same_text(server, llm, offline, pool):
    compiles = llm.num_compiles
    assert post(server, "/sleep", level=1).json() == {"status": "sleeping", "level": 1}
    assert get(server, "/is_sleeping") == {"is_sleeping": True}
    assert llm.engine.runner.kv_cache is None
    waiting = pool.submit(complete, server, SHORT)
    time.sleep(0.3)
    assert not waiting.done()
    assert post(server, "/resume").status_code == 409  # asleep: wake_up resumes
    assert post(server, "/wake_up").json() == {"status": "awake"}
    assert waiting.result(timeout=10)["text"] == offline
    assert get(server, "/is_sleeping") == {"is_sleeping": False}
    assert llm.num_compiles == compiles


def test_update_params_swaps_weights_on_the_engine_thread(server, llm, offline, tiny_llama_dir):
    _, params, _ = load_model(tiny_llama_dir)
    compiles = llm.num_compiles
    swap = server.state.async_engine.update_params
    asyncio.run(swap(jax.tree.map(lambda x: x * 1.5, params)))
    assert complete(server, SHORT)["text"] != offline
    asyncio.run(swap(params))
    assert complete(server, SHORT)["text"] == offline
    assert llm.num_compiles == compiles


@pytest.mark.parametrize("path, params, field", [
    ("/pause", {"mode": "later"}, "mode"), ("/sleep", {"level": 3}, "level"),
    ("/sleep", {"mode": "keep"}, "mode")])
def test_bad_control_arguments_are_400s(server, path, params, field):
    response = post(server, path, **params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert get(server, "/is_paused") == {"is_paused": False}


def test_control_needs_the_api_key_and_the_config_flag(server, llm):
    assert httpx.post(server.url + "/pause", timeout=10).status_code == 401
    assert get(server, "/is_paused") == {"is_paused": False}
    server.stop()
    plain = ServerThread(llm, api_key=API_KEY)
    try:
        assert post(plain, "/pause").status_code == 404
    finally:
        plain.stop()
