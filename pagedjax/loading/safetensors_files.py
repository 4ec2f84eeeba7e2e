"""Reading tensors from a checkpoint's safetensors files as numpy arrays.

safetensors' numpy API returns bf16 tensors only when numpy knows a dtype named
"bfloat16" (ml_dtypes registers it, some safetensors versions refuse regardless), so a
tensor it cannot read is read directly from the file: the format is an 8-byte header
length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy for safetensors)
import numpy as np
from safetensors import safe_open

_RAW_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def checkpoint_files(model_dir: str) -> dict[str, list[str]]:
    """{safetensors path: [tensor names]} for a checkpoint, single-file or sharded."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read weight_map from {index_path}: {err}") from err
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(model_dir, file), []).append(name)
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"{index_path} names shard {os.path.basename(path)}, "
                                 "which does not exist")
        return files
    if os.path.isfile(single):
        with safe_open(single, framework="np") as f:
            return {single: list(f.keys())}
    raise ValueError(
        f"{model_dir} has no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)"
    )


def iter_tensors(path: str, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for `names` in one safetensors file, one tensor at a time."""
    try:
        handle = safe_open(path, framework="np")
    except Exception as err:  # safetensors raises SafetensorError on corrupt files
        raise ValueError(f"cannot open {path}: {err}") from err
    with handle as f:
        available = set(f.keys())
        for name in names:
            if name not in available:
                raise ValueError(f"tensor {name} is listed in the index but missing from "
                                 f"{os.path.basename(path)}")
            try:
                array = f.get_tensor(name)
            except (TypeError, ValueError):
                array = _read_raw(path, name)
            yield name, array


def _read_raw(path: str, name: str) -> np.ndarray:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        info = header[name]
        dtype = _RAW_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} in {os.path.basename(path)} has dtype "
                             f"{info['dtype']}, which is not supported")
        start, stop = info["data_offsets"]
        f.seek(8 + header_len + start)
        data = f.read(stop - start)
    return np.frombuffer(data, dtype=dtype).reshape(info["shape"])
