"""The engine's device mesh, from `tensor_parallel_size` / `data_parallel_size` / `mesh`.

No mesh (None) is the single-device engine, exactly the code path without these options.
A mesh has one axis that matters, `TP_AXIS` ("tp"): heads, hidden units and vocabulary
are split over it (pagedjax/param_layout.py). A user's `mesh` must name that axis; its
other axes must have size 1 until data parallelism exists.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from pagedjax.models.sharded_step import TP_AXIS, tensor_parallel_size


def engine_mesh(tensor_parallel_size_: int = 1, data_parallel_size: int = 1,
                mesh: Optional[Any] = None) -> Optional[Mesh]:
    """The mesh the engine runs on (None: one device, no mesh). `mesh` given: it is
    checked and used; else `tensor_parallel_size_` > 1 takes the first that many of
    `jax.devices()`. Raises ValueError naming the option at fault."""
    if data_parallel_size != 1:
        raise ValueError(f"data_parallel_size={data_parallel_size}: data parallelism is not "
                         f"supported yet (only 1); use tensor_parallel_size")
    if mesh is not None:
        return _checked_user_mesh(mesh, tensor_parallel_size_)
    if tensor_parallel_size_ == 1:
        return None
    devices = jax.devices()
    if tensor_parallel_size_ > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size_} asks for more devices "
                         f"than the {len(devices)} {jax.default_backend()} device(s) present")
    return Mesh(np.array(devices[:tensor_parallel_size_]), (TP_AXIS,))


def _checked_user_mesh(mesh: Any, tp: int) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if TP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {TP_AXIS!r} (tensor parallel), "
                         f"got axes {mesh.axis_names}")
    others = {name: size for name, size in mesh.shape.items() if name != TP_AXIS and size > 1}
    if others:
        raise ValueError(f"mesh: axes other than {TP_AXIS!r} must have size 1 (data "
                         f"parallelism is not supported yet), got {others}")
    if tp != 1 and tp != tensor_parallel_size(mesh):
        raise ValueError(f"tensor_parallel_size={tp} differs from the mesh's {TP_AXIS!r} "
                         f"axis ({tensor_parallel_size(mesh)}); give one or make them agree")
    return mesh
