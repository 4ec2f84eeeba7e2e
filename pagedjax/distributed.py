"""Multi-host: one engine over the devices of several processes (JAX's multi-controller
runtime).

Every process builds the same `LLM` over a global mesh (`tensor_parallel_size` counts every
process's devices). Process 0 owns the scheduler, the requests and the server; each device
operation its runner starts (a step, a page copy, freeing or reallocating the KV pool) is
first broadcast to the other processes as a plan (the bucket key and the host step input),
so every process dispatches the same program with the same inputs in the same order, as
SPMD requires. The others run `follow(llm)`, which replays plans until process 0 calls
`shutdown(llm)`. This is sglang-jax's and MaxText's pattern: rank 0 schedules, every rank
computes.

Launch: start the same script on every host (GPU hosts, or the workers of a TPU pod slice),
call `initialize(...)` first (on TPU pods and SLURM jobs JAX finds the coordinator itself),
then branch on `jax.process_index()`. See README.md, "Multi-host".
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

import jax
import numpy as np

_HEADER_WORDS = 2  # [payload bytes, padded payload bytes]
_MIN_PAYLOAD = 1024


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               local_device_ids: Optional[list[int]] = None) -> None:
    """`jax.distributed.initialize` (call before anything else touches JAX), with gloo
    collectives on CPU so CPU processes can all-reduce across each other. Arguments left
    None are found by JAX on TPU pods and under SLURM / Open MPI."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)


def is_leader() -> bool:
    """True in the process that schedules (process 0, and the only one of a single-host
    run)."""
    return jax.process_index() == 0


class PlanChannel:
    """Process 0's device operations, broadcast to every process in order.

    A message is pickled and sent as two broadcasts (a fixed-size header, then the payload
    padded to a power of two so that only a few broadcast programs are ever compiled). The
    peers are processes of one job started together, so pickle's trust is theirs."""

    def send(self, message: Any) -> None:
        """Process 0: broadcast `message` (any picklable value)."""
        payload = np.frombuffer(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL),
                                np.uint8)
        padded = _padded_size(payload.size)
        self._broadcast(np.array([payload.size, padded], np.int64))
        self._broadcast(np.pad(payload, (0, padded - payload.size)))

    def receive(self) -> Any:
        """The other processes: the next message process 0 sent (blocks until it comes)."""
        size, padded = (int(x) for x in self._broadcast(np.zeros(_HEADER_WORDS, np.int64)))
        payload = self._broadcast(np.zeros(padded, np.uint8))
        return pickle.loads(payload[:size].tobytes())

    @staticmethod
    def _broadcast(array: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(array))


def plan_channel() -> Optional[PlanChannel]:
    """The channel an engine's runner mirrors its device operations through: None in a
    single-process run."""
    return PlanChannel() if jax.process_count() > 1 else None


def follow(llm: Any) -> int:
    """Run `llm`'s device operations as process 0 sends them, until process 0 calls
    `shutdown`; returns how many were replayed. Call it in every process but process 0,
    with an LLM built with the same arguments as process 0's."""
    runner = _engine(llm).runner
    if runner.plan_channel is None or is_leader():
        raise RuntimeError("follow: only the processes other than process 0 of a multi-process "
                           "run follow (process 0 generates and then calls shutdown)")
    count = 0
    while runner.replay_next():
        count += 1
    return count


def shutdown(llm: Any) -> None:
    """Process 0: tell the followers to return from `follow` (no-op in a single process)."""
    runner = _engine(llm).runner
    if runner.plan_channel is not None and is_leader():
        runner.plan_channel.send(None)


def _engine(llm: Any) -> Any:
    """The Engine of an LLM (or an Engine itself)."""
    return getattr(llm, "engine", llm)


def _padded_size(size: int) -> int:
    padded = _MIN_PAYLOAD
    while padded < size:
        padded *= 2
    return padded
