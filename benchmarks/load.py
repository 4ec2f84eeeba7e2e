"""Load with disconnects: N rounds of M concurrent requests (streaming and not) against
`pagedjax serve` on a loopback port, a random share of the clients leaving mid-request.

    python benchmarks/load.py [--rounds 12] [--concurrency 64] [--drop 0.5] [--model DIR]

Prints lost requests (a client that stayed but got no complete answer; must be 0), leaked
KV blocks once idle (must be 0), aborts counted by the server against clients that left,
the server's RSS before and after (after a first round, so compiles are excluded), and
p50 / p99 latency of the completed requests. Runs a tiny random Llama by default; stops
the server at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np

from server_process import ServerProcess, tiny_model_dir

PROMPTS = ["the cat sat on the mat", "hello there", "once upon a time", "a dog ran",
           "tell me a story about the sea"]


async def one_request(client, url: str, rng: random.Random, max_tokens: int,
                      drop: float) -> tuple[str, float]:
    """("done" | "dropped" | "lost: why", seconds) for one random request."""
    stream = rng.random() < 0.5
    leave_after = rng.uniform(0.05, 1.0) if rng.random() < drop else None
    body = {"model": "tiny", "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
            "temperature": rng.choice([0.0, 0.8]), "ignore_eos": True, "stream": stream,
            "n": rng.choice([1, 1, 2])}
    start = time.monotonic()

    async def run() -> str:
        if not stream:
            response = await client.post(url + "/v1/completions", json=body)
            choices = response.json().get("choices", [])
            finished = response.status_code == 200 and all(c["finish_reason"] for c in choices)
            return "done" if finished else f"lost: {response.status_code} {response.text[:80]}"
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            events = [line[6:] async for line in response.aiter_lines()
                      if line.startswith("data: ")]
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                    if c.get("finish_reason")]
        if events and events[-1] == "[DONE]" and len(finishes) == body["n"]:
            return "done"
        return f"lost: stream ended without [DONE] or finish reasons ({events[-1:]})"

    try:
        if leave_after is None:
            return await run(), time.monotonic() - start
        await asyncio.wait_for(run(), leave_after)  # the client leaves: connection closed
        return "done", time.monotonic() - start  # it finished before the client left
    except asyncio.TimeoutError:
        return "dropped", time.monotonic() - start
    except Exception as error:  # noqa: BLE001 - a transport error is a lost request
        return f"lost: {type(error).__name__}: {error}", time.monotonic() - start


async def one_round(server: ServerProcess, rng: random.Random, concurrency: int,
                    max_tokens: int, drop: float) -> list[tuple[str, float]]:
    """`concurrency` requests at once, each on its own connection."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(headers=server.headers, timeout=120,
                                 limits=limits) as client:
        return await asyncio.gather(*[one_request(client, server.url, rng, max_tokens, drop)
                                      for _ in range(concurrency)])


def wait_idle(server: ServerProcess, timeout_s: float = 60) -> dict:
    """/metrics once no request runs or waits (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        idle = not metrics["num_requests_running"] and not metrics["num_requests_waiting"]
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--drop", type=float, default=0.5, help="share of clients leaving")
    parser.add_argument("--model", default=None, help="default: a tiny random Llama")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    server = ServerProcess(args.model or tiny_model_dir(), [
        "--served-model-name", "tiny", "--max-model-len", "256", "--max-num-seqs", "64",
        "--block-size", "16", "--num-blocks", str(args.num_blocks),
        "--max-num-batched-tokens", "256"])
    results: list[tuple[str, float]] = []
    try:
        server.wait_ready()
        asyncio.run(one_round(server, rng, args.concurrency, args.max_tokens, 0.0))  # compile
        before = wait_idle(server)
        rss_before = server.rss_bytes()
        start = time.monotonic()
        for _ in range(args.rounds):
            results += asyncio.run(one_round(server, rng, args.concurrency, args.max_tokens,
                                             args.drop))
        seconds = time.monotonic() - start
        after = wait_idle(server)
        rss_after = server.rss_bytes()
    finally:
        exit_code = server.stop()

    lost = [outcome for outcome, _ in results if outcome.startswith("lost")]
    dropped = sum(outcome == "dropped" for outcome, _ in results)
    latencies = [s for outcome, s in results if outcome == "done"]
    leaked = round(after["kv_cache_usage_perc"] * (args.num_blocks - 1))
    aborted = after["request_aborted_total"] - before["request_aborted_total"]
    print(f"{args.rounds} rounds x {args.concurrency} requests in {seconds:.0f}s: "
          f"{len(latencies)} completed, {dropped} clients left mid-request")
    print(f"lost requests: {len(lost)}" + (f" (first: {lost[0]})" if lost else ""))
    print(f"leaked KV blocks once idle: {leaked}; running/waiting once idle: "
          f"{after['num_requests_running']:.0f}/{after['num_requests_waiting']:.0f}")
    print(f"aborts counted by the server: {aborted:.0f} (clients that left: {dropped}; a "
          f"client leaving after its last token aborts nothing)")
    print(f"server RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB "
          f"after; exit code after SIGINT: {exit_code}")
    if latencies:
        p50, p99 = np.percentile(latencies, [50, 99])
        print(f"latency of completed requests: p50 {p50:.2f}s, p99 {p99:.2f}s")


if __name__ == "__main__":
    main()
