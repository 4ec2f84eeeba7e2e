"""Tiny random HF checkpoints of every registered architecture family (test-only: torch +
transformers), written like `tiny_models.make_tiny_llama`: random norm weights and biases
(HF initializes them to ones/zeros), the shared tiny tokenizer, safetensors weights."""

from __future__ import annotations

import os
from typing import Any

from tests.helpers.tiny_models import BOS_ID, EOS_ID, PAD_ID, make_tiny_tokenizer

# architecture -> (transformers config class name, model class name)
_CLASSES = {
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("Phi3Config", "Phi3ForCausalLM"),
    "GemmaForCausalLM": ("GemmaConfig", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("Gemma2Config", "Gemma2ForCausalLM"),
    "GPT2LMHeadModel": ("GPT2Config", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("OPTConfig", "OPTForCausalLM"),
}


# The zoo every family test runs over (tests/test_model_zoo.py, tests/test_forward.py):
# name -> (architecture, HF config overrides). Base: 2 layers, hidden 64, 4 heads, 2 KV
# heads, head_dim 16 (`_base_settings`). Sliding windows are 8 tokens, shorter than the
# tests' prompts, so they change the result.
VARIANTS = {
    "mistral_gqa_window": ("MistralForCausalLM", dict(sliding_window=8)),
    "qwen2_bias_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # layer_types [full, sliding]: the window on the upper layer only.
    "qwen2_window_upper_layer": ("Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3_qknorm_mha": ("Qwen3ForCausalLM", dict(num_key_value_heads=4, head_dim=32)),
    "phi3_fused": ("Phi3ForCausalLM", dict()),
    "gemma_mqa_tied": ("GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32)),
    "gemma2_softcap_window": ("Gemma2ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
    "gpt2_mha_tied": ("GPT2LMHeadModel", dict()),
    "opt_project_in_out": ("OPTForCausalLM", dict(word_embed_proj_dim=32)),
    "opt_postnorm_untied": ("OPTForCausalLM", dict(do_layer_norm_before=False,
                                                   tie_word_embeddings=False)),
}


def _base_settings(arch: str, vocab_size: int) -> dict[str, Any]:
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if arch == "GPT2LMHeadModel":
        return dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                    initializer_range=0.1, **ids)
    if arch == "OPTForCausalLM":
        return dict(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256,
                    word_embed_proj_dim=64, init_std=0.1, **ids)
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                initializer_range=0.1, **ids)


def make_tiny_model(model_dir: str | os.PathLike, architecture: str, *, dtype: str = "float32",
                    seed: int = 0, **config_overrides: Any) -> str:
    """Write a random 2-layer (hidden 64, 4 heads) `architecture` model with the tiny
    tokenizer to `model_dir` and return it. `config_overrides` go to the HF config."""
    import torch
    import transformers

    config_name, model_name = _CLASSES[architecture]
    model_dir = os.fspath(model_dir)
    vocab_size = make_tiny_tokenizer(model_dir)
    settings = _base_settings(architecture, vocab_size)
    settings.update(config_overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**settings)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif param.ndim == 1:  # norm weights (Gemma's are 1 + w: also off zero)
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(model_dir)
    return model_dir


# HF per-layer suffix -> llama.cpp tensor suffix for the llama-named GGUF architectures.
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # Phi-3's fused tensors
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# Gemma 2's extra norms (gguf-py's tensor_mapping: ATTN_POST_NORM, FFN_PRE_NORM, FFN_POST_NORM).
_GGUF_GEMMA2_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
# GPT-2 (HF name after "transformer.h.N.") -> llama.cpp's gpt2 tensor names.
_GGUF_GPT2_LAYER_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_GGUF_GPT2_TOP_NAMES = {
    "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
# GPT-2's Conv1D weights are [in, out]; llama.cpp's converter transposes them.
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def make_tiny_gguf(model_dir: str | os.PathLike, path: str | os.PathLike,
                   gguf_arch: str) -> str:
    """Convert a tiny Qwen2/Qwen3/Phi-3/Gemma/Gemma 2/GPT-2 checkpoint from `make_tiny_model`
    to an F32 GGUF the way llama.cpp's converter does for these: NEOX RoPE (q/k rows not
    permuted), Phi-3's fused qkv / gate_up kept fused, Gemma's norm weights stored as 1 + w,
    Gemma 2's soft-caps and window as metadata (no query_pre_attn_scalar, no RoPE base),
    GPT-2's Conv1D weights transposed to [out, in] and its LayerNorm epsilon key."""
    import json

    import gguf
    import numpy as np

    from tests.helpers.tiny_gguf import hf_checkpoint_tensors

    model_dir, path = os.fspath(model_dir), os.fspath(path)
    config, state = hf_checkpoint_tensors(model_dir)
    writer = gguf.GGUFWriter(path, gguf_arch)
    if gguf_arch == "gpt2":
        # What llama.cpp's GPT2Model.set_gguf_parameters writes.
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if gguf_arch == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
            writer.add_sliding_window(config.sliding_window)
        else:
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)
    tokens = [t for t, _ in sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the tiny tokenizer splits like GPT-2
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    gpt2 = gguf_arch == "gpt2"
    top_names = _GGUF_GPT2_TOP_NAMES if gpt2 else _GGUF_TOP_NAMES
    layer_names = {"gpt2": _GGUF_GPT2_LAYER_NAMES,
                   "gemma2": _GGUF_GEMMA2_LAYER_NAMES}.get(gguf_arch, _GGUF_LAYER_NAMES)
    for hf_name, array in state.items():
        if gpt2 and hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # attention-mask buffers: the converter drops them
        if hf_name in top_names:
            name = top_names[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{layer_names[rest]}"
        if gguf_arch in ("gemma", "gemma2") and name.endswith("norm.weight"):
            array = array + 1.0
        if gpt2 and hf_name.endswith(_GPT2_CONV1D):
            array = array.T
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
