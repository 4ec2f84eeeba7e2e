"""A random-weight HF checkpoint with the default model's shape, for machines without it.

    python benchmarks/random_model.py /tmp/smollm2-shape     # then: --model /tmp/smollm2-shape

A lent GPU machine reaches no model hub and its file transfers are smaller than the default
model's GGUF (98 MB), so GPU benchmarks run on this instead: SmolLM2-135M's shape (30
layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocabulary 49152, tied
embeddings, RoPE theta 1e5) with random weights and the tests' byte-level tokenizer, its
vocabulary filled to 49152 with spelled-out words so that every id decodes to text (as a
real vocabulary's do: the detokenizer's host work stays realistic). Speed depends on the
shape only; the text it generates is noise. Needs torch and
transformers (the benchmark dependencies).
"""

from __future__ import annotations

import sys

from random_checkpoint import make_tiny_llama  # benchmarks/ is sys.path[0] for its scripts

DEFAULT_MODEL_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, rope_theta=100000.0, max_position_embeddings=8192,
)


def write_random_default_shape(model_dir: str, seed: int = 0) -> str:
    """Write the random checkpoint to `model_dir` (float32 safetensors) and return it."""
    return make_tiny_llama(model_dir, num_kv_heads=3, tie=True, seed=seed,
                           **DEFAULT_MODEL_SHAPE)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} MODEL_DIR")
    print(write_random_default_shape(sys.argv[1]))
