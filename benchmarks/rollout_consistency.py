"""The consistency guarantee of issue 20, measured: a float32 rollout's raw logprobs
against log_softmax(pagedjax.forward(...)) at the same tokens, on the default model.

    python benchmarks/rollout_consistency.py                # 16 prompts x n=8 x 16 tokens
    python benchmarks/rollout_consistency.py --prompts 4 --max-tokens 8

Prompts of 40-120 tokens with max_num_batched_tokens=64, so long prompts are prefilled in
chunks; n=8 rows per prompt share their prompt's pages (forks, copy-on-write), sampled at
temperature 1 with top-p 0.95. Prints the sampled tokens compared and the max / mean
absolute logprob difference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from throughput import make_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="rows per forward call")
    args = parser.parse_args()

    import jax

    import pagedjax
    from pagedjax.loading import load_model
    from pagedjax.models import SUPPORTED_ARCHITECTURES

    config, params, tokenizer = load_model(None, supported_architectures=SUPPORTED_ARCHITECTURES)
    prompts = make_prompts(tokenizer, args.prompts, 40, 120, seed=5)
    sampling = pagedjax.SamplingParams(n=args.n, temperature=1.0, top_p=0.95, seed=0,
                                       max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    rollout = pagedjax.rollout(params, prompts, sampling, config=config, tokenizer=tokenizer,
                               dtype="float32", max_num_batched_tokens=64, max_model_len=256)
    rollout_seconds = time.perf_counter() - start

    inputs = rollout.forward_inputs()
    params = jax.device_put(params)
    step = jax.jit(lambda p, ids, seg, gen: pagedjax.completion_logprobs(
        pagedjax.forward(p, config, ids, segment_ids=seg), gen))
    start = time.perf_counter()
    trainer = np.concatenate([
        np.asarray(step(params, inputs["token_ids"][i:i + args.batch],
                        inputs["segment_ids"][i:i + args.batch],
                        rollout.completion_ids[i:i + args.batch]))
        for i in range(0, len(rollout.completion_ids), args.batch)])
    forward_seconds = time.perf_counter() - start
    diff = np.abs(trainer - rollout.completion_logprobs)[rollout.completion_mask]
    print(f"{diff.size} sampled tokens ({len(prompts)} prompts x n={args.n}); "
          f"rollout {rollout_seconds:.1f}s, forward {forward_seconds:.1f}s")
    print(f"|rollout raw_logprobs - log_softmax(forward)|: max {diff.max():.2e}, "
          f"mean {diff.mean():.2e}")


if __name__ == "__main__":
    main()
