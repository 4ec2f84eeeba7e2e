"""Offline generation throughput of pagedjax on the default model (a quick check, not the
side-by-side benchmark against HF transformers, which is benchmarks/throughput.py).

    python benchmarks/generate_throughput.py [--prompts 64] [--max-tokens 64]

Runs the workload twice: the first pass includes compiling the step programs it needs, the
second shows steady-state speed with everything compiled.
"""

from __future__ import annotations

import argparse
import time

from pagedjax import LLM, SamplingParams


def main() -> None:
    """Time greedy generation for a fixed batch of prompts and print tokens/s."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()

    # the second run repeats the first's prompts: prefix caching would serve them
    llm = LLM(args.model, max_model_len=args.max_model_len, max_num_seqs=args.prompts,
              enable_prefix_caching=False)
    prompts = [f"Tell me a fact about the number {i}." for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for label in ("first run (compiles included)", "second run (compiled)"):
        compiles_before = llm.num_compiles
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"{label}: {generated} tokens in {seconds:.2f}s = {generated / seconds:.1f} tok/s; "
              f"{llm.num_compiles - compiles_before} new compiles")
    stats = llm.engine.stats
    print(f"compiles: {llm.num_compiles} in {llm.engine.compile_seconds:.1f}s; steps: "
          f"{stats.num_steps}; mean block-tail waste {stats.mean_waste:.1%}")


if __name__ == "__main__":
    main()
