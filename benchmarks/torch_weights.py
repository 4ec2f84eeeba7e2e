"""An HF transformers Llama on our params: what a PyTorch trainer holds, and the copy of
JAX params into it that train_eval.py times as HF's weight sync (uses torch +
transformers)."""

from __future__ import annotations

import warnings

import jax
import numpy as np

from pagedjax.models import ModelConfig


def hf_llama(config: ModelConfig):
    """An HF LlamaForCausalLM of `config`'s shape (float32, eval mode, weights to load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.architecture != "LlamaForCausalLM" or config.rope_scaling.rope_type != "default":
        raise ValueError("hf_llama builds plain Llama models only")
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_config).float().eval()


def torch_state_dict(params: dict, config: ModelConfig) -> dict:
    """HF Llama tensors of `params` (stacked, matrices [out, in] as HF's), via one host
    copy of every array."""
    import torch

    host = jax.tree.map(np.asarray, jax.device_get(params))
    H, K, D, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    state = {"model.embed_tokens.weight": host["embed"], "model.norm.weight": host["final_norm"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = host["lm_head"]
    layers = host["layers"]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        wqkv, w_gate_up = layers["wqkv"][i], layers["w_gate_up"][i]
        state.update({
            prefix + "self_attn.q_proj.weight": wqkv[:H * D],
            prefix + "self_attn.k_proj.weight": wqkv[H * D:(H + K) * D],
            prefix + "self_attn.v_proj.weight": wqkv[(H + K) * D:],
            prefix + "self_attn.o_proj.weight": layers["wo"][i],
            prefix + "mlp.gate_proj.weight": w_gate_up[:F],
            prefix + "mlp.up_proj.weight": w_gate_up[F:],
            prefix + "mlp.down_proj.weight": layers["w_down"][i],
            prefix + "input_layernorm.weight": layers["attn_norm"][i],
            prefix + "post_attention_layernorm.weight": layers["mlp_norm"][i],
        })
    with warnings.catch_warnings():  # read-only host views: load_state_dict only reads them
        warnings.simplefilter("ignore", UserWarning)
        return {name: torch.from_numpy(np.ascontiguousarray(value, np.float32))
                for name, value in state.items()}


def load_into(model, params: dict, config: ModelConfig) -> None:
    """Copy `params` into the HF `model` (every weight; strict)."""
    missing, unexpected = model.load_state_dict(torch_state_dict(params, config), strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
