"""Random-weight HF Llama checkpoints with a small tokenizer (uses torch + transformers).

`make_tiny_llama` writes a complete HF model directory: config.json, generation_config.json,
safetensors weights (single file or sharded), and a small byte-level BPE tokenizer
(tokenizer.json + tokenizer_config.json with a ChatML chat template) that both
`pagedjax.loading.Tokenizer.from_hf_dir` and transformers' AutoTokenizer read.

Shared by the tests (as tests.helpers.tiny_models, which re-exports it) and the benchmark
scripts (random_model.py imports it as a sibling module, without editing sys.path).
"""

from __future__ import annotations

import json
import os
from typing import Any

# ChatML, as SmolLM2 uses (without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0

# A few English merges so common words become single tokens; fixed, so ids never change.
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("Ġ", "w"), ("a", "t"), ("e", "n"), ("Ġ", "o"), ("i", "s"),
    ("o", "r"), ("Ġ", "c"), ("Ġ", "b"), ("Ġ", "f"), ("e", "s"), ("i", "t"), ("a", "n"),
    ("Ġ", "h"), ("Ġ", "p"), ("Ġ", "m"), ("in", "g"), ("Ġ", "i"), ("e", "d"), ("Ġ", "d"),
    ("Ġ", "l"), ("l", "l"), ("o", "u"), ("Ġa", "n"), ("Ġan", "d"), ("Ġo", "f"), ("Ġt", "o"),
]


def _byte_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 byte values, in byte order.
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def make_tiny_tokenizer(model_dir: str | os.PathLike, vocab_size: int | None = None) -> int:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json; return the
    vocabulary size (special tokens 0..2, 256 bytes, then merges). With `vocab_size`, the
    vocabulary is filled up to it with words " w<id>" that encoding never produces but
    decoding spells out, so a larger model's every id has text (as a real vocabulary's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *_byte_alphabet()):
        vocab[token] = len(vocab)
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    for token_id in range(len(vocab), vocab_size or 0):
        vocab[f"Ġw{token_id}"] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 512,
        "chat_template": CHATML_TEMPLATE,
    }
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}
    with open(os.path.join(model_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return len(vocab)


def make_tiny_llama(
    model_dir: str | os.PathLike,
    *,
    num_kv_heads: int = 2,
    tie: bool = False,
    dtype: str = "float32",
    shard: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> str:
    """Write a random 2-layer LlamaForCausalLM (hidden 64, 4 heads, `num_kv_heads` KV heads)
    with its tokenizer to `model_dir`, and return `model_dir`.

    `dtype` is the saved weight dtype ("float32", "bfloat16", "float16"); `shard` splits
    the weights into several files with a model.safetensors.index.json. Norm weights are
    randomized too (HF initializes them to ones), so a swapped norm shows in parity tests.
    `config_overrides` go to `LlamaConfig` (e.g. num_hidden_layers=3, attention_bias=True).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    model_dir = os.fspath(model_dir)
    vocab_size = make_tiny_tokenizer(model_dir, config_overrides.get("vocab_size"))
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        # Wider than HF's 0.02 so logits are well separated and greedy ties are unlikely.
        initializer_range=0.1,
    )
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID)
    save_kwargs = {"max_shard_size": "40KB"} if shard else {}
    model.save_pretrained(model_dir, **save_kwargs)
    return model_dir
