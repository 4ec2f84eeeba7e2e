"""Fuzz the OpenAI server's request schema: N hypothesis-generated bodies (both endpoints,
raw bytes too) against `pagedjax serve` on a loopback port; every answer must be a 2xx or
an OpenAI-shaped 4xx (in-stream errors included), and the greedy output of a fixed
request must be the same before and after.

    python benchmarks/fuzz_server.py [--examples 2000] [--model DIR] [--seed 0]

The server trusts request chat templates (so they are fuzzed too) and runs on a tiny
random Llama by default. Prints the status counts, the problems found (must be 0), the
greedy check and the server's RSS before and after; stops the server at the end.
"""

from __future__ import annotations

import argparse
import collections
import time

import httpx
from hypothesis import HealthCheck, given, seed, settings

from request_fuzz import check_response, encode_body, requests
from server_process import ServerProcess, tiny_model_dir

GREEDY = {"model": "tiny", "prompt": "hello there", "max_tokens": 16, "temperature": 0,
          "ignore_eos": True}


def main() -> None:
    """Run the fuzzer and print its counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--model", default=None, help="default: a tiny random Llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    server = ServerProcess(args.model or tiny_model_dir(), [
        "--served-model-name", "tiny", "--trust-request-chat-template", "--no-warmup",
        "--max-model-len", "128", "--max-num-seqs", "16", "--block-size", "16",
        "--num-blocks", "256", "--max-num-batched-tokens", "128"])
    try:
        server.wait_ready()
        client = httpx.Client(headers={**server.headers, "Content-Type": "application/json"},
                              timeout=120)
        greedy_before = client.post(server.url + "/v1/completions", json=GREEDY).json()
        rss_before = server.rss_bytes()
        statuses: collections.Counter = collections.Counter()
        params: collections.Counter = collections.Counter()  # the fields 4xx named
        problems: list = []
        start = time.monotonic()

        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request=requests())
        def fuzz(request):
            path, body = request
            try:
                response = client.post(server.url + path, content=encode_body(body))
            except httpx.HTTPError as error:
                statuses["transport error"] += 1
                problems.append((path, body, f"{type(error).__name__}: {error}"))
                return
            statuses[response.status_code] += 1
            problem = check_response(response.status_code,
                                     response.headers.get("content-type", ""), response.text)
            if problem is not None:
                problems.append((path, body, problem))
            elif 400 <= response.status_code < 500:
                params[response.json()["error"]["param"]] += 1

        fuzz()
        seconds = time.monotonic() - start
        greedy_after = client.post(server.url + "/v1/completions", json=GREEDY).json()
        healthy = httpx.get(server.url + "/health", timeout=10).status_code == 200
        rss_after = server.rss_bytes()
        client.close()
    finally:
        exit_code = server.stop()

    total = sum(statuses.values())
    print(f"{total} requests in {seconds:.0f}s; statuses: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    print("4xx by field named: " + ", ".join(f"{k}: {v}" for k, v in params.most_common(12)))
    print(f"problems (5xx, malformed errors, streams without [DONE]): {len(problems)}")
    for path, body, problem in problems[:10]:
        print(f"  {path} {body!r:.200}: {problem}")
    same = greedy_before["choices"][0]["text"] == greedy_after["choices"][0]["text"]
    print(f"greedy output unchanged: {same}; /health 200 after: {healthy}; "
          f"server exit code after SIGINT: {exit_code}")
    print(f"server RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB after")


if __name__ == "__main__":
    main()
