"""One host->device transfer per step: a host StepInput's leaves travel packed.

A StepInput has ~22 small arrays; `jax.device_put` of the tree moves each one separately
(each a transfer of its own on a GPU), which costs more per step than two transfers and a
slicing program. `pack` concatenates the 32-bit integer leaves (uint32 seed words bitcast)
into one int32 buffer and the float32 leaves into one float32 buffer; `to_device` sends the
two and `unpack` (jitted, one small program per step shape) slices the StepInput back out
on the device.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
    """Where each leaf of a packed tree lies: hashable, a static argument of `unpack`."""

    treedef: Any
    leaves: tuple  # per leaf: (shape, dtype name, in the float buffer?, offset)


def pack(tree: Any) -> tuple[np.ndarray, np.ndarray, Layout]:
    """The int32 and float32 buffers holding every leaf of `tree` (numpy arrays of int32,
    uint32 or float32), and the layout that `unpack` needs."""
    leaves, treedef = jax.tree.flatten(tree)
    ints, floats, places = [], [], []
    int_size = float_size = 0
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if leaf.dtype == np.float32:
            places.append((leaf.shape, "float32", True, float_size))
            floats.append(leaf.ravel())
            float_size += leaf.size
        elif leaf.dtype in (np.int32, np.uint32):
            places.append((leaf.shape, leaf.dtype.name, False, int_size))
            ints.append(leaf.view(np.int32).ravel())
            int_size += leaf.size
        else:
            raise ValueError(f"step inputs are int32, uint32 or float32, got {leaf.dtype}")
    int_buffer = np.concatenate(ints) if ints else np.zeros(0, np.int32)
    float_buffer = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    return int_buffer, float_buffer, Layout(treedef, tuple(places))


@functools.partial(jax.jit, static_argnums=(2,))
def unpack(ints: jax.Array, floats: jax.Array, layout: Layout) -> Any:
    """The tree `pack` flattened, sliced out of its buffers ints [N] int32, floats [F]."""
    leaves = []
    for shape, dtype, is_float, offset in layout.leaves:
        size = int(np.prod(shape, dtype=np.int64))
        flat = (floats if is_float else ints)[offset:offset + size]
        if dtype == "uint32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.uint32)
        leaves.append(flat.reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)


def to_device(tree: Any, sharding: Any = None) -> Any:
    """`tree` (all leaves host arrays) on the default device (or whole on every device
    of a replicated `sharding`), in two transfers."""
    ints, floats, layout = pack(tree)
    return unpack(put(ints, sharding), put(floats, sharding), layout)


def put(x: np.ndarray, sharding: Any = None) -> jax.Array:
    """Host array `x` on the default device, or laid out on `sharding`. A sharding over
    several processes' devices is filled by each process from its own copy: `device_put`
    would first check that every process holds the same value, a collective of its own
    that the other processes do not join."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
