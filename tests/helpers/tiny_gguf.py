"""Writing a tiny HF Llama checkpoint as a llama.cpp-style GGUF file (test-only).

Mirrors what llama.cpp's convert_hf_to_gguf.py does for llama models: tensor renaming, the
q/k row permutation, and the tokenizer metadata, so GGUF loading can be checked against
the same weights loaded from safetensors.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF rotate-half -> GPT-J pairs)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# K-quant super-blocks of 256 values: (block bytes, {field: (start, stop)} of the f16 scales
# set by hand; everything else is random bits). Byte layouts as in ggml-common.h.
K_QUANT_LAYOUTS = {
    "Q4_K": (144, {"d": (0, 2), "dmin": (2, 4)}),   # d, dmin, scales[12], qs[128]
    "Q5_K": (176, {"d": (0, 2), "dmin": (2, 4)}),   # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (210, {"d": (208, 210)}),                # ql[128], qh[64], scales[16] (int8), d
}
# d (and dmin) per type so that random blocks dequantize to values of about the weights'
# spread `s`: d * scale * q with 6-bit scales and 4/5/6-bit q (Q6_K: signed 8-bit scales).
_K_QUANT_D = {"Q4_K": 1 / (32 * 7.5), "Q5_K": 1 / (32 * 15.5), "Q6_K": 1 / (64 * 32)}


def random_k_quant_blocks(array: np.ndarray, qtype: str, seed: str) -> np.ndarray:
    """Random `qtype` ("Q4_K", "Q5_K", "Q6_K") blocks for a matrix shaped like `array`,
    as the uint8 [rows, row bytes] array GGUFWriter takes; values have about the spread of
    `array` (and mean near 0). Deterministic in `seed`."""
    rows, cols = array.shape
    if cols % 256:
        raise ValueError(f"{qtype} needs rows of a multiple of 256 values, got {cols}")
    block_bytes, f16_fields = K_QUANT_LAYOUTS[qtype]
    rng = np.random.default_rng(sum(seed.encode()) * 7919 + len(seed))
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    d = np.float16(float(np.std(array)) * _K_QUANT_D[qtype])
    for field, (start, stop) in f16_fields.items():
        # dmin ~ d * mean(q): the subtracted minimum re-centres the values near 0.
        value = d if field == "d" else np.float16(float(d) * {"Q4_K": 7.5, "Q5_K": 15.5}[qtype])
        blocks[:, start:stop] = np.frombuffer(value.tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 256 * block_bytes)


def _gguf_name(hf_name: str) -> Optional[str]:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def hf_checkpoint_tensors(model_dir: str) -> tuple[object, dict[str, np.ndarray]]:
    """(HF config, float32 numpy state dict) of the checkpoint in `model_dir`, without the
    lm_head of tied-embedding models (a GGUF stores only the embedding then)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


def make_tiny_llama_gguf(model_dir: str | os.PathLike, path: str | os.PathLike, *,
                         qtype: str = "F32", pre: str = "gpt-2",
                         tokenizer_model: str = "gpt2", architecture: str = "llama") -> str:
    """Convert the HF checkpoint in `model_dir` (e.g. from `make_tiny_llama`) to a GGUF at
    `path`; matrices are stored as `qtype`, norms as F32.

    `qtype` is any type `gguf.quants.quantize` writes ("F32", "F16", "BF16", "Q8_0", "Q4_0",
    "Q4_1", "Q5_0", "Q5_1") or a K-quant ("Q4_K", "Q5_K", "Q6_K"). gguf-py cannot quantize
    K-quants, so their matrices are random blocks of the right layout (see
    `random_k_quant_blocks`), not the model's weights; rows must be a multiple of 256 long.

    `pre`, `tokenizer_model` and `architecture` are written as given, so tests can make
    files the loader must reject."""
    import gguf

    model_dir, path = os.fspath(model_dir), os.fspath(path)
    config, state = hf_checkpoint_tensors(model_dir)

    writer = gguf.GGUFWriter(path, architecture)
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)
    vocab = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if template:
        writer.add_chat_template(template)

    quant = gguf.GGMLQuantizationType[qtype]
    for hf_name, array in state.items():
        name = _gguf_name(hf_name)
        if name is None:
            continue
        if ".attn_q." in name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif ".attn_k." in name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            if quant == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                if quant.name in K_QUANT_LAYOUTS:
                    data = random_k_quant_blocks(array, quant.name, seed=name)
                else:
                    data = gguf.quants.quantize(array, quant)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=quant)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
