"""Params pytrees from Flax training code: linen variable dicts and NNX states/modules.

The engine reads a plain nested dict of arrays (`models/params.py`). Training code holds
the same weights in other containers: linen's `{"params": {...}}` variables (possibly a
`FrozenDict`), an `nnx.State` (from `nnx.split(model)` or `nnx.state(model)`), or an NNX
module. `params_from_flax` unwraps any of them without copying the arrays.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def params_from_flax(obj: Any) -> dict[str, Any]:
    """The plain params dict held by `obj`, sharing its arrays (no copies).

    Accepts a params dict, linen variables `{"params": params}` (dict or FrozenDict), an
    `nnx.State` (`nnx.to_pure_dict`), the `(graphdef, state, ...)` tuple of `nnx.split`
    (its first State), or an `nnx.Module` (its `nnx.Param` state). ValueError otherwise.
    """
    nnx = sys.modules.get("flax.nnx")  # only a caller using NNX can hand us NNX objects
    if nnx is not None:
        if isinstance(obj, tuple) and any(isinstance(x, nnx.State) for x in obj):
            obj = next(x for x in obj if isinstance(x, nnx.State))  # nnx.split output
        elif isinstance(obj, nnx.Module):
            obj = nnx.state(obj, nnx.Param)
    if nnx is not None and isinstance(obj, nnx.State) and hasattr(nnx, "to_pure_dict"):
        obj = nnx.to_pure_dict(obj)
    elif hasattr(obj, "to_pure_dict"):  # nnx.State of older Flax versions
        obj = obj.to_pure_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(
            "params must be a params dict, linen variables {'params': ...}, an nnx.State, "
            f"nnx.split(...) output or an nnx.Module; got {type(obj).__name__}")
    tree = _plain(obj, nnx)
    # Unwrap linen's variables dict (and a TrainState-like {"params": {"params": ...}}).
    while set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return tree


def _plain(tree: Any, nnx: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _plain(value, nnx) for key, value in tree.items()}
    if nnx is not None and isinstance(tree, nnx.Variable):
        return tree.get_value() if hasattr(tree, "get_value") else tree.value
    return tree
