"""Every bad request body is a 4xx naming its field, never a 5xx, a stall or a dead engine
(issue 22's findings 1, 2's request limit, 3, 4 and 5), and a property test over both
endpoints' schemas (bounded here; benchmarks/fuzz_server.py runs it long)."""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from benchmarks.request_fuzz import check_response, encode_body, requests
from pagedjax import SamplingParams
from pagedjax.server import ServerConfig
from tests.helpers.engines import make_llm
from tests.helpers.servers import API_KEY, ServerThread, sse_events

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
GREEDY = {"model": "tiny", "prompt": "hello there", "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEMPLATE_CACHE = 4


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, max_num_seqs=16, num_blocks=256)


@pytest.fixture(scope="module")
def offline(llm):
    """The fixed greedy request's text, computed before the server owns the engine."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate("hello there", params, use_tqdm=False)[0].outputs[0].text


@pytest.fixture(scope="module")
def server(llm, offline):
    config = ServerConfig(trust_request_chat_template=True, template_timeout_s=1.0,
                          template_cache_size=TEMPLATE_CACHE)
    running = ServerThread(llm, config=config, api_key=API_KEY)
    yield running
    running.stop()


def post(server, path, body, timeout=60):
    return httpx.post(server.url + path, content=json.dumps(body), headers=HEADERS,
                      timeout=timeout)


def assert_serves_on(server, offline):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert post(server, "/v1/completions", GREEDY).json()["choices"][0]["text"] == offline


def assert_error(response, status, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert error["param"] == param, error


def test_top_k_beyond_int32_is_a_400_and_streams_in_flight_finish(server, offline):
    """Finding 1: this body used to overflow the step's int32 arrays on the engine thread,
    killing the engine for everyone."""
    stream_body = {**GREEDY, "max_tokens": 40, "stream": True}
    with httpx.Client(headers=HEADERS, timeout=60) as client:
        with client.stream("POST", server.url + "/v1/completions",
                           content=json.dumps(stream_body)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            bad = {"prompt": "Hi", "max_tokens": 4, "top_k": 1099511627776, "temperature": 0.5}
            assert_error(post(server, "/v1/completions", bad), 400, "top_k")
            events = sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert_serves_on(server, offline)


@pytest.mark.parametrize("fields,param", [
    ({"top_k": "VOCAB+1"}, "top_k"),
    ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"stop_token_ids": [100000]}, "stop_token_ids"),
    ({"logit_bias": {str(2**40): 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 1e39}}, "logit_bias"),
    ({"seed": 2**64}, "seed"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"temperature": 1e-7}, "temperature"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": [5, 2**40]}, None),
])
def test_out_of_range_fields_are_400s(server, llm, fields, param):
    if fields.get("top_k") == "VOCAB+1":
        fields = {"top_k": llm.engine.model_config.vocab_size + 1}
    assert_error(post(server, "/v1/completions", {**GREEDY, **fields}), 400, param)


def test_signed_64_bit_seeds_are_reduced_to_the_key_range(server):
    body = {**GREEDY, "temperature": 1.0, "max_tokens": 6}
    negative = post(server, "/v1/completions", {**body, "seed": -1})
    assert negative.status_code == 200, negative.text
    reduced = post(server, "/v1/completions", {**body, "seed": 2**63 - 1}).json()
    assert negative.json()["choices"][0]["text"] == reduced["choices"][0]["text"]
    assert_error(post(server, "/v1/completions", {**body, "seed": -2**63 - 1}), 400, "seed")


def test_prompts_times_n_over_the_limit_is_a_400(server):
    """Finding 2: one client could queue thousands of sequences that outlive it."""
    many = {"model": "tiny", "prompt": ["Hi there"] * 257, "max_tokens": 1}
    assert_error(post(server, "/v1/completions", many), 400, "prompt")
    assert_error(post(server, "/v1/completions", {**many, "prompt": ["Hi"] * 65, "n": 4}),
                 400, "prompt")


SEVEN = [
    ("/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content"),
    ("/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "chat_template": "{{ 1 / 0 }}"}, "chat_template"),
    ("/v1/chat/completions", {**CHAT, "chat_template": "{{ messages + 1 }}"}, "chat_template"),
    ("/v1/completions", {**GREEDY, "prompt": "\ud800"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]},
     "messages.0.content"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
]


def test_the_seven_500s_are_400s_and_keep_the_connection(server, offline):
    """Finding 4: each of these was a 500, which also closed the keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.connect()
    sock = connection.sock
    for path, body, param in SEVEN:
        connection.request("POST", path, body=json.dumps(body), headers=HEADERS)
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400, (path, body, error)
        assert error["param"] == param and error["code"] == 400, error
        assert not response.will_close and connection.sock is sock
    connection.request("POST", "/v1/completions", body=json.dumps(GREEDY), headers=HEADERS)
    assert json.loads(connection.getresponse().read())["choices"][0]["text"] == offline
    assert connection.sock is sock
    connection.close()


def test_max_completion_tokens_zero_is_a_400(server):
    """Finding 5: 0 was taken for unset and generated to the context limit."""
    body = {**CHAT, "max_completion_tokens": 0, "max_tokens": 5}
    assert_error(post(server, "/v1/chat/completions", body), 400, "max_completion_tokens")


def test_request_chat_templates_are_bounded_and_off_the_event_loop(server):
    """Finding 3: request templates ran on the event loop, unbounded, cached forever."""
    start = time.monotonic()
    huge = post(server, "/v1/chat/completions", {**CHAT, "chat_template": "{{ 'x ' * 5000000 }}"})
    assert_error(huge, 400, "chat_template")
    assert time.monotonic() - start < 5
    endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
               "{% endfor %}")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/v1/chat/completions",
                              {**CHAT, "chat_template": endless})
        time.sleep(0.3)
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 0.5
        slow = pending.result(timeout=60)
    assert_error(slow, 400, "chat_template")
    assert "longer than" in slow.json()["error"]["message"]
    for i in range(TEMPLATE_CACHE + 6):
        template = "{{ messages[0]['content'] }} %d" % i
        ok = post(server, "/v1/chat/completions", {**CHAT, "chat_template": template})
        assert ok.status_code == 200, ok.text
    assert 0 < server.state.chat.worker.compiled_templates <= TEMPLATE_CACHE


def test_any_body_gets_a_2xx_or_a_4xx_and_the_server_serves_on(server, offline):
    """Property: over both endpoints' schemas (plus raw bytes), no body gets a 5xx, in a
    stream or not, and the greedy output stays the same afterwards."""
    client = httpx.Client(headers=HEADERS, timeout=60)

    @settings(max_examples=50, deadline=30_000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests())
    def any_body(request):
        path, body = request
        response = client.post(server.url + path, content=encode_body(body))
        problem = check_response(response.status_code,
                                 response.headers.get("content-type", ""), response.text)
        assert problem is None, (body, problem)

    try:
        any_body()
    finally:
        client.close()
    assert_serves_on(server, offline)
