"""The OpenAI-compatible server on a loopback port, driven by the official openai client."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from pagedjax import SamplingParams
from pagedjax.server import build_app, create_server_state
from tests.helpers.engines import make_llm
from tests.helpers.servers import API_KEY, free_port, wait_idle

PROMPTS = ["the cat sat on the mat", "hello there", "once upon a time", "a dog"]
MAX_TOKENS = 12


class RunningServer:
    """uvicorn serving an app in a background thread of this process."""

    def __init__(self, state):
        self.state = state
        self.port = free_port()
        config = uvicorn.Config(build_app(state), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.state.async_engine.shutdown()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, max_num_seqs=16, num_blocks=256)


@pytest.fixture(scope="module")
def offline(llm):
    """Greedy texts from LLM.generate / LLM.chat, computed before the server owns the engine."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    chat = llm.chat([{"role": "user", "content": "hello there"}], greedy,
                    use_tqdm=False)[0].outputs[0].text
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=2, ignore_eos=True)
    n2 = [c.text for c in llm.generate("once upon a time", seeded, use_tqdm=False)[0].outputs]
    return {"completions": dict(zip(PROMPTS, texts)), "chat": chat, "n2_seed7": n2}


@pytest.fixture(scope="module")
def server(llm, offline):
    running = RunningServer(create_server_state(llm, served_model_names=("tiny",),
                                                api_key=API_KEY, log_interval_s=1.0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_completions_streamed_and_not_equal_offline(client, offline):
    for prompt, expected in offline["completions"].items():
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert response.choices[0].text == expected
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == MAX_TOKENS
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_streamed_and_not_equal_offline(client, offline):
    messages = [{"role": "user", "content": "hello there"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**kwargs)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == offline["chat"]
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == offline["chat"]


def test_n_seed_stop_and_logprobs(client, offline, llm):
    kwargs = dict(model="tiny", prompt="once upon a time", max_tokens=8, temperature=1.0,
                  seed=7, n=2, extra_body={"ignore_eos": True})
    prefilled = llm.engine.stats.num_prompt_tokens
    first = client.completions.create(**kwargs)
    # the n sequences share one prefill of the prompt (the engine's page-sharing fork),
    # which skips the pages an earlier request left in the prefix cache
    cached = first.usage.prompt_tokens_details.cached_tokens
    assert llm.engine.stats.num_prompt_tokens - prefilled == first.usage.prompt_tokens - cached
    again = client.completions.create(**kwargs)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # its pages were cached
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert [c.text for c in first.choices] == offline["n2_seed7"]

    full = client.completions.create(model="tiny", prompt="hello there", max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    stop = full.choices[0].text[3:6]
    stopped = client.completions.create(model="tiny", prompt="hello there", max_tokens=10,
                                        temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="hello there", max_tokens=10,
                                         temperature=0, stop=[stop], stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text

    with_logprobs = client.completions.create(model="tiny", prompt="hello there", max_tokens=4,
                                              temperature=0, logprobs=2,
                                              extra_body={"ignore_eos": True})
    lp = with_logprobs.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    # Keys are token texts, so byte tokens that decode alike can merge: 1..3 entries.
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert len(lp.tokens) == 4 and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy: rank 1


def test_64_concurrent_streams_are_batched(server, llm, offline):
    async def one(client, prompt):
        stream = await client.completions.create(model="tiny", prompt=prompt,
                                                 max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return prompt, "".join([c.choices[0].text async for c in stream])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0) as client:
            return await asyncio.gather(*[one(client, PROMPTS[i % len(PROMPTS)])
                                          for i in range(64)])

    for prompt, text in asyncio.run(run_all()):
        assert text == offline["completions"][prompt]
    metrics = httpx.get(server.url + "/metrics").text
    batched = [line for line in metrics.splitlines()
               if line.startswith("pagedjax:max_num_seqs_in_step")]
    assert float(batched[0].split()[-1]) > 1
    wait_idle(llm)


def test_client_disconnect_aborts_and_frees_blocks(server, llm, monkeypatch):
    # Steps slowed to 20 ms, so the 100 tokens take 2 s: the request is still running
    # when the server notices the disconnect (the tiny model alone could finish first).
    step = llm.engine.step_with_updates

    def slow_step():
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(llm.engine, "step_with_updates", slow_step)
    body = {"model": "tiny", "prompt": "a dog", "max_tokens": 100, "temperature": 0,
            "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers,
                      timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
        assert llm.engine.has_unfinished_requests()
    wait_idle(llm)
    monkeypatch.undo()
    metrics = httpx.get(server.url + "/metrics").text
    aborted = [line for line in metrics.splitlines() if line.startswith("pagedjax:request_aborted")]
    assert float(aborted[0].split()[-1]) >= 1


def test_auth(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body,
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/models",
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi " * 200}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "top_p": 5}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "n": 1000}, 400, "n"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x" * (2 << 20)}, 413, None),
])
def test_errors_are_openai_shaped_and_server_keeps_serving(server, client, offline, body,
                                                          status, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/completions", content=content, headers=headers,
                          timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["code"] == status and "type" in error
    if param is not None:
        assert error["param"] == param
    after = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert after.choices[0].text == offline["completions"][PROMPTS[0]]


def test_chunked_body_over_the_limit_is_413(server, client, offline):
    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MiB of whitespace, no content-length announced

    response = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413
    after = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert after.choices[0].text == offline["completions"][PROMPTS[0]]


def test_stats_are_logged_every_few_seconds(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="pagedjax.server")
    time.sleep(2.5)  # the fixture's server logs every second
    logged = [r.getMessage() for r in caplog.records if r.name == "pagedjax.server"]
    assert any("running:" in m and "KV usage" in m and "throughput" in m for m in logged)


def test_tokenize_detokenize_version_metrics(server, llm):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello there"}).json()
    assert tokens["tokens"] == llm.get_tokenizer().encode("hello there")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 128
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "hello there"
    assert httpx.post(server.url + "/detokenize", json={"tokens": [-1]}).status_code == 400
    assert "version" in httpx.get(server.url + "/version").json()
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert f"pagedjax:{name}" in metrics, name
    hits = [line for line in metrics.splitlines()
            if line.startswith("pagedjax:prefix_cache_hits_total")]
    assert float(hits[0].split()[-1]) > 0  # earlier tests repeated their prompts


@pytest.mark.parametrize("engine_options", [
    dict(num_scheduler_steps=4), dict(async_scheduling=True)], ids=["multi-step", "async"])
def test_chained_decode_calls_stream_the_same_texts(tiny_llama_dir, offline, engine_options):
    """With 4 decode steps per device call, or async scheduling (calls chained either way),
    concurrent streams still get the offline texts, and a stream dropped mid-way frees its
    blocks."""
    llm = make_llm(tiny_llama_dir, max_num_seqs=16, num_blocks=256, **engine_options)
    running = RunningServer(create_server_state(llm, served_model_names=("tiny",)))
    try:
        async def one(client, prompt):
            stream = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            return prompt, "".join([c.choices[0].text async for c in stream])

        async def run_all():
            async with openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="none",
                                          max_retries=0) as client:
                return await asyncio.gather(*[one(client, PROMPTS[i % len(PROMPTS)])
                                              for i in range(16)])

        for prompt, text in asyncio.run(run_all()):
            assert text == offline["completions"][prompt]
        assert any(key.decode_call for key in llm.engine.runner.compiled_keys)
        body = {"model": "tiny", "prompt": "a dog", "max_tokens": 100, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body,
                          timeout=30) as response:
            lines = response.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(6))
        wait_idle(llm)
    finally:
        running.stop()


def test_pagedjax_serve_command(tiny_llama_dir, tmp_path):
    """The real CLI: starts, answers with PAGEDJAX_API_KEY enforced, and stops on SIGTERM."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PAGEDJAX_API_KEY="env-key")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedjax.cli", "serve", tiny_llama_dir, "--port", str(port),
         "--max-model-len", "64", "--num-blocks", "64", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "32", "--served-model-name", "tiny-cli",
         "--num-scheduler-steps", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "pagedjax serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key",
                               max_retries=0)
        response = client.completions.create(model="tiny-cli", prompt="hello", max_tokens=3,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 3
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "warmup done" in output
