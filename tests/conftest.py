"""Shared fixtures: one tiny random Llama checkpoint for the engine tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers.engines import make_llm  # noqa: E402
from tests.helpers.tiny_models import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer GQA Llama with untied embeddings and a byte-level BPE tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), num_kv_heads=2, tie=False)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    """An LLM on the tiny Llama with the shared tiny-engine settings, one per test module
    (a module that needs other settings defines its own `llm`)."""
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    """HF transformers' float32 model of tiny_llama_dir: the parity tests' reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
