"""Shared fixtures: one tiny random Llama checkpoint for the engine tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers.tiny_models import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer GQA Llama with untied embeddings and a byte-level BPE tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), num_kv_heads=2, tie=False)
