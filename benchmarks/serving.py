"""The OpenAI server under concurrent streaming load from the official openai client.

    python benchmarks/serving.py [--concurrency 1 8 32 64] [--requests-per-level 64]

Starts `pagedjax serve` on the default model in a subprocess (loopback port, buckets
compiled lazily), then for each concurrency level runs one untimed pass (so the step
programs that level needs are compiled, as `warmup()` would do for all of them) and one
timed pass that keeps that many streaming completion requests in flight, measuring time to
first token, inter-token latency and output throughput. Writes
benchmarks/results/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, max_num_seqs: int, max_model_len: int) -> subprocess.Popen:
    """`pagedjax serve` in a subprocess; returns once /health answers."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "pagedjax.cli", "serve", "--port", str(port),
         "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
         "--no-warmup"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("pagedjax serve exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("pagedjax serve did not start")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; returns its TTFT, inter-token gaps and token count."""
    start = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                             max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else None,
            "itl": list(np.diff(stamps)) if len(stamps) > 1 else [],
            "tokens": max_tokens, "seconds": time.perf_counter() - start}


async def run_level(url: str, concurrency: int, total: int, prompts: list[str],
                    max_tokens: int) -> dict:
    """`total` requests with at most `concurrency` in flight."""
    import openai

    semaphore = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none",
                                  max_retries=0, timeout=3600) as client:
        async def bounded(i):
            async with semaphore:
                return await one_request(client, prompts[i % len(prompts)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*[bounded(i) for i in range(total)])
        seconds = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [gap for r in results for gap in r["itl"]]
    return {"concurrency": concurrency, "requests": total, "seconds": seconds,
            "output_tps": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50": float(np.median(ttft)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.median(itl)) if itl else None,
            "itl_p99": float(np.percentile(itl, 99)) if itl else None}


def save_chart(levels: list[dict], path: str) -> None:
    """Throughput and latency against concurrency (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    x = [level["concurrency"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [level["output_tps"] for level in levels], marker="o")
    left.set(xlabel="concurrent streams", ylabel="output tokens/s", xscale="log")
    right.plot(x, [level["ttft_p50"] for level in levels], marker="o", label="TTFT p50")
    right.plot(x, [level["itl_p50"] for level in levels], marker="o", label="ITL p50")
    right.set(xlabel="concurrent streams", ylabel="seconds", xscale="log", yscale="log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run every concurrency level against one server and report."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-level", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", default=None, help="use a running server instead")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    with open(os.path.join(HERE, "prompts.txt"), encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    process = None
    url = args.url
    if url is None:
        port = free_port()
        process = start_server(port, max(args.concurrency), 1024)
        url = f"http://127.0.0.1:{port}"
    try:
        levels = []
        for concurrency in args.concurrency:
            total = max(concurrency, args.requests_per_level)
            asyncio.run(run_level(url, concurrency, concurrency, prompts, args.max_tokens))
            level = asyncio.run(run_level(url, concurrency, total, prompts, args.max_tokens))
            levels.append(level)
            print(f"concurrency {concurrency:3d}: {level['output_tps']:7.1f} tok/s, "
                  f"TTFT p50 {level['ttft_p50']:.3f}s p99 {level['ttft_p99']:.3f}s, "
                  f"ITL p50 {level['itl_p50']:.3f}s p99 {level['itl_p99']:.3f}s")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump(levels, f, indent=2)
    save_chart(levels, os.path.join(args.out, "serving.png"))
    return levels


if __name__ == "__main__":
    main()
