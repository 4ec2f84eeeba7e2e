"""The engine's device meshes, from `tensor_parallel_size` / `data_parallel_size` / `mesh`.

No mesh (None) is the single-device engine, exactly the code path without these options.
An engine's mesh has one axis that matters, `TP_AXIS` ("tp"): heads, hidden units and
vocabulary are split over it (pagedjax/param_layout.py). Data parallelism
(pagedjax/data_parallel.py) runs one engine per replica, each on its own mesh of `tp`
devices: `replica_meshes` cuts them out of the devices, or out of a user's mesh along its
`DP_AXIS` ("dp").
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from pagedjax.models.sharded_step import TP_AXIS, tensor_parallel_size

DP_AXIS = "dp"  # the mesh axis data-parallel replicas are laid along


def engine_mesh(tensor_parallel_size_: int = 1, data_parallel_size: int = 1,
                mesh: Optional[Any] = None) -> Optional[Mesh]:
    """The mesh one engine runs on (None: one device, no mesh). `mesh` given: it is
    checked and used; else `tensor_parallel_size_` > 1 takes the first that many of
    `jax.devices()`. Raises ValueError naming the option at fault."""
    if data_parallel_size != 1:
        raise ValueError(f"data_parallel_size={data_parallel_size}: one Engine is one replica; "
                         f"LLM (pagedjax.data_parallel.make_engine) runs several")
    if mesh is not None:
        _check_mesh_type(mesh)
        return _checked_replica_mesh(mesh, tensor_parallel_size_)
    if tensor_parallel_size_ == 1:
        return None
    return Mesh(np.array(_devices(tensor_parallel_size_, "tensor_parallel_size")), (TP_AXIS,))


def replica_meshes(tensor_parallel_size_: int, data_parallel_size: int,
                   mesh: Optional[Any] = None) -> list[Mesh]:
    """One mesh of `tp` devices per data-parallel replica: the first dp x tp devices in
    order, or `mesh`'s slices along DP_AXIS (its size must equal `data_parallel_size`
    unless that is 1)."""
    if mesh is None:
        devices = np.array(_devices(data_parallel_size * tensor_parallel_size_,
                                    "data_parallel_size x tensor_parallel_size"))
        return [Mesh(row, (TP_AXIS,))
                for row in devices.reshape(data_parallel_size, tensor_parallel_size_)]
    _check_mesh_type(mesh)
    if DP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh: data parallelism needs an axis named {DP_AXIS!r}, got axes "
                         f"{mesh.axis_names}")
    dp = mesh.shape[DP_AXIS]
    if data_parallel_size not in (1, dp):
        raise ValueError(f"data_parallel_size={data_parallel_size} differs from the mesh's "
                         f"{DP_AXIS!r} axis ({dp}); give one or make them agree")
    axis = mesh.axis_names.index(DP_AXIS)
    replicas = []
    for index in range(dp):
        devices = np.take(mesh.devices, index, axis=axis)
        names = tuple(name for name in mesh.axis_names if name != DP_AXIS)
        replicas.append(_checked_replica_mesh(Mesh(devices, names), tensor_parallel_size_))
    return replicas


def _devices(count: int, option: str) -> list:
    devices = jax.devices()
    if count > len(devices):
        raise ValueError(f"{option}={count} asks for more devices than the {len(devices)} "
                         f"{jax.default_backend()} device(s) present")
    return devices[:count]


def _check_mesh_type(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")


def _checked_replica_mesh(mesh: Mesh, tp: int) -> Mesh:
    """`mesh` as one replica's: a TP_AXIS, every other axis of size 1."""
    if TP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {TP_AXIS!r} (tensor parallel), "
                         f"got axes {mesh.axis_names}")
    others = {name: size for name, size in mesh.shape.items() if name != TP_AXIS and size > 1}
    if others:
        raise ValueError(f"mesh: axes other than {TP_AXIS!r} and {DP_AXIS!r} must have size "
                         f"1, got {others}")
    if tp != 1 and tp != tensor_parallel_size(mesh):
        raise ValueError(f"tensor_parallel_size={tp} differs from the mesh's {TP_AXIS!r} "
                         f"axis ({tensor_parallel_size(mesh)}); give one or make them agree")
    return mesh
