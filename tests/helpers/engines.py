"""The small engine settings most tests run the tiny random Llama with."""

from pagedjax import LLM

TINY_ENGINE_SETTINGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                            block_size=4, num_blocks=128)


def make_llm(model_dir, **overrides):
    """An LLM on `model_dir` with TINY_ENGINE_SETTINGS, some of them overridden."""
    return LLM(model_dir, **{**TINY_ENGINE_SETTINGS, **overrides})
