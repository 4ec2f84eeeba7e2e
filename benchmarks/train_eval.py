"""Evaluation sampling inside a training loop (issue 20). Each round the weights change (a
stand-in for an optimizer step), are synced into the sampler, and an eval set with mixed
prompt lengths (16-512 tokens) and mixed output lengths (a token budget per request, as EOS
at varied points would give) is sampled greedily. Per round and system: sync time, sampling
time, output tok/s (the budgets' tokens: what the eval reads), compiles.

Systems, all on the same weights:
  pagedjax   `LLM.update_params(params)` with the trainer's device arrays, then `generate`
  hf         (a) HF transformers static-batch `generate` on a torch copy of the weights
             made each round (what a PyTorch trainer holds); a batch runs to its longest
  dense      (b) the static-batch sampler JAX training codebases write (dense_sampler.py):
             prompts padded to 512, a dense [B, L, 512 + G, K, D] KV cache, greedy decode in
             a lax.while_loop until the batch's longest budget; fixed shapes, one compile
The gemma library's own sampler, a third anchor, runs in gemma_sampler.py (it needs the
gemma package and a Gemma-shaped model). Then the sync time alone (`update_params`, median
of 5) for the default model and for a
~1.2B-parameter Llama-3.2-1B-shaped model (constant weights: sync does not read values).

    python benchmarks/train_eval.py                            # --rounds 3 --scale 1
    python benchmarks/train_eval.py --scale 0.25 --rounds 2    # a few minutes on 2 cores
    python benchmarks/train_eval.py --sync-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dense_sampler import StaticBatchSampler  # benchmarks/ is sys.path[0] for its scripts
from throughput import make_prompts
from torch_weights import hf_llama, load_into

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_PROMPT, MAX_PROMPT = 16, 512
MIN_NEW, MAX_NEW = 16, 256
ONE_B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                   rope_theta=500000.0, tie_word_embeddings=True,
                   max_position_embeddings=8192)  # Llama-3.2-1B, without its RoPE scaling


def workload(tokenizer, num_prompts: int, seed: int = 0):
    """Prompts of 16-512 tokens and a token budget of 16-256 for each."""
    prompts = make_prompts(tokenizer, num_prompts, MIN_PROMPT, MAX_PROMPT, seed=seed)
    budgets = np.random.default_rng(seed + 1).integers(MIN_NEW, MAX_NEW + 1, num_prompts)
    return prompts, [int(b) for b in budgets]


def timed(fn: Callable, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


class PagedjaxSystem:
    """The engine built on the trainer's device arrays (used as they are), or with
    `per_layer` on host copies: on CPU that engine keeps each layer's matrices as separate
    arrays (faster steps; every sync then splits the trainer's stacked arrays, a copy)."""

    def __init__(self, params, config, tokenizer, prompts, budgets, per_layer: bool = False):
        from pagedjax import LLM, SamplingParams

        self.name = "pagedjax-per-layer" if per_layer else "pagedjax"
        if per_layer:
            params = jax.tree.map(np.asarray, jax.device_get(params))
        # A pool holding the whole eval set (prefix caching off: every round's prompts are
        # the same, the cache would serve them).
        self.llm = LLM.from_params(params, config, tokenizer, max_model_len=1024,
                                   max_num_seqs=len(prompts), enable_prefix_caching=False,
                                   num_blocks=sum(-(-(len(p) + b) // 64)
                                                  for p, b in zip(prompts, budgets)) + 1)
        self.batch = [{"prompt_token_ids": p} for p in prompts]
        self.sampling = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True)
                         for b in budgets]

    @property
    def num_compiles(self) -> int:
        return self.llm.num_compiles

    def sync(self, params) -> None:
        self.llm.update_params(params)

    def sample(self, params) -> list[list[int]]:
        outputs = self.llm.generate(self.batch, self.sampling, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


class DenseSystem:
    name = "dense"

    def __init__(self, config, prompts, budgets, batch_size):
        self.sampler = StaticBatchSampler(config, batch_size, MAX_PROMPT, MAX_NEW)
        self.prompts, self.budgets = prompts, budgets

    @property
    def num_compiles(self) -> int:
        return self.sampler.num_compiles

    def sync(self, params) -> None:
        jax.block_until_ready(params)  # the trainer's arrays are the sampler's argument

    def sample(self, params) -> list[list[int]]:
        return self.sampler.generate(params, self.prompts, self.budgets)


class HFSystem:
    name = "hf"
    num_compiles = 0

    def __init__(self, config, prompts, budgets, batch_size):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.model = hf_llama(config)
        self.model.generation_config.eos_token_id = None  # every row runs to its batch's max
        self.config, self.prompts, self.budgets = config, prompts, budgets
        self.batch_size = batch_size

    def sync(self, params) -> None:
        load_into(self.model, params, self.config)

    def sample(self, params) -> list[list[int]]:
        import torch

        outputs = []
        for first in range(0, len(self.prompts), self.batch_size):
            batch = self.prompts[first:first + self.batch_size]
            budgets = self.budgets[first:first + self.batch_size]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=max(budgets), pad_token_id=0)
            outputs += [out[row, width:width + b].tolist() for row, b in enumerate(budgets)]
        return outputs


def run_rounds(systems: list, base_params, rounds: int, useful_tokens: int) -> dict:
    """Per round: new weights, then each system syncs and samples (systems alternate
    order); returns the per-round rows and round 1's token ids per system."""
    perturb = jax.jit(lambda p, s: jax.tree.map(lambda x: x * s, p))
    rows, first_tokens, params = [], {}, None
    for index in range(rounds):
        # Last round's weights stay alive through this round's syncs, as a trainer's old
        # state lives until its step returns: no sync pays for freeing them (on CPU,
        # dropping 540 MB of weights takes ~50 ms).
        previous = params
        params = jax.block_until_ready(perturb(base_params, 1.0 + 1e-3 * (index + 1)))
        order = systems if index % 2 == 0 else systems[::-1]
        for system in order:
            compiles = system.num_compiles
            _, sync_s = timed(system.sync, params)
            tokens, sample_s = timed(system.sample, params)
            first_tokens.setdefault(system.name, tokens)
            row = {"round": index + 1, "system": system.name, "sync_ms": 1e3 * sync_s,
                   "sample_s": sample_s, "out_tok_s": useful_tokens / sample_s,
                   "compiles": system.num_compiles - compiles}
            rows.append(row)
            print(f"round {row['round']} {row['system']:>8}: sync {row['sync_ms']:9.2f} ms  "
                  f"sample {row['sample_s']:7.2f} s  {row['out_tok_s']:7.1f} tok/s  "
                  f"compiles {row['compiles']}", flush=True)
        del previous
    return {"rows": rows, "first_tokens": first_tokens}


def agreement(first_tokens: dict) -> dict:
    """Share of requests whose round-1 greedy tokens equal pagedjax's, per other system."""
    mine = first_tokens["pagedjax"]
    return {name: float(np.mean([a == b for a, b in zip(mine, theirs)]))
            for name, theirs in first_tokens.items() if name != "pagedjax"}


def summarize(rows: list[dict]) -> dict:
    """Per system, the mean over rounds after the first (round 1 also compiles)."""
    systems = sorted({r["system"] for r in rows})
    later = [r for r in rows if r["round"] > 1] or rows
    summary = {}
    for name in systems:
        mine = [r for r in later if r["system"] == name]
        summary[name] = {key: statistics.mean(r[key] for r in mine)
                         for key in ("sync_ms", "sample_s", "out_tok_s")}
        summary[name]["round_s"] = summary[name]["sample_s"] + summary[name]["sync_ms"] / 1e3
        summary[name]["compiles_after_round_1"] = sum(
            r["compiles"] for r in rows if r["system"] == name and r["round"] > 1)
    if "pagedjax" in summary:
        for name in systems:
            summary[name]["pagedjax_speedup"] = (summary[name]["round_s"]
                                                 / summary["pagedjax"]["round_s"])
    return summary


def sync_times(label: str, config, tokenizer, params, dtype: str, repeats: int = 5) -> dict:
    """Median `update_params` ms: the trainer's device arrays in the engine dtype (no copy),
    then the same weights as host numpy arrays (a transfer) and, for a bfloat16 engine,
    as float32 device arrays (a cast)."""
    from pagedjax import LLM

    llm = LLM.from_params(params, config, tokenizer, dtype=dtype, max_model_len=256,
                          block_size=64, num_blocks=8, max_num_seqs=4)

    def median_ms(new) -> float:
        times = []
        for _ in range(repeats):
            _, seconds = timed(llm.update_params, new)
            jax.block_until_ready(llm.engine.runner.params)
            times.append(1e3 * seconds)
        return statistics.median(times)

    result = {"model": label, "params": sum(x.size for x in jax.tree.leaves(params)),
              "engine_dtype": dtype, "device_same_dtype_ms": median_ms(params)}
    host = jax.tree.map(lambda x: np.array(x), params)
    result["host_numpy_ms"] = median_ms(host)
    del host
    if dtype == "bfloat16":
        wide = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        result["device_float32_cast_ms"] = median_ms(wide)
        del wide
    llm.update_params(params)
    print(f"sync {label}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.items() if k != "model"), flush=True)
    return result


def one_b_params(config, dtype) -> dict:
    """Constant weights of `config`'s shape in `dtype` (sync never reads their values)."""
    from pagedjax.models.params import expected_shapes

    return jax.tree.map(lambda shape: jnp.full(shape, 0.01, dtype), expected_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the 64-prompt eval set")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="static batch of the hf and dense samplers")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--per-layer", action="store_true",
                        help="also run pagedjax with the CPU per-layer weight form")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--sync-only", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "train_eval.json"))
    args = parser.parse_args(argv)

    from pagedjax.loading import load_model
    from pagedjax.models import SUPPORTED_ARCHITECTURES, ModelConfig

    config, host_params, tokenizer = load_model(
        None, supported_architectures=SUPPORTED_ARCHITECTURES)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), host_params)  # the trainer's
    del host_params
    report = {"machine": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores",
              "argv": argv}
    if not args.sync_only:
        count = max(2, round(64 * args.scale))
        prompts, budgets = workload(tokenizer, count)
        print(f"eval set: {count} prompts of {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} tokens (mean {np.mean([len(p) for p in prompts]):.0f}), "
              f"budgets {min(budgets)}-{max(budgets)} (sum {sum(budgets)}); static batch "
              f"{args.batch_size}", flush=True)
        systems = [PagedjaxSystem(params, config, tokenizer, prompts, budgets)]
        if args.per_layer:
            systems.append(PagedjaxSystem(params, config, tokenizer, prompts, budgets,
                                          per_layer=True))
        if not args.skip_dense:
            systems.append(DenseSystem(config, prompts, budgets, args.batch_size))
        if not args.skip_hf:
            systems.append(HFSystem(config, prompts, budgets, args.batch_size))
        result = run_rounds(systems, params, args.rounds, sum(budgets))
        report.update(workload={"prompts": count, "sum_budgets": sum(budgets),
                                "batch_size": args.batch_size},
                      rounds=result["rows"], summary=summarize(result["rows"]),
                      agreement_with_pagedjax=agreement(result["first_tokens"]))
        for name, row in report["summary"].items():
            print(f"{name:>8}: round {row['round_s']:.2f} s (sync {row['sync_ms']:.2f} ms), "
                  f"{row['out_tok_s']:.1f} tok/s, compiles after round 1: "
                  f"{row['compiles_after_round_1']}, pagedjax is "
                  f"{row['pagedjax_speedup']:.2f}x faster")
        print(f"round-1 greedy tokens equal to pagedjax's: {report['agreement_with_pagedjax']}")
        del systems
    report["sync"] = [sync_times("default model (SmolLM2-135M)", config, tokenizer, params,
                                 "float32")]
    if not args.skip_1b:
        del params
        one_b = ModelConfig(architecture="LlamaForCausalLM", **ONE_B_SHAPE)
        report["sync"].append(sync_times("Llama-3.2-1B shape", one_b, tokenizer,
                                         one_b_params(one_b, jnp.bfloat16), "bfloat16"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
