"""Tiny random Llama-family models: pagedjax logits equal HF transformers' (fp32) at prefill
and decode, with two sequences sharing each paged step."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedjax import LLM
from tests.helpers.hf_reference import (
    check_greedy_matches_hf,
    check_paged_logits,
)
from tests.helpers.tiny_models import make_tiny_llama

VARIANTS = {
    "gqa_untied": dict(num_kv_heads=2, tie=False),
    "mha_tied": dict(num_kv_heads=4, tie=True),
    "mqa_bias_llama3_rope": dict(
        num_kv_heads=1, tie=False, attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}
ATOL = 2e-4  # fp32; logits are O(1-10)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    model_dir = make_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model_dir, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_blocks=40, block_size=4)
    return SimpleNamespace(hf=hf, llm=llm)


def test_logits_match_hf_at_prefill_and_decode(tiny):
    check_paged_logits(tiny.llm.engine, tiny.hf, atol=ATOL)


def test_greedy_ids_match_hf_generate_over_32_tokens(tiny):
    check_greedy_matches_hf(tiny.llm, tiny.hf, lengths=(3, 11, 24, 6))
