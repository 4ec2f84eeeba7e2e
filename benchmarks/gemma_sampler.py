"""The `gemma` library's own sampler (`gm.text.Sampler`) against pagedjax on one random
Gemma-2-shaped model: train_eval.py's third anchor (issue 20). Same workload as there (N
prompts of 16-512 tokens, a greedy token budget of 16-256 each); gemma samples static
batches of `--batch-size` prompts, each to its longest budget (its sampler stops a row at
EOS, which random weights do not produce), pagedjax schedules them all with per-request
budgets. Each system runs twice; the second run is timed (the first compiles).

The model: SmolLM2-135M's dimensions (30 layers, hidden 576, 9 / 3 heads of 64, MLP 1536,
vocabulary 49152) in Gemma 2's architecture (sandwich norms, GeGLU, soft-caps, local /
global layers), random weights written once as an HF checkpoint for pagedjax and initialized
by gemma for its sampler: timing depends on the shapes only.

The gemma package does not install with its dependencies here (pip's resolver did not
finish in 400 s: kauldron -> xmanager -> google-cloud-aiplatform); it runs with the modules
its sampler imports, installed without dependencies into a folder of their own:

    pip install --no-deps --target /tmp/gemma-pkgs gemma kauldron etils einops jaxtyping \\
        treescope sentencepiece wadler_lindig clu tensorflow wrapt six gast astunparse \\
        termcolor flatbuffers lark typeguard immutabledict chex toolz ml-collections
    PYTHONPATH=/tmp/gemma-pkgs python benchmarks/gemma_sampler.py [--prompts 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from random_checkpoint import BOS_ID, EOS_ID, PAD_ID, make_tiny_tokenizer
from train_eval import MAX_NEW, MAX_PROMPT, MIN_NEW, MIN_PROMPT

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
             num_heads=9, num_kv_heads=3, head_dim=64, sliding_window=4096,
             attn_softcap=50.0, final_softcap=30.0)


def write_random_gemma2(model_dir: str) -> str:
    """A random Gemma2ForCausalLM of SHAPE (float32 safetensors) with the tests' tokenizer."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    s = SHAPE
    make_tiny_tokenizer(model_dir, s["vocab_size"])
    config = Gemma2Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], sliding_window=s["sliding_window"],
        attn_logit_softcapping=s["attn_softcap"], final_logit_softcapping=s["final_softcap"],
        query_pre_attn_scalar=s["head_dim"], max_position_embeddings=2048,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def gemma_model():
    """gemma's Transformer of SHAPE and a tokenizer reading prompts as token ids."""
    from gemma.gm.nn import _config, _modules, _transformer
    from gemma.gm.text import _tokenizer

    class IdTokenizer(_tokenizer.Gemma2Tokenizer):
        """Prompts written as token ids ("12 7 301"): no vocabulary file to download."""

        def encode(self, text, *, add_bos=False, add_eos=False):
            ids = [int(t) for t in text.split()]
            return ([self.special_tokens.BOS] if add_bos else []) + ids + (
                [self.special_tokens.EOS] if add_eos else [])

        def decode(self, ids):
            return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    s = SHAPE

    class SmallGemma2(_transformer.Transformer):
        config: _config.TransformerConfig = _config.TransformerConfig(
            num_embed=s["vocab_size"], embed_dim=s["hidden_size"],
            hidden_dim=s["intermediate_size"], num_heads=s["num_heads"],
            head_dim=s["head_dim"], num_kv_heads=s["num_kv_heads"],
            final_logit_softcap=s["final_softcap"],
            attention_types=(_modules.AttentionType.LOCAL_SLIDING,
                             _modules.AttentionType.GLOBAL) * (s["num_layers"] // 2),
            use_post_attn_norm=True, use_post_ffw_norm=True,
            query_pre_attn_norm=_config.QueryPreAttentionNormalisation
            .BY_ONE_OVER_SQRT_HEAD_DIM,
            attn_logits_soft_cap=s["attn_softcap"], sliding_window_size=s["sliding_window"])
        INFO = _transformer.ModelInfo(tokenizer_version=2)

    return SmallGemma2(), IdTokenizer(path="unused")


def time_gemma(prompts: list[list[int]], budgets: list[int], batch_size: int,
               dtype: str) -> float:
    """Seconds of gemma's sampler over the workload in static batches (second run)."""
    from gemma import gm

    model, tokenizer = gemma_model()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    sampler = gm.text.Sampler(model=model, params=params, tokenizer=tokenizer,
                              cache_length=MAX_PROMPT + MAX_NEW + 8, max_out_length=MAX_NEW)

    def run() -> float:
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            texts = [" ".join(map(str, p)) for p in prompts[i:i + batch_size]]
            sampler.sample(texts, max_new_tokens=max(budgets[i:i + batch_size]))
        return time.perf_counter() - start

    run()
    return run()


def time_pagedjax(model_dir: str, prompts: list[list[int]], budgets: list[int],
                  dtype: str) -> float:
    """Seconds of pagedjax's `generate` over the workload, per-request budgets (second run)."""
    from pagedjax import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, max_model_len=MAX_PROMPT + MAX_NEW + 8)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in budgets]

    def run() -> float:
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - start

    run()
    return run()


def main() -> None:
    """Time both systems on the same workload and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="gemma's static batch (train_eval.py's dense and hf use 16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.integers(MIN_PROMPT, MAX_PROMPT + 1, args.prompts)
    prompts = [[int(t) for t in rng.integers(300, SHAPE["vocab_size"], n)] for n in lengths]
    budgets = [int(b) for b in rng.integers(MIN_NEW, MAX_NEW + 1, args.prompts)]
    print(f"{args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, budgets "
          f"{min(budgets)}-{max(budgets)} (sum {sum(budgets)}), {args.dtype}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = write_random_gemma2(os.path.join(folder, "gemma2"))
        paged = time_pagedjax(model_dir, prompts, budgets, args.dtype)
    print(f"pagedjax: {paged:.2f} s, {sum(budgets) / paged:.1f} budget tok/s", flush=True)
    gemma = time_gemma(prompts, budgets, args.batch_size, args.dtype)
    print(f"gemma gm.text.Sampler (static batches of {args.batch_size}): {gemma:.2f} s, "
          f"{sum(budgets) / gemma:.1f} budget tok/s; pagedjax is {gemma / paged:.2f}x faster",
          flush=True)


if __name__ == "__main__":
    main()
