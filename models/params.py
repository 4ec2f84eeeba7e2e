"""The params pytree contract shared by loaders and model files.

Llama-family params are a plain nested dict of arrays. Matrices are stored [out, in]
(the model computes x @ W.T), which ran XLA CPU's large vocabulary projection fastest.
Per-layer arrays are stacked on a leading layer axis L so the model scans over layers:

    {
      "embed":      [V, E],
      "layers": {
        "attn_norm": [L, E],
        "wqkv":      [L, (H + 2K) * D, E],   rows: q heads, then k heads, then v heads
        "bqkv":      [L, (H + 2K) * D],      only when config.attention_bias
        "wo":        [L, E, H * D],
        "bo":        [L, E],                 only when config.attention_bias
        "mlp_norm":  [L, E],
        "w_gate_up": [L, 2 * F, E],          rows: gate, then up
        "w_down":    [L, E, F],
      },
      "final_norm": [E],
      "lm_head":    [V, E],                  absent when config.tie_word_embeddings
    }

q and k rows are in HF order (HF's rotate_half RoPE convention), not GGUF's interleaved one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import ModelConfig


def expected_shapes(config: ModelConfig) -> dict[str, Any]:
    """The shape of every leaf a params pytree for `config` must have."""
    c = config
    L, E, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    layers = {
        "attn_norm": (L, E),
        "wqkv": (L, qkv_rows, E),
        "wo": (L, E, c.num_heads * c.head_dim),
        "mlp_norm": (L, E),
        "w_gate_up": (L, 2 * F, E),
        "w_down": (L, E, F),
    }
    if c.attention_bias:
        layers["bqkv"] = (L, qkv_rows)
        layers["bo"] = (L, E)
    shapes = {"embed": (V, E), "layers": layers, "final_norm": (E,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (V, E)
    return shapes


def check_params(params: Any, config: ModelConfig) -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped tensor."""
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
    shape = tuple(np.shape(tree))
    if shape != tuple(shapes):
        raise ValueError(f"{path} has shape {shape}, expected {tuple(shapes)}")
