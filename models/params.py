"""The params pytree contract shared by loaders and model files.

Params are a plain nested dict of arrays. Matrices are stored [out, in] (the model computes
x @ W.T), which ran XLA CPU's large vocabulary projection fastest. Per-layer arrays are
stacked on a leading layer axis L so the model scans over layers. The Llama layout, which
every family shares; the config's family flags add or swap the leaves marked below:

    {
      "embed":      [V, E],                  [V, W] with config.embed_dim = W (OPT)
      "pos_embed":  [P + offset, E],         learned positions (GPT-2, OPT) only
      "proj_in":    [E, W], "proj_out": [W, E]   only with config.embed_dim (OPT)
      "layers": {
        "attn_norm": [L, E],
        "wqkv":      [L, (H + 2K) * D, E],   rows: q heads, then k heads, then v heads
        "bqkv":      [L, (H + 2K) * D],      only when config.attention_bias
        "q_norm":    [L, D], "k_norm": [L, D]    only when config.qk_norm (Qwen3)
        "wo":        [L, E, H * D],
        "bo":        [L, E],                 only when config.o_bias
        "post_attn_norm": [L, E]             only when config.sandwich_norms (Gemma 2)
        "mlp_norm":  [L, E],
        "w_gate_up": [L, 2 * F, E],          rows: gate, then up (config.gated_mlp)
        "w_up":      [L, F, E],              instead of w_gate_up when not config.gated_mlp
        "b_gate_up" / "b_up": [L, 2F] / [L, F], "b_down": [L, E]   only with config.mlp_bias
        "w_down":    [L, E, F],
        "post_mlp_norm": [L, E]              only when config.sandwich_norms
      },
      "final_norm": [E],                     absent when not config.final_norm
      "lm_head":    [V, E],                  [V, W] with embed_dim; absent when tied
    }

With config.norm_type == "layer" every norm "x" also has a bias "x_b" of the same shape.
q and k rows are in HF order (HF's rotate_half RoPE convention), not GGUF's interleaved one.

The models also accept each LAYER_MATRICES leaf as a tuple of L arrays [out, in], one per
layer (`split_layer_matrices`): the engine's form on CPU for params it is handed as host
arrays, because XLA CPU copies a layer's slice of a stacked matrix before every matmul.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .config import ModelConfig


# The "layers" leaves that are matrices (biases and norms stay stacked).
LAYER_MATRICES = ("wqkv", "wo", "w_gate_up", "w_up", "w_down")


def split_layer_matrices(params: dict, convert) -> dict:
    """`params` with every leaf through convert(x), except that each "layers" matrix of
    LAYER_MATRICES becomes a tuple of convert(one layer's [out, in] slice)."""
    layers = {k: (tuple(convert(v[i]) for i in range(v.shape[0])) if k in LAYER_MATRICES
                  else convert(v)) for k, v in params["layers"].items()}
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**jax.tree.map(convert, rest), "layers": layers}


def expected_shapes(config: ModelConfig) -> dict[str, Any]:
    """The shape of every leaf a params pytree for `config` must have."""
    c = config
    L, E, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    D, W = c.head_dim, c.word_dim
    qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * D
    norm_bias = c.norm_type == "layer"

    def norm(shapes: dict, name: str, shape: tuple) -> None:
        shapes[name] = shape
        if norm_bias:
            shapes[name + "_b"] = shape

    layers: dict[str, Any] = {}
    norm(layers, "attn_norm", (L, E))
    layers["wqkv"] = (L, qkv_rows, E)
    if c.attention_bias:
        layers["bqkv"] = (L, qkv_rows)
    if c.qk_norm:
        layers["q_norm"] = (L, D)
        layers["k_norm"] = (L, D)
    layers["wo"] = (L, E, c.num_heads * D)
    if c.o_bias:
        layers["bo"] = (L, E)
    if c.sandwich_norms:
        norm(layers, "post_attn_norm", (L, E))
    norm(layers, "mlp_norm", (L, E))
    if c.gated_mlp:
        layers["w_gate_up"] = (L, 2 * F, E)
        if c.mlp_bias:
            layers["b_gate_up"] = (L, 2 * F)
    else:
        layers["w_up"] = (L, F, E)
        if c.mlp_bias:
            layers["b_up"] = (L, F)
    layers["w_down"] = (L, E, F)
    if c.mlp_bias:
        layers["b_down"] = (L, E)
    if c.sandwich_norms:
        norm(layers, "post_mlp_norm", (L, E))

    shapes: dict[str, Any] = {"embed": (V, W)}
    if c.position_embedding == "learned":
        shapes["pos_embed"] = (c.max_position_embeddings + c.position_offset, E)
    if c.embed_dim is not None:
        shapes["proj_in"] = (E, W)
        shapes["proj_out"] = (W, E)
    shapes["layers"] = layers
    if c.final_norm:
        norm(shapes, "final_norm", (E,))
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (V, W)
    return shapes


def check_params(params: Any, config: ModelConfig) -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped tensor (a layer
    matrix may be in per-layer form, `split_layer_matrices`)."""
    _check_tree(params, expected_shapes(config), "params")


def _check_tree(tree: Any, shapes: Any, path: str) -> None:
    if isinstance(shapes, dict):
        if not isinstance(tree, dict):
            raise ValueError(f"{path} must be a dict, got {type(tree).__name__}")
        missing = sorted(set(shapes) - set(tree))
        if missing:
            raise ValueError(f"{path} is missing tensor(s): {', '.join(missing)}")
        extra = sorted(set(tree) - set(shapes))
        if extra:
            raise ValueError(f"{path} has unexpected tensor(s): {', '.join(extra)}")
        for key, sub in shapes.items():
            _check_tree(tree[key], sub, f"{path}[{key!r}]")
        return
    if isinstance(tree, tuple):  # a layer matrix in per-layer form: L arrays [out, in]
        layer_shapes = {tuple(np.shape(x)) for x in tree}
        shape = (len(tree), *layer_shapes.pop()) if len(layer_shapes) == 1 else layer_shapes
    else:
        shape = tuple(np.shape(tree))
    if shape != tuple(shapes):
        raise ValueError(f"{path} has shape {shape}, expected {tuple(shapes)}")
