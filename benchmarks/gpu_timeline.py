"""Where a decode-heavy pass's wall time goes on a GPU (diagnostic, one model path):

    python benchmarks/gpu_timeline.py MODEL_DIR [--num-scheduler-steps 8] [--async-scheduling]

Runs benchmarks/throughput.py's decode-heavy workload through LLM.generate once to
compile, then once with the runner's calls timed on the host (dispatch, blocking execute,
fetch waits) and the device's busy time from replayed calls; probes whether dispatching a
decode call waits for the device; and last (a trace once left the device unusable) a
traced pass whose kernel intervals give the busy time directly, to check the replay."""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import time


def kernel_busy_seconds(trace_dir: str) -> float | None:
    """Union of the GPU-stream event intervals in the newest perfetto trace, or None."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return None
    trace = json.load(gzip.open(files[-1]))
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in names.items() if "/device:GPU" in name}
    if not gpu_pids:
        print(f"no GPU in the trace's processes: {sorted(set(names.values()))[:8]}")
        return None
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                   if e.get("ph") == "X" and e.get("pid") in gpu_pids)
    busy, end = 0.0, -1.0
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6


def dispatch_probe(runner, calls) -> None:
    """Does dispatching a decode call wait for the device? Times back-to-back
    dispatches of one logged call's program: with every input on the device, and with the
    block tables from host memory."""
    import jax
    import numpy as np

    multi = [(key, x) for key, x, _ in calls if key.decode_call]
    if not multi:
        return
    key, step_input = multi[len(multi) // 2]
    on_device = jax.device_put(step_input)
    host_tables = np.asarray(on_device.block_tables)
    jax.block_until_ready(on_device)

    def probe(name, dispatch):
        jax.block_until_ready(runner.kv_cache)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            outputs = dispatch()
            times.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        jax.block_until_ready(outputs)
        print(f"dispatch {name}: " + " ".join(f"{t:.2f}" for t in times)
              + f" ms; then waited {(time.perf_counter() - start) * 1e3:.2f} ms", flush=True)

    probe("device inputs", lambda: runner.dispatch_decode_steps(key, on_device))
    probe("host block tables", lambda: runner.dispatch_decode_steps(
        key, on_device._replace(block_tables=host_tables)))


def main() -> None:
    import jax
    from throughput import WORKLOADS, device_busy_seconds, make_prompts

    from pagedjax import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--num-scheduler-steps", type=int, default=8)
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--trace-dir", default="/tmp/gpu_trace")
    args = parser.parse_args()
    steps, trace_dir = args.num_scheduler_steps, args.trace_dir
    spec = WORKLOADS["decode-heavy"]
    llm = LLM(args.model, num_scheduler_steps=steps, async_scheduling=args.async_scheduling,
              max_num_seqs=128, max_model_len=1024, kv_cache_memory_bytes=1 << 30,
              enable_prefix_caching=False)  # the timed pass repeats the prompts
    prompts = make_prompts(llm.tokenizer, spec["num_prompts"], spec["min_len"],
                           spec["max_len"])
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    llm.generate(batch, params, use_tqdm=False)
    runner = llm.engine.runner
    spans = {"execute": [], "dispatch": [], "fetch": []}
    for name, method in (("execute", "execute"), ("dispatch", "dispatch_decode_steps"),
                         ("fetch", "fetch_tokens")):
        original = getattr(runner, method)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            spans[_name].append(time.perf_counter() - start)
            return out
        setattr(runner, method, timed)
    runner.call_log = []
    start = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - start
    calls, runner.call_log = runner.call_log, None
    replayed = device_busy_seconds(runner, calls)
    total = {name: sum(v) for name, v in spans.items()}
    print(f"steps per call {steps}, async scheduling {args.async_scheduling}: wall "
          f"{wall:.3f} s, {len(calls)} calls")
    print("host-side seconds: " + ", ".join(f"{k} {v:.3f} ({len(spans[k])}x)"
                                            for k, v in total.items()))
    waits = sorted(spans["fetch"])
    if waits:
        print(f"fetch waits ms: min {waits[0]*1e3:.2f} median {waits[len(waits)//2]*1e3:.2f} "
              f"max {waits[-1]*1e3:.2f}; under 0.1 ms: {sum(w < 1e-4 for w in waits)}")
    print(f"device busy by replay {replayed:.3f} s -> idle {1 - replayed / wall:.1%}",
          flush=True)
    dispatch_probe(runner, calls)
    # A second pass under the profiler (last: tracing may leave the device unusable)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    traced_busy = kernel_busy_seconds(trace_dir)
    if traced_busy is not None:
        print(f"traced pass: wall {wall:.3f} s, kernels busy {traced_busy:.3f} s -> idle "
              f"{1 - traced_busy / wall:.1%}")

if __name__ == "__main__":
    main()
