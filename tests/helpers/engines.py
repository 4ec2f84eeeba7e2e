"""The small engine settings most tests run the tiny random Llama with."""

import dataclasses

from pagedjax import LLM

# 16-token smallest steps (the default on CPU is 1): fewer programs to compile per test;
# tests of the 1-token shapes ask for them.
TINY_ENGINE_SETTINGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                            block_size=4, num_blocks=128, min_token_bucket=16)


# Structured-output tests (offline and served): one step shape, room for tool prompts.
STRUCTURED_SETTINGS = dict(TINY_ENGINE_SETTINGS, max_model_len=256, max_num_seqs=16)

# Two prompts of tiny-vocabulary token ids (7 and 11 tokens) for the tiny Llama.
TINY_PROMPTS = [[5, 17, 42, 99, 7, 3, 250], [8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201]]


def make_llm(model_dir, **overrides):
    """An LLM on `model_dir` with TINY_ENGINE_SETTINGS, some of them overridden."""
    return LLM(model_dir, **{**TINY_ENGINE_SETTINGS, **overrides})


def token_ids(outputs):
    """The first completion's token ids of each RequestOutput."""
    return [o.outputs[0].token_ids for o in outputs]


def one_step_shape(llm, tokens, seqs):
    """`llm` with every step padded to one bucket (`tokens` tokens, `seqs` sequences), so
    a test module compiles one plain program (and one with token bitmasks) in all."""
    for engine in getattr(llm.engine, "replicas", [llm.engine]):  # data parallel: each
        engine.buckets = dataclasses.replace(engine.buckets, tokens=(tokens,), seqs=(seqs,))
    return llm
