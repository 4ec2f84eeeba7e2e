"""The consistency guarantee of issue 20, measured: a float32 rollout's raw logprobs
against log_softmax(pagedjax.forward(...)) at the same tokens, on the default model, with
the default numerics and with the exact ones on both sides (the engine's
attention_backend="exact", the forward's exact=True).

    python benchmarks/rollout_consistency.py                # 16 prompts x n=8 x 16 tokens
    python benchmarks/rollout_consistency.py --prompts 4 --max-tokens 8 --numerics exact

Prompts of 40-120 tokens with max_num_batched_tokens=64, so long prompts are prefilled in
chunks; n=8 rows per prompt share their prompt's pages (forks, copy-on-write), sampled at
temperature 1 with top-p 0.95. Prints, per numerics, the sampled tokens compared, the
max / mean absolute logprob difference, the rollout's seconds (twice on one engine: the
first compiles) and the forward's (compiles included).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from throughput import make_prompts

BACKENDS = {"default": "auto", "exact": "exact"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="rows per forward call")
    parser.add_argument("--numerics", nargs="+", choices=sorted(BACKENDS),
                        default=["default", "exact"])
    args = parser.parse_args()

    import jax

    import pagedjax
    from pagedjax.loading import load_model
    from pagedjax.models import SUPPORTED_ARCHITECTURES

    config, params, tokenizer = load_model(None, supported_architectures=SUPPORTED_ARCHITECTURES)
    prompts = make_prompts(tokenizer, args.prompts, 40, 120, seed=5)
    sampling = pagedjax.SamplingParams(n=args.n, temperature=1.0, top_p=0.95, seed=0,
                                       max_tokens=args.max_tokens, ignore_eos=True)
    device_params = jax.device_put(params)
    for numerics in args.numerics:
        exact = numerics == "exact"
        cache = pagedjax.EngineCache()
        seconds = []
        for _ in range(2):  # compiles in the first round only
            start = time.perf_counter()
            rollout = pagedjax.rollout(params, prompts, sampling, config=config,
                                       tokenizer=tokenizer, cache=cache, dtype="float32",
                                       attention_backend=BACKENDS[numerics],
                                       max_num_batched_tokens=64, max_model_len=256)
            seconds.append(time.perf_counter() - start)

        inputs = rollout.forward_inputs()
        step = jax.jit(lambda p, ids, seg, gen: pagedjax.completion_logprobs(
            pagedjax.forward(p, config, ids, segment_ids=seg, exact=exact), gen, exact))
        start = time.perf_counter()
        trainer = np.concatenate([
            np.asarray(step(device_params, inputs["token_ids"][i:i + args.batch],
                            inputs["segment_ids"][i:i + args.batch],
                            rollout.completion_ids[i:i + args.batch]))
            for i in range(0, len(rollout.completion_ids), args.batch)])
        forward_seconds = time.perf_counter() - start
        diff = np.abs(trainer - rollout.completion_logprobs)[rollout.completion_mask]
        print(f"{numerics}: {diff.size} sampled tokens ({len(prompts)} prompts x n={args.n}); "
              f"rollout {seconds[0]:.1f}s, again {seconds[1]:.1f}s, forward "
              f"{forward_seconds:.1f}s; "
              f"|rollout raw_logprobs - log_softmax(forward)|: max {diff.max():.2e}, "
              f"mean {diff.mean():.2e}, equal bits {np.mean(diff == 0):.1%}")


if __name__ == "__main__":
    main()
