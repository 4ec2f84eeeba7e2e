"""Nothing outlives its client, no request kills the engine, and the server tells the truth
and stops in time: issue 22's findings 2, 6 and 7, the fault-injection test, and an engine
failure that makes the server exit non-zero. Real sockets throughout."""

import asyncio
import logging
import socket
import time

import httpx
import openai
import pytest

import pagedjax.engine
from pagedjax import SamplingParams
from pagedjax.server import ServerConfig
from tests.helpers.engines import make_llm
from tests.helpers.servers import (API_KEY, ServerThread, metric, raw_request, slow_steps,
                                   sse_events, wait_idle)

PROMPTS = ["the cat sat on the mat", "hello there", "once upon a time", "a dog"]
POISON = "poison pill"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": "tiny", "prompt": "a dog", "max_tokens": 100, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, max_num_seqs=16, num_blocks=256)


@pytest.fixture(scope="module")
def offline(llm):
    """Greedy texts of PROMPTS, computed before any server owns the engine."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outputs)}


@pytest.fixture
def server(llm, offline):
    """A fresh server per test (the engine is the module's): some tests stop it."""
    running = ServerThread(llm, config=ServerConfig(request_read_timeout_s=1.0),
                           api_key=API_KEY)
    yield running
    if running.thread.is_alive():
        running.stop()
    wait_idle(llm)


def scrape(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def read_until(sock: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_non_streaming_request_dies_with_its_client(server, llm, monkeypatch):
    """Finding 2: a non-streaming request whose client left used to run to the end."""
    slow_steps(monkeypatch, llm)  # 100 tokens take 2 s
    aborted = metric(scrape(server), "request_aborted_total")
    generated = llm.engine.stats.num_generated_tokens
    sock = raw_request(server.port, "/v1/completions", LONG)
    deadline = time.monotonic() + 10
    while llm.engine.stats.num_generated_tokens == generated:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    wait_idle(llm, timeout=1.0)
    assert llm.engine.stats.num_generated_tokens - generated < 60
    assert metric(scrape(server), "request_aborted_total") == aborted + 1


def test_streaming_request_dies_with_its_client_and_metrics_go_idle(server, llm, monkeypatch):
    """A stream dropped mid-way is aborted, and (finding 6) the gauges then read 0 although
    no step runs after the abort."""
    slow_steps(monkeypatch, llm)
    aborted = metric(scrape(server), "request_aborted_total")
    sock = raw_request(server.port, "/v1/completions", {**LONG, "stream": True})
    read_until(sock, b"data: {")
    assert metric(scrape(server), "num_requests_running") == 1
    assert metric(scrape(server), "kv_cache_usage_perc") > 0
    sock.close()
    wait_idle(llm, timeout=1.0)
    deadline = time.monotonic() + 2  # the engine thread publishes after the abort
    while metric(scrape(server), "num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    text = scrape(server)
    assert metric(text, "request_aborted_total") == aborted + 1
    assert metric(text, "num_requests_running") == 0
    assert metric(text, "num_requests_waiting") == 0
    assert metric(text, "kv_cache_usage_perc") == 0


def poison_steps(monkeypatch):
    """Every step holding the POISON prompt raises, as an int32 overflow did."""
    build = pagedjax.engine.build_step_input

    def build_or_raise(scheduled, *args, **kwargs):
        if any(chunk.request.prompt == POISON for chunk in scheduled):
            raise OverflowError("injected: Python integer out of bounds for int32")
        return build(scheduled, *args, **kwargs)

    monkeypatch.setattr(pagedjax.engine, "build_step_input", build_or_raise)


async def _complete(client, prompt, stream):
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    if not stream:
        return (await client.completions.create(**kwargs)).choices[0].text
    chunks = await client.completions.create(stream=True, **kwargs)
    return "".join([c.choices[0].text async for c in chunks])


async def _poisoned_stream(url):
    body = {**LONG, "prompt": POISON, "stream": True}
    async with httpx.AsyncClient(headers=HEADERS, timeout=60) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            return sse_events([line async for line in response.aiter_lines()])


def test_a_step_failing_for_one_request_fails_only_that_one(server, llm, offline, monkeypatch):
    """Fault injection: steps raise whenever the poisoned request is in them. It fails (a
    500, or an error event then [DONE] on its stream, the first byte being out); the
    requests batched with it finish with their offline texts; the engine serves on."""
    slow_steps(monkeypatch, llm, 0.01)
    poison_steps(monkeypatch)

    async def run(together: bool):
        generated = llm.engine.stats.num_generated_tokens
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0) as client:
            good = [asyncio.create_task(_complete(client, p, stream=i % 2 == 0))
                    for i, p in enumerate(PROMPTS)]
            if not together:  # the others are mid-way: the poison is the only newcomer
                while llm.engine.stats.num_generated_tokens < generated + 2 * len(PROMPTS):
                    await asyncio.sleep(0.005)
            stream = asyncio.create_task(_poisoned_stream(server.url))
            with pytest.raises(openai.InternalServerError) as failed:
                await client.completions.create(model="tiny", prompt=POISON, max_tokens=5)
            texts = await asyncio.gather(*good)
            return failed.value, await stream, texts

    for together in (True, False):
        error, events, texts = asyncio.run(run(together))
        assert error.status_code == 500 and "OverflowError" in str(error)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
        assert dict(zip(PROMPTS, texts)) == offline
    assert metric(scrape(server), "request_failed_total") == 4
    assert httpx.get(server.url + "/health").status_code == 200
    after = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    response = after.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert response.choices[0].text == offline[PROMPTS[1]]


def test_an_engine_failure_ends_streams_properly_and_exits_non_zero(server, llm, monkeypatch,
                                                                    caplog):
    """A step failing with no new request to blame is an engine failure: the stream in
    flight gets an error event and [DONE] (finding 7), and the server stops by itself
    with exit status 1 instead of serving 503s forever."""
    caplog.set_level(logging.CRITICAL, logger="pagedjax.server")
    step = llm.engine.step_with_updates
    broken = []

    def step_or_fail():
        if broken:
            raise RuntimeError("injected engine failure")
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(llm.engine, "step_with_updates", step_or_fail)
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True},
                      headers=HEADERS, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        broken.append(True)
        events = sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
    assert "injected engine failure" in events[-2]["error"]["message"]
    server.thread.join(timeout=15)
    assert not server.thread.is_alive() and server.exit_status == 1
    assert any("exiting with status 1" in r.getMessage() for r in caplog.records)


def test_shutdown_fails_what_is_still_running_at_the_deadline(llm, offline, monkeypatch):
    """Finding 7: shutdown waited for in-flight work without limit. Now a stream still
    running at --shutdown-timeout gets an error event and [DONE], and the server stops."""
    slow_steps(monkeypatch, llm, 0.05)  # 100 tokens: 5 s
    running = ServerThread(llm, config=ServerConfig(shutdown_timeout_s=1.0))
    with httpx.stream("POST", running.url + "/v1/completions", json={**LONG, "stream": True},
                      timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        start = time.monotonic()
        running.server.should_exit = True  # what SIGINT does
        events = sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
    running.thread.join(timeout=15)
    assert not running.thread.is_alive() and running.exit_status == 0
    assert time.monotonic() - start < 4.0
    wait_idle(llm)


def test_half_sent_requests_time_out(server, offline):
    """Finding 7: silent or half-sent connections stayed open forever."""
    def closed_within(sock, seconds):
        sock.settimeout(seconds)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    start = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", server.port))
    partial = socket.create_connection(("127.0.0.1", server.port))
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    body = socket.create_connection(("127.0.0.1", server.port))
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
    assert closed_within(silent, 5) == b""
    assert closed_within(partial, 5) == b""
    answer = closed_within(body, 5)
    assert answer.startswith(b"HTTP/1.1 408") and b'"code": 408' in answer
    assert time.monotonic() - start < 4
    for sock in (silent, partial, body):
        sock.close()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert response.choices[0].text == offline[PROMPTS[0]]
