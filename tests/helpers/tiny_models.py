"""Tiny random HF checkpoints for fast tests (test-only: uses torch + transformers).

The writer lives in benchmarks/random_checkpoint.py, so that the benchmark scripts import
it without editing sys.path; the tests keep importing it under this name.
"""

from benchmarks.random_checkpoint import (  # noqa: F401 (re-exported)
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    make_tiny_llama,
    make_tiny_tokenizer,
)
