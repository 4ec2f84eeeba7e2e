"""Loading an HF transformers checkpoint directory (config.json + safetensors) into params.

HF keeps one tensor per projection per layer; params fuse q/k/v and gate/up and stack the
layers (`models/params.py`). Each family's HF tensor names are a `WeightMap` here. Each tensor is read, converted to the requested dtype and
copied into its slice of the preallocated stacked arrays.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pagedjax.models.config import ModelConfig

from .dtypes import resolve_dtype
from .params_builder import ParamsBuilder
from .safetensors_files import checkpoint_files, iter_tensors
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class WeightMap:
    """How one family names its HF tensors: top-level name -> params leaf, per-layer
    suffix (after the layer prefix) -> (leaf, fused part), and which tensors are stored
    [in, out] (GPT-2's Conv1D) and must be transposed to params' [out, in]."""

    top: dict[str, str]
    layer: dict[str, tuple[str, Optional[str]]]
    layer_prefix: str = "model.layers."
    transposed: frozenset[str] = frozenset()  # layer suffixes and top names
    ignored: Optional[re.Pattern] = None  # buffers some checkpoints saved
    # Prefix that checkpoints saved from the bare base model lack (the hub's gpt2 and
    # facebook/opt-* files name "h.0.attn.c_attn.weight", "decoder.layers.0...").
    base_prefix: str = ""

    def canonical(self, name: str) -> str:
        """`name` with the base-model prefix, as the maps spell it."""
        if self.base_prefix and not name.startswith(self.base_prefix) and not name.startswith(
                "lm_head."):
            return self.base_prefix + name
        return name

    def layer_pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.layer_prefix) + r"(\d+)\.(.+)")


# HF per-layer tensor name (after "model.layers.N.") -> (params leaf, fused part).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("wqkv", "q"),
    "self_attn.k_proj.weight": ("wqkv", "k"),
    "self_attn.v_proj.weight": ("wqkv", "v"),
    "self_attn.q_proj.bias": ("bqkv", "q"),
    "self_attn.k_proj.bias": ("bqkv", "k"),
    "self_attn.v_proj.bias": ("bqkv", "v"),
    "self_attn.o_proj.weight": ("wo", None),
    "self_attn.o_proj.bias": ("bo", None),
    "self_attn.q_norm.weight": ("q_norm", None),  # Qwen3
    "self_attn.k_norm.weight": ("k_norm", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_proj.weight": ("w_gate_up", "gate"),
    "mlp.up_proj.weight": ("w_gate_up", "up"),
    "mlp.down_proj.weight": ("w_down", None),
    "mlp.gate_proj.bias": ("b_gate_up", "gate"),
    "mlp.up_proj.bias": ("b_gate_up", "up"),
    "mlp.down_proj.bias": ("b_down", None),
}
_TOP_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
                "lm_head.weight": "lm_head"}
# Buffers some older checkpoints saved; they are recomputed from the config.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

LLAMA_WEIGHTS = WeightMap(top=_TOP_TENSORS, layer=_LAYER_TENSORS, ignored=_IGNORED)

# Gemma 2: post_attention_layernorm is the norm *after* attention; the MLP's pre-norm is
# pre_feedforward_layernorm.
GEMMA2_WEIGHTS = WeightMap(top=_TOP_TENSORS, ignored=_IGNORED, layer={
    **_LAYER_TENSORS,
    "post_attention_layernorm.weight": ("post_attn_norm", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm", None),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", None),
})

# Phi-3 fuses q/k/v and gate/up in the checkpoint, in the same row order as params.
PHI3_WEIGHTS = WeightMap(top=_TOP_TENSORS, ignored=_IGNORED, layer={
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.qkv_proj.weight": ("wqkv", None),
    "self_attn.o_proj.weight": ("wo", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_up_proj.weight": ("w_gate_up", None),
    "mlp.down_proj.weight": ("w_down", None),
})

GPT2_WEIGHTS = WeightMap(
    top={"transformer.wte.weight": "embed", "transformer.wpe.weight": "pos_embed",
         "transformer.ln_f.weight": "final_norm", "transformer.ln_f.bias": "final_norm_b",
         "lm_head.weight": "lm_head"},
    layer={
        "ln_1.weight": ("attn_norm", None), "ln_1.bias": ("attn_norm_b", None),
        "attn.c_attn.weight": ("wqkv", None), "attn.c_attn.bias": ("bqkv", None),
        "attn.c_proj.weight": ("wo", None), "attn.c_proj.bias": ("bo", None),
        "ln_2.weight": ("mlp_norm", None), "ln_2.bias": ("mlp_norm_b", None),
        "mlp.c_fc.weight": ("w_up", None), "mlp.c_fc.bias": ("b_up", None),
        "mlp.c_proj.weight": ("w_down", None), "mlp.c_proj.bias": ("b_down", None),
    },
    layer_prefix="transformer.h.",
    transposed=frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                          "mlp.c_proj.weight"}),
    ignored=re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias"),
    base_prefix="transformer.",
)

OPT_WEIGHTS = WeightMap(
    top={"model.decoder.embed_tokens.weight": "embed",
         "model.decoder.embed_positions.weight": "pos_embed",
         "model.decoder.project_in.weight": "proj_in",
         "model.decoder.project_out.weight": "proj_out",
         "model.decoder.final_layer_norm.weight": "final_norm",
         "model.decoder.final_layer_norm.bias": "final_norm_b",
         "lm_head.weight": "lm_head"},
    layer={
        "self_attn_layer_norm.weight": ("attn_norm", None),
        "self_attn_layer_norm.bias": ("attn_norm_b", None),
        "self_attn.q_proj.weight": ("wqkv", "q"), "self_attn.k_proj.weight": ("wqkv", "k"),
        "self_attn.v_proj.weight": ("wqkv", "v"), "self_attn.q_proj.bias": ("bqkv", "q"),
        "self_attn.k_proj.bias": ("bqkv", "k"), "self_attn.v_proj.bias": ("bqkv", "v"),
        "self_attn.out_proj.weight": ("wo", None), "self_attn.out_proj.bias": ("bo", None),
        "final_layer_norm.weight": ("mlp_norm", None),
        "final_layer_norm.bias": ("mlp_norm_b", None),
        "fc1.weight": ("w_up", None), "fc1.bias": ("b_up", None),
        "fc2.weight": ("w_down", None), "fc2.bias": ("b_down", None),
    },
    layer_prefix="model.decoder.layers.",
    base_prefix="model.",
)

# HF architecture -> its weight-name map. Architectures not listed (a caller may allow
# more via `supported_architectures`) are read with the Llama names.
WEIGHT_MAPS: dict[str, WeightMap] = {
    "LlamaForCausalLM": LLAMA_WEIGHTS,
    "MistralForCausalLM": LLAMA_WEIGHTS,
    "Qwen2ForCausalLM": LLAMA_WEIGHTS,
    "Qwen3ForCausalLM": LLAMA_WEIGHTS,
    "Phi3ForCausalLM": PHI3_WEIGHTS,
    "GemmaForCausalLM": LLAMA_WEIGHTS,
    "Gemma2ForCausalLM": GEMMA2_WEIGHTS,
    "GPT2LMHeadModel": GPT2_WEIGHTS,
    "OPTForCausalLM": OPT_WEIGHTS,
}

# Llama first: error messages list them in this order.
DEFAULT_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",) + tuple(
    sorted(a for a in WEIGHT_MAPS if a != "LlamaForCausalLM"))


def read_hf_config(model_dir: str | os.PathLike) -> ModelConfig:
    """ModelConfig from `model_dir`/config.json; ValueError naming a missing field."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(model_dir)} has no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    try:
        return ModelConfig.from_hf_dict(hf)
    except KeyError as err:
        raise ValueError(f"{path} is missing field {err.args[0]!r}") from err


def load_hf_checkpoint(
    model_dir: str | os.PathLike,
    dtype: Any = None,
    supported_architectures: Sequence[str] = DEFAULT_SUPPORTED_ARCHITECTURES,
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Load (config, params as numpy arrays of `dtype` (default float32), tokenizer)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir} does not exist")
    np_dtype = resolve_dtype(dtype)
    config = read_hf_config(model_dir)
    if config.architecture not in supported_architectures:
        raise ValueError(
            f"architecture {config.architecture} is not supported; supported: "
            f"{', '.join(supported_architectures)}"
        )
    files = checkpoint_files(model_dir)
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    params = _load_params(files, config, np_dtype)
    return config, params, tokenizer


def _weight_map(config: ModelConfig) -> WeightMap:
    return WEIGHT_MAPS.get(config.architecture, LLAMA_WEIGHTS)


def _slot_for(name: str, config: ModelConfig, builder: ParamsBuilder
              ) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    """The params slot of HF tensor `name`; None for tensors that are skipped."""
    wmap = _weight_map(config)
    name = wmap.canonical(name)
    if wmap.ignored is not None and wmap.ignored.fullmatch(name):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # tied: the output projection is the embedding
    if name in wmap.top:
        slot = (wmap.top[name], None, None)
    else:
        match = wmap.layer_pattern().fullmatch(name)
        if not (match and match.group(2) in wmap.layer):
            raise ValueError(f"checkpoint has tensor {name}, which this architecture does "
                             "not use")
        leaf, part = wmap.layer[match.group(2)]
        slot = (leaf, int(match.group(1)), part)
    if not builder.has_slot(slot[0], 0 if slot[1] is not None else None, slot[2]):
        if slot[0] in ("bqkv", "bo"):
            raise ValueError(f"checkpoint has tensor {name} but config.json does not set "
                             "attention_bias")
        raise ValueError(f"checkpoint has tensor {name}, which config.json does not use")
    return slot


def _describer(config: ModelConfig):
    wmap = _weight_map(config)

    def describe(leaf: str, layer: Optional[int], part: Optional[str]) -> str:
        """The HF tensor name for a params slot (for error messages)."""
        for name, top_leaf in wmap.top.items():
            if layer is None and top_leaf == leaf:
                return name
        for suffix, (l, p) in wmap.layer.items():
            if l == leaf and p in (part, None):
                return f"{wmap.layer_prefix}{layer}.{suffix}"
        return f"{leaf}[{layer}].{part}"

    return describe


def _load_params(files: dict[str, list[str]], config: ModelConfig, dtype) -> dict[str, Any]:
    builder = ParamsBuilder(config, dtype)
    wmap = _weight_map(config)
    pattern = wmap.layer_pattern()
    for path, names in files.items():
        wanted = {name: _slot_for(name, config, builder) for name in names}
        to_read = [name for name, slot in wanted.items() if slot is not None]
        for name, array in iter_tensors(path, to_read):
            match = pattern.fullmatch(wmap.canonical(name))
            if (match.group(2) if match else name) in wmap.transposed:
                array = array.T  # Conv1D [in, out] -> [out, in]
            builder.put(name, array, *wanted[name])
            del array  # keep at most one checkpoint tensor alive
    return builder.build(_describer(config))
