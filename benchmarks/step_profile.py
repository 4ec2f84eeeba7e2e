"""Where one engine step's milliseconds go on CPU: a 128-row decode step (and a 512-token
prefill step) of the default model, taken from a real decode-heavy run and replayed: alone,
with every row's cached context cut to nothing (the difference is the context read, i.e.
decode attention), and under jax.profiler, whose XLA ops are grouped into GEMMs, attention,
KV write, sampling, the layer switch and the rest; plus the step's weight GEMMs timed on
their own at the step's shapes, every layer's own matrix in turn (streamed from memory as in
a step), with weights stored [out, in] (as the engine does) and [in, out].

    python benchmarks/step_profile.py [--rows 128] [--new-tokens 150] [--trace-dir DIR]
                                      [--dtype bfloat16]

Greedy, the engine in float32 (or --dtype bfloat16; the GEMM table stays float32). The
decode step is the last 128-row one of the run (contexts ~40 + the tokens generated so
far). The profiler slows XLA CPU steps ~1.8x, so read its split as
shares; the replayed and isolated times are the milliseconds."""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import numpy as np

from throughput import make_prompts


def capture_steps(rows: int, new_tokens: int, dtype: str = "float32"):
    """Run `rows` prompts of 16-64 tokens for `new_tokens` greedy tokens with the runner's
    call log on; return (llm, the last full decode call, a 512-token prefill call)."""
    from pagedjax import LLM, SamplingParams

    llm = LLM(None, dtype=dtype, enable_prefix_caching=False, max_model_len=1024,
              max_num_seqs=rows, kv_cache_memory_bytes=2 << 30)
    prompts = make_prompts(llm.tokenizer, rows, 16, 64)
    long_prompt = make_prompts(llm.tokenizer, 1, 512, 512, seed=1)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    runner = llm.engine.runner
    runner.call_log = []
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.generate([{"prompt_token_ids": p} for p in long_prompt],
                 SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    calls, runner.call_log = runner.call_log, None
    decode = [c for c in calls if int(np.sum(c[1].token_seq >= 0)) == rows
              and int(np.max(c[1].query_start_loc)) == rows]
    prefill = [c for c in calls if int(np.sum(c[1].token_seq >= 0)) == 512]
    return llm, decode[-1], (prefill[-1] if prefill else None)


def replay_ms(runner, call, repeats: int = 5) -> float:
    """Median wall ms of the call's program, replayed alone (each waited for)."""
    key, step_input, targets = call
    times = [runner.replay_seconds(key, step_input, targets, repeats=1) for _ in range(repeats)]
    return 1000 * float(np.median(times))


def without_context(call):
    """The same step with every row's cached context cut to nothing (each row attends to
    its own token only): replayed against the original, the difference is what reading
    the cached context costs (attention's bytes), measured without a profiler."""
    key, step_input, targets = call
    fed = step_input.seq_lens - step_input.context_lens  # [B] tokens fed this step
    return key, step_input._replace(context_lens=np.zeros_like(step_input.context_lens),
                                    seq_lens=fed), targets


def trace_events(runner, call, trace_dir: str, repeats: int = 3) -> list[dict]:
    """Complete ("X") events of the call replayed `repeats` times under the profiler."""
    import jax

    key, step_input, targets = call
    runner.replay_seconds(key, step_input, targets, repeats=1)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(repeats):
            runner.replay_seconds(key, step_input, targets, repeats=1)
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


CATEGORIES = [  # first match wins; names as XLA CPU's thunks report them
    ("attention (native FFI kernel)", ("ffi_call", "custom-call", "custom_call")),
    ("sampling (argmax / sampler)", ("argmax", "sort", "top_k", "cumsum", "sampl")),
    ("GEMMs (dot, YNNPACK fusions)", ("dot", "gemm", "matmul", "convolution", "ynn_fusion")),
    ("KV write (scatter)", ("scatter", "dynamic-update-slice", "dynamic_update_slice")),
    ("gathers / slices", ("gather", "dynamic-slice", "dynamic_slice")),
    ("layer switch / loop control", ("cond", "while", "switch", "call", "tuple")),
    ("copies / transposes", ("copy", "transpose", "concatenate", "slice", "pad")),
    ("elementwise / reductions", ("fusion", "reduce", "add", "multiply", "exp", "rsqrt",
                                  "select", "convert", "broadcast")),
]


def categorize(events: list[dict], repeats: int) -> tuple[dict, list]:
    """Per-category ms per step and the top ops by time. XLA CPU's trace marks each op
    with a short "end: NAME" event when it completes, not with its duration, so an op is
    charged the time from the previous op's end to its own (ops of a step run one after
    another; a dot uses both cores itself). Gaps over 50 ms (between replays) are dropped."""
    ends = sorted((e for e in events if e["name"].startswith("end: ")), key=lambda e: e["ts"])
    totals, names = collections.Counter(), collections.Counter()
    for before, e in zip(ends, ends[1:]):
        gap = (e["ts"] - before["ts"]) / 1000  # ms
        if gap > 50:
            continue
        name = e["name"][len("end: "):]
        lower = name.lower()
        category = next((c for c, keys in CATEGORIES if any(k in lower for k in keys)),
                        "other")
        totals[category] += gap / repeats
        names[name.split(".")[0]] += gap / repeats
    return dict(totals), names.most_common(25)


def gemm_ms(config, rows: int, repeats: int = 10) -> dict:
    """The step's weight GEMMs alone, stored [out, in] as the engine holds them and [in, out]:
    per matrix kind, one program multiplying by every layer's own matrix in turn (each
    product feeding the next one's input, as in the model), so the weights stream from
    memory as in a step rather than from cache. ms per step and GFLOP/s."""
    import jax
    import jax.numpy as jnp

    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    E, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"qkv": ((H + 2 * K) * D, E), "o": (E, H * D), "gate_up": (2 * F, E),
              "down": (E, F), "vocab": (V, E)}
    products = {"[out, in]": lambda x, w: x @ w.T, "[in, out]": lambda x, w: x @ w}
    rng = np.random.default_rng(0)
    result = {}
    for name, (out_dim, in_dim) in shapes.items():
        count = 1 if name == "vocab" else config.num_layers
        weights = [rng.standard_normal((out_dim, in_dim), np.float32) for _ in range(count)]
        x = jnp.asarray(rng.standard_normal((rows, in_dim), np.float32))  # [N, in]
        for layout, product in products.items():
            stored = [jnp.asarray(w if layout == "[out, in]" else w.T.copy()) for w in weights]

            def chain(x, stored, product=product):
                outputs = []
                for w in stored:
                    outputs.append(product(x, w))
                    x = x + 0.0 * outputs[-1][0, 0]  # the next product waits for this one
                return outputs

            run = jax.jit(chain)
            jax.block_until_ready(run(x, stored))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(run(x, stored))
                times.append(time.perf_counter() - start)
            ms = 1000 * float(np.median(times))
            result[(name, layout)] = {"ms_each": ms / count, "ms_per_step": ms,
                                      "gflops": 2 * rows * out_dim * in_dim * count / ms / 1e6}
            del stored
    return result


def main() -> None:
    """Capture, replay, trace and print the breakdowns."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=150)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    llm, decode, prefill = capture_steps(args.rows, args.new_tokens, args.dtype)
    runner, config = llm.engine.runner, llm.engine.model_config
    steps = {"decode": decode, "prefill 512": prefill}
    for label, call in steps.items():
        if call is None:
            continue
        step_input = call[1]
        context = step_input.context_lens[step_input.context_lens > 0]
        wall = replay_ms(runner, call)
        bare = replay_ms(runner, without_context(call))
        print(f"\n== {label} step: key {call[0]}, mean context {context.mean() if len(context) else 0:.0f}"
              f" tokens: {wall:.1f} ms replayed, {bare:.1f} ms with no cached context "
              f"(context read {wall - bare:.1f} ms) ==")
        with tempfile.TemporaryDirectory() as scratch:
            events = trace_events(runner, call, args.trace_dir or scratch)
        totals, top = categorize(events, repeats=3)
        for category, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {category:32s} {ms:7.1f} ms")
        print(f"  {'(sum of leaf ops)':32s} {sum(totals.values()):7.1f} ms")
        print("  top ops:")
        for name, ms in top:
            print(f"    {ms:7.2f} ms  {name[:90]}")
    rows = {"decode": args.rows, "prefill 512": 512}
    for label, n in rows.items():
        gemms = gemm_ms(config, n)
        for layout in ("[out, in]", "[in, out]"):
            total = sum(g["ms_per_step"] for (_, lay), g in gemms.items() if lay == layout)
            print(f"\n{label}: weight GEMMs alone at {n} rows, weights {layout}: "
                  f"{total:.1f} ms per step")
            for (name, lay), g in gemms.items():
                if lay == layout:
                    print(f"  {name:8s} {g['ms_each']:6.2f} ms each, {g['ms_per_step']:6.1f} "
                          f"ms/step, {g['gflops']:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
