"""Prefix caching on vs off, one process, alternating passes, on the default model.

    python benchmarks/prefix_caching.py                 # every workload, 2 rounds
    python benchmarks/prefix_caching.py --workload system-prompt --rounds 1
    python benchmarks/prefix_caching.py --workload multi-turn --block-size 16

Workloads (greedy, EOS ignored): system-prompt = 64 requests sharing a ~600-token system
prompt with distinct ~30-token questions, 32 new tokens each; multi-turn = 8 conversations
x 4 turns, each turn resending the whole history (prompt + answers so far) as token ids;
parallel = n=8 samples for 16 prompts of ~300 tokens (RL-style); no-sharing = issue 7's
decode-heavy workload (128 prompts of 16-64 tokens x 256 new), where caching can only
cost. Each pass starts from an empty cache (`reset_prefix_cache`), so only reuse within
the workload counts. Prints time, prompt tokens computed, hit rate, output tok/s, the
on/off speed ratio and the targets: >= 3x on system-prompt, >= 2x on multi-turn, <= 2%
slower on no-sharing.
"""

from __future__ import annotations

import argparse
import time

from throughput import WORKLOADS, make_prompts

TARGETS = {"system-prompt": 3.0, "multi-turn": 2.0, "no-sharing": 0.98}


def system_prompt_workload(tokenizer, scale: float):
    """(list of prompt-id batches, SamplingParams): one batch of 64 shared-prefix prompts."""
    from pagedjax import SamplingParams

    system = make_prompts(tokenizer, 1, 600, 600, seed=1)[0]
    questions = make_prompts(tokenizer, max(1, int(64 * scale)), 25, 35, seed=2)
    return [[system + q for q in questions]], SamplingParams(
        temperature=0, max_tokens=32, ignore_eos=True)


def parallel_workload(tokenizer, scale: float):
    """16 prompts of ~300 tokens, n=8 samples each (seeded, so both passes agree)."""
    from pagedjax import SamplingParams

    prompts = make_prompts(tokenizer, max(1, int(16 * scale)), 280, 320, seed=3)
    return [prompts], SamplingParams(temperature=1.0, n=8, seed=0, max_tokens=32,
                                     ignore_eos=True)


def no_sharing_workload(tokenizer, scale: float):
    """Issue 7's decode-heavy workload: no prompt shares a page with another."""
    from pagedjax import SamplingParams

    spec = WORKLOADS["decode-heavy"]
    prompts = make_prompts(tokenizer, max(1, int(spec["num_prompts"] * scale)),
                           spec["min_len"], spec["max_len"])
    return [prompts], SamplingParams(temperature=0, max_tokens=spec["new_tokens"],
                                     ignore_eos=True)


def run_multi_turn(llm, tokenizer, scale: float):
    """8 conversations x 4 turns: each turn's prompt is the whole history (token ids)."""
    from pagedjax import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    conversations = max(1, int(8 * scale))
    histories = make_prompts(tokenizer, conversations, 150, 250, seed=4)
    turns = [make_prompts(tokenizer, conversations, 20, 40, seed=10 + t) for t in range(4)]
    outputs = []
    for turn in turns:
        prompts = [h + q for h, q in zip(histories, turn)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
        histories = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
        outputs += outs
    return outputs


def run_pass(llm, workload: str, scale: float) -> dict:
    """One timed pass from an empty cache; what it computed and how fast."""
    tokenizer = llm.get_tokenizer()
    llm.reset_prefix_cache()
    stats_before = llm.kv_cache_stats()
    prefilled = llm.engine.stats.num_prompt_tokens
    start = time.perf_counter()
    if workload == "multi-turn":
        outputs = run_multi_turn(llm, tokenizer, scale)
    else:
        build = {"system-prompt": system_prompt_workload, "parallel": parallel_workload,
                 "no-sharing": no_sharing_workload}[workload]
        batches, params = build(tokenizer, scale)
        outputs = []
        for batch in batches:
            outputs += llm.generate([{"prompt_token_ids": p} for p in batch], params,
                                    use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = llm.kv_cache_stats()
    queries = stats.prefix_cache_queries - stats_before.prefix_cache_queries
    hits = stats.prefix_cache_hits - stats_before.prefix_cache_hits
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"seconds": seconds, "prefilled": llm.engine.stats.num_prompt_tokens - prefilled,
            "hit_rate": hits / queries if queries else 0.0, "output_tps": generated / seconds,
            "tokens": [c.token_ids for o in outputs for c in o.outputs]}


def main() -> None:
    """Alternate caching-off and caching-on passes per workload and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="all",
                        choices=["all", "system-prompt", "multi-turn", "parallel",
                                 "no-sharing"])
    parser.add_argument("--rounds", type=int, default=2, help="alternated on/off pairs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the requests")
    parser.add_argument("--block-size", type=int, default=64,
                        help="KV page size: the cache's granularity (a prompt's partial last "
                             "page is always recomputed)")
    args = parser.parse_args()

    from pagedjax import LLM

    engines = {flag: LLM(max_model_len=2048, max_num_seqs=128, enable_prefix_caching=flag,
                         kv_cache_memory_bytes=2 << 30, block_size=args.block_size)
               for flag in (False, True)}
    workloads = (["system-prompt", "multi-turn", "parallel", "no-sharing"]
                 if args.workload == "all" else [args.workload])
    for workload in workloads:
        for flag, llm in engines.items():  # warm-up: compile every shape this workload takes
            run_pass(llm, workload, args.scale)
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for flag in (False, True):
                runs[flag].append(run_pass(engines[flag], workload, args.scale))
        same = all(a["tokens"] == b["tokens"] for a, b in zip(runs[False], runs[True]))
        for flag in (False, True):
            for r in runs[flag]:
                print(f"{workload:14s} caching {'on ' if flag else 'off'}: {r['seconds']:7.2f} s, "
                      f"prefilled {r['prefilled']:6d} tokens, hit rate {r['hit_rate']:.1%}, "
                      f"{r['output_tps']:7.1f} output tok/s", flush=True)
        ratios = [off["seconds"] / on["seconds"] for off, on in zip(runs[False], runs[True])]
        target = TARGETS.get(workload)
        verdict = "" if target is None else (
            f"; target {'>=' if target >= 1 else 'not below'} {target:.2f}x: "
            f"{'pass' if min(ratios) >= target else 'not yet'}")
        print(f"{workload:14s} speed on/off: " + ", ".join(f"{x:.2f}x" for x in ratios)
              + f"; same tokens: {same}{verdict}", flush=True)


if __name__ == "__main__":
    main()
