"""Constrained decoding's cost: 64 requests with a JSON schema against the same 64 requests
unconstrained, in one process, passes alternating, on the default model.

    python benchmarks/structured.py                      # 64 requests x 64 tokens, 2 rounds
    python benchmarks/structured.py --requests 32 --max-tokens 32 --rounds 1

The schema (a list of at least 20 nested person records: enums, integer ranges, bounded
arrays, a pattern) cannot be finished within --max-tokens, so every constrained request
generates exactly as many tokens as its unconstrained twin (ignore_eos): output tok/s
compare the same work, plus the masks. Both use seeded sampling (temperature 0.8).
Prints output tok/s of each pass, the ratio (target: constrained >= 80% of unconstrained),
the per-step mask time (computed on the worker thread, and waited for on the step path),
and the programs compiled for constrained steps (target: at most one per step shape);
writes results/structured.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 4},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["name", "age", "role", "tags", "zip"],
    "additionalProperties": False,
}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON,
                                                      "minItems": 20}},
          "required": ["people"], "additionalProperties": False}


def run_pass(llm, prompts, params) -> dict:
    """One generate pass: seconds, output tokens, tok/s and the masks' time in it."""
    from pagedjax.grammar_bitmasks import BitmaskStats

    masks = llm.engine.grammar_bitmasks
    masks.stats = BitmaskStats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    stats = masks.stats
    return {"seconds": seconds, "output_tokens": tokens, "output_tps": tokens / seconds,
            "steps": llm.engine.stats.num_steps, "masked_steps": stats.steps,
            "mask_rows": stats.rows, "mask_compute_s": stats.compute_seconds,
            "mask_wait_s": stats.wait_seconds}


def main() -> None:
    """Run the alternating passes and print / write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from pagedjax import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(max_model_len=512, max_num_seqs=args.requests, max_num_batched_tokens=512)
    prompts = [f"Write JSON listing {20 + i} people of a club, with name, age, role, tags "
               f"and zip code:\n" for i in range(args.requests)]
    constraint = StructuredOutputsParams(json=SCHEMA)
    modes = {
        "unconstrained": [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                         ignore_eos=True) for i in range(args.requests)],
        "constrained": [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                       structured_outputs=constraint)
                        for i in range(args.requests)],
    }
    compiled = {}
    for mode, params in modes.items():  # first passes compile; not timed
        before = set(llm.engine.runner.compiled_keys)
        run_pass(llm, prompts, params)
        compiled[mode] = sorted(set(llm.engine.runner.compiled_keys) - before, key=str)
    passes = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, params in modes.items():
            steps_before = llm.engine.stats.num_steps
            result = run_pass(llm, prompts, params)
            result["steps"] -= steps_before
            passes[mode].append(result)
            print(f"{mode:>13}: {result['output_tps']:7.1f} output tok/s "
                  f"({result['output_tokens']} tokens in {result['seconds']:.1f}s, "
                  f"{result['steps']} steps)")

    best = {mode: max(p["output_tps"] for p in runs) for mode, runs in passes.items()}
    ratio = best["constrained"] / best["unconstrained"]
    masked = passes["constrained"]
    steps = sum(p["masked_steps"] for p in masked)
    rows = sum(p["mask_rows"] for p in masked)
    compute_ms = 1e3 * sum(p["mask_compute_s"] for p in masked) / steps
    wait_ms = 1e3 * sum(p["mask_wait_s"] for p in masked) / steps
    step_ms = 1e3 * sum(p["seconds"] for p in masked) / steps
    shapes = {dataclasses.replace(k, bitmask_words=0) for k in compiled["constrained"]}
    extra_ok = all(sum(1 for k in compiled["constrained"]
                       if dataclasses.replace(k, bitmask_words=0) == shape) <= 1
                   for shape in shapes) and all(k.bitmask_words for k in compiled["constrained"])
    print(f"constrained / unconstrained output tok/s: {ratio:.3f} "
          f"({'pass' if ratio >= 0.8 else 'not yet'}: target >= 0.8)")
    print(f"per constrained step ({rows / steps:.1f} masked rows, step {step_ms:.1f} ms): "
          f"mask compute {compute_ms:.2f} ms ({1e3 * compute_ms / (rows / steps):.0f} us a "
          f"row, on the worker thread), waited for on the step path {wait_ms:.2f} ms")
    print(f"programs compiled by the constrained passes: {len(compiled['constrained'])} for "
          f"{len(shapes)} step shapes ({'pass' if extra_ok else 'not yet'}: at most one "
          f"extra per shape)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "structured.json"), "w") as f:
        json.dump({"args": vars(args), "passes": passes, "ratio": ratio,
                   "mask_compute_ms_per_step": compute_ms, "mask_wait_ms_per_step": wait_ms,
                   "step_ms": step_ms, "constrained_programs": [str(k) for k in
                                                               compiled["constrained"]]},
                  f, indent=2)


if __name__ == "__main__":
    main()
