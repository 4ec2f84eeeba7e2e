"""Filling a preallocated, layer-stacked params pytree one checkpoint tensor at a time.

Both loaders stream: each checkpoint tensor is read, converted and copied into its slice of
one preallocated array (see `models/params.py` for the layout), so peak memory is the params
plus one tensor, never two full copies of the model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from pagedjax.models.config import ModelConfig
from pagedjax.models.params import check_params, expected_shapes

# Where each named part of a fused leaf sits, as (start, stop) row offsets.
_Parts = dict[str, dict[str, tuple[int, int]]]


def _fused_parts(config: ModelConfig) -> _Parts:
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    f = config.intermediate_size
    qkv = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    gate_up = {"gate": (0, f), "up": (f, 2 * f)}
    return {"wqkv": qkv, "bqkv": qkv, "w_gate_up": gate_up, "b_gate_up": gate_up}


class ParamsBuilder:
    """Preallocated params for `config` in `dtype`, filled by `put`, returned by `build`.

    A slot is (leaf, layer, part): `leaf` is a key of `models/params.py` ("embed",
    "wqkv", ...), `layer` the layer index for leaves under "layers" (else None), and `part`
    the block of rows of a fused leaf ("q"/"k"/"v" of wqkv and bqkv, "gate"/"up" of
    w_gate_up and b_gate_up; else None, which for a fused leaf means all of its rows).
    """

    def __init__(self, config: ModelConfig, dtype: np.dtype):
        self._config = config
        self._dtype = np.dtype(dtype)
        self._parts = _fused_parts(config)
        shapes = expected_shapes(config)
        # np.empty: every slot is checked to be written before build() returns, so
        # zero-filling would only cost time.
        self._top = {k: np.empty(s, self._dtype) for k, s in shapes.items() if k != "layers"}
        self._layers = {k: np.empty(s, self._dtype) for k, s in shapes["layers"].items()}
        self._filled: set[tuple[str, Optional[int], Optional[str]]] = set()

    def slots(self) -> list[tuple[str, Optional[int], Optional[str]]]:
        """Every slot that must be filled before `build`."""
        out: list[tuple[str, Optional[int], Optional[str]]] = []
        for leaf in self._top:
            out.append((leaf, None, None))
        for leaf in self._layers:
            for layer in range(self._config.num_layers):
                for part in self._parts.get(leaf, {None: None}):
                    out.append((leaf, layer, part))
        return out

    def has_slot(self, leaf: str, layer: Optional[int] = None, part: Optional[str] = None) -> bool:
        """Whether the config has this slot (e.g. no "lm_head" when embeddings are tied)."""
        if layer is None:
            return leaf in self._top and part is None
        if leaf not in self._layers:
            return False
        parts = self._parts.get(leaf)
        # part None on a fused leaf: one checkpoint tensor fills all of it (Phi-3's qkv_proj).
        return (part is None or part in parts) if parts else part is None

    def put(self, name: str, value: np.ndarray, leaf: str, layer: Optional[int] = None,
            part: Optional[str] = None) -> None:
        """Copy checkpoint tensor `name` into its slot, converting to the params dtype."""
        if layer is not None and not 0 <= layer < self._config.num_layers:
            raise ValueError(
                f"tensor {name} is for layer {layer}, but the config has "
                f"{self._config.num_layers} layers"
            )
        if not self.has_slot(leaf, layer, part):
            raise ValueError(f"tensor {name} has no place in the params of this config "
                             f"(slot {leaf}/{layer}/{part})")
        if part is None and layer is not None and leaf in self._parts:
            keys = {(leaf, layer, p) for p in self._parts[leaf]}  # the whole fused leaf
        else:
            keys = {(leaf, layer, part)}
        if keys & self._filled:
            raise ValueError(f"tensor {name} appears twice in the checkpoint")
        target = self._top[leaf] if layer is None else self._layers[leaf][layer]
        if part is not None:
            start, stop = self._parts[leaf][part]
            target = target[start:stop]
        if tuple(value.shape) != target.shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(value.shape)}, expected {target.shape}"
            )
        target[...] = value  # casts (e.g. bf16/f16 -> f32) while copying
        self._filled |= keys

    def build(self, describe: Callable[[str, Optional[int], Optional[str]], str]) -> dict[str, Any]:
        """The params pytree; ValueError naming (via `describe`) the first unfilled slot."""
        missing = [slot for slot in self.slots() if slot not in self._filled]
        if missing:
            names = [describe(*slot) for slot in missing[:5]]
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing tensor(s): {', '.join(names)}{more}")
        params = dict(self._top)
        params["layers"] = dict(self._layers)
        check_params(params, self._config)
        return params
