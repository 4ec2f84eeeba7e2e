"""ModelRunner: owns the device-side state (params, KV pool) and the compiled step programs.

One compiled program per bucket shape, built ahead of time (`jit(...).lower(...).compile()`)
so compiles are counted exactly and `warmup()` can build them all up front. Params are an
argument, not a constant, so swapping in new weights of the same shapes never recompiles.
The KV pool is donated to every step and updated in place. On a mesh (tensor parallel),
programs are compiled for the shardings the params and the pool have, and each step's
input is put whole on every device. Across processes (pagedjax/distributed.py), process
0's runner sends each device operation through its `plan_channel` before running it, and the
other processes' runners replay them (`replay_next`) in the same order.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .buckets import BucketKey
from .distributed import PlanChannel, is_leader
from .huge_pages import back_zeros_with_huge_pages
from .input_transfer import put, to_device
from .kv_copy import copy_kv_blocks
from .multi_step import decode_steps
from .sampler import StepLogprobs, compute_logprobs, sample, sample_with_logprobs
from .step_input import KVCache, PenaltyTensors, SamplingTensors, StepInput


def allocate_kv_cache(num_layers: int, num_kv_heads: int, num_blocks: int, block_size: int,
                      head_dim: int, dtype, shardings: Optional[KVCache] = None) -> KVCache:
    """Zero-filled K pool [L, P, K, D, S] and V pool [L, P, S, K, D] on the default device,
    or made in place on their `shardings` (each device allocating only its own part)."""
    k_shape = (num_layers, num_blocks, num_kv_heads, head_dim, block_size)
    v_shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    shardings = shardings or KVCache(None, None)
    return KVCache(*(_zeros(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
                     for shape, sharding in zip((k_shape, v_shape), shardings)))


def step_input_spec(key: BucketKey, pages_per_seq: int) -> StepInput:
    """Abstract shapes of a StepInput padded to `key` with block tables `pages_per_seq`
    wide (for ahead-of-time compiles)."""
    T, B, M, W = key.num_tokens, key.num_seqs, pages_per_seq, key.penalty_width

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    sampling = SamplingTensors(
        temperature=spec((B,), jnp.float32), top_p=spec((B,), jnp.float32),
        top_k=spec((B,)), min_p=spec((B,), jnp.float32),
        seed_words=spec((B, 2), jnp.uint32), sample_index=spec((B,)),
        token_bitmask=spec((B, key.bitmask_words)) if key.bitmask_words else None)
    return StepInput(
        input_ids=spec((T,)), positions=spec((T,)), slot_mapping=spec((T,)),
        token_seq=spec((T,)), block_tables=spec((B, M)), context_lens=spec((B,)),
        seq_lens=spec((B,)), query_start_loc=spec((B + 1,)), logits_indices=spec((B,)),
        sampling=sampling, penalties=PenaltyTensors(
            repetition_penalty=spec((B,), jnp.float32),
            presence_penalty=spec((B,), jnp.float32),
            frequency_penalty=spec((B,), jnp.float32),
            token_ids=spec((B, W)), output_counts=spec((B, W)), flags=spec((B, W)),
            bias=spec((B, W), jnp.float32)))


class ModelRunner:
    """Runs padded steps of one model over one KV pool; counts and times compiles."""

    def __init__(self, apply_fn: Callable, params: Any, kv_cache: KVCache, pages_per_seq: int,
                 logprobs_mode: str = "raw_logprobs", mesh: Optional[Mesh] = None,
                 plan_channel: Optional[PlanChannel] = None, exact_logprobs: bool = False):
        self.params = params  # None after drop_params (sleep level 2)
        self.pages_per_seq = pages_per_seq  # block-table width of every step
        self.kv_cache = kv_cache  # None after free_kv_cache (sleep)
        # On a mesh, programs are compiled for the shardings of the params and the pool,
        # and every step input is whole on each device; None: the default device.
        self.input_sharding = None if mesh is None else NamedSharding(mesh, P())
        # Programs are compiled from these, so they outlive the arrays (sleep / wake up).
        self.params_spec = _spec(params, with_sharding=mesh is not None)
        self.kv_spec = _spec(kv_cache, with_sharding=mesh is not None)
        self._compiled: dict[BucketKey, Any] = {}
        self.compile_seconds = 0.0
        self.execute_seconds = 0.0
        self.last_prompt_logprobs: Optional[StepLogprobs] = None  # of the latest step
        # When a list, every program call appends its (key, input, prompt targets): a
        # benchmark replays a sample of them to learn how long the device was busy.
        self.call_log: Optional[list] = None
        # Several processes: process 0 broadcasts each device operation through it before
        # running it, the others receive and replay (None: one process).
        self.plan_channel = plan_channel

        def step(params, kv_cache: KVCache, step_input: StepInput, prompt_targets,
                 with_logprobs: bool, with_prompt_logprobs: bool, sampler: str):
            prompt_logprobs = None
            if with_prompt_logprobs:
                # Every token's logits [T, V] stay on device: only each token's logprob of
                # its prompt target (prompt_targets [T]) and the top MAX_LOGPROBS return.
                (logits, token_logits), kv_cache = apply_fn(params, step_input, kv_cache,
                                                            all_token_logits=True)
                # Prompt tokens are not sampled: their values are the model's (logits
                # in the *_logits modes).
                prompt_logprobs = compute_logprobs(token_logits, prompt_targets,
                                                   logprobs_mode.endswith("logprobs"),
                                                   exact_logprobs)
            else:
                logits, kv_cache = apply_fn(params, step_input, kv_cache)
            # Logprobs only in programs compiled for them: the default path does no extra
            # work and transfers nothing extra. Their mode is the engine's, not a key's.
            if with_logprobs:
                tokens, logprobs = sample_with_logprobs(logits, step_input.sampling,
                                                        step_input.penalties, sampler,
                                                        logprobs_mode, exact_logprobs)
            else:
                tokens = sample(logits, step_input.sampling, step_input.penalties, sampler)
                logprobs = None
            return (tokens, logprobs, prompt_logprobs), kv_cache

        self._jitted = jax.jit(step, donate_argnums=(1,), static_argnums=(4, 5, 6))
        self._jitted_decode_steps = jax.jit(functools.partial(decode_steps, apply_fn),
                                            donate_argnums=(1,), static_argnums=(3, 4))

    @property
    def num_compiles(self) -> int:
        """Programs compiled so far (one per bucket shape used or warmed up)."""
        return len(self._compiled)

    @property
    def compiled_keys(self) -> list[BucketKey]:
        """Bucket shapes that have a compiled program."""
        return list(self._compiled)

    def compile(self, key: BucketKey) -> None:
        """Build the program for bucket `key` if it isn't built yet."""
        if key in self._compiled:
            return
        start = time.perf_counter()
        params_spec, kv_spec = self.params_spec, self.kv_spec
        input_spec = self._placed(step_input_spec(key, self.pages_per_seq))
        if key.decode_call:
            lowered = self._jitted_decode_steps.lower(params_spec, kv_spec, input_spec,
                                                      key.num_steps, key.sampler)
        else:
            targets_spec = (self._placed(jax.ShapeDtypeStruct((key.num_tokens,), jnp.int32))
                            if key.with_prompt_logprobs else None)
            lowered = self._jitted.lower(params_spec, kv_spec, input_spec, targets_spec,
                                         key.with_logprobs, key.with_prompt_logprobs,
                                         key.sampler)
        self._compiled[key] = lowered.compile()
        # and the small program that unpacks this shape's host input on the device
        to_device(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), input_spec),
                  self.input_sharding)
        self.compile_seconds += time.perf_counter() - start

    def program_text(self, key: BucketKey) -> str:
        """The compiled HLO of `key`'s program (compiled first if needed)."""
        self.compile(key)
        return self._compiled[key].as_text()

    def _placed(self, spec: Any) -> Any:
        """Abstract step inputs placed as `_call` places them."""
        if self.input_sharding is None:
            return spec
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                           sharding=self.input_sharding), spec)

    def set_params(self, params: Any) -> None:
        """Swap in new weights of identical shapes and dtypes (no recompile, no copy)."""
        if _signature(params) != _signature(self.params_spec):
            raise ValueError("params: new weights must have the same tree, shapes and dtypes")
        self.params = params

    def drop_params(self) -> None:
        """Let go of the weights (their memory is freed unless the caller holds them);
        `set_params` brings weights back."""
        self.params = None

    def free_kv_cache(self) -> None:
        """Delete the KV pool now (its memory goes back to the device)."""
        self._mirror("free_kv_cache")
        if self.kv_cache is not None:
            jax.block_until_ready(self.kv_cache)  # no program still writes it
            for pool in self.kv_cache:
                pool.delete()
            self.kv_cache = None

    def allocate_kv_cache(self) -> None:
        """A zero-filled KV pool of the shapes the programs were compiled for."""
        self._mirror("allocate_kv_cache")
        if self.kv_cache is None:
            self.kv_cache = KVCache(*(_zeros(s) for s in self.kv_spec))

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy KV pages (src, dst) in every layer, in place (copy-on-write)."""
        self._mirror("copy_pages", copies)
        self.kv_cache = copy_kv_blocks(self.kv_cache, copies, self.input_sharding)

    def replay_next(self) -> bool:
        """A process other than 0: run the next device operation process 0 sent; False
        when it sent the end (distributed.shutdown)."""
        message = self.plan_channel.receive()
        if message is None:
            return False
        name, args = message
        if name == "call":
            self._call(*args)
        elif name == "copy_pages":
            self.copy_pages(*args)
        elif name in ("free_kv_cache", "allocate_kv_cache"):
            getattr(self, name)()
        else:
            raise RuntimeError(f"process 0 sent an unknown operation {name!r}")
        return True

    def _mirror(self, name: str, *args) -> None:
        """Process 0 of several: send operation `name` to the others before running it."""
        if self.plan_channel is not None and is_leader():
            self.plan_channel.send((name, args))

    def execute(self, key: BucketKey, step_input: StepInput,
                prompt_targets: Optional[np.ndarray] = None,
                ) -> tuple[np.ndarray, Optional[StepLogprobs]]:
        """Run one step (numpy StepInput padded to `key`); returns sampled tokens int32 [B]
        and, when `key.with_logprobs`, their StepLogprobs as numpy arrays (else None).
        With `key.with_prompt_logprobs`, `prompt_targets` int32 [T] must be given and the
        per-token StepLogprobs [T] of those targets are kept in `last_prompt_logprobs`."""
        start = time.perf_counter()
        tokens, logprobs, prompt_logprobs = jax.device_get(
            self._call(key, step_input, prompt_targets))
        # Transfer in, device compute and transfer out: the rest of a step is host work.
        self.execute_seconds += time.perf_counter() - start
        if logprobs is not None:
            logprobs = StepLogprobs(*(np.asarray(x) for x in logprobs))
        self.last_prompt_logprobs = (None if prompt_logprobs is None else
                                     StepLogprobs(*(np.asarray(x) for x in prompt_logprobs)))
        return np.asarray(tokens), logprobs

    def dispatch_decode_steps(self, key: BucketKey, step_input: StepInput) -> tuple[Any, Any]:
        """Start `key.num_steps` decode steps from a pure-decode StepInput (host or device
        arrays) whose block tables hold every page those steps write (multi_step.py);
        returns without waiting: the sampled tokens int32 [num_steps, B] and the input of
        the step after them, both on the device."""
        start = time.perf_counter()
        tokens, next_input = self._call(key, step_input)
        self.execute_seconds += time.perf_counter() - start
        return tokens, next_input

    def _call(self, key: BucketKey, step_input: StepInput,
              prompt_targets: Optional[np.ndarray] = None) -> tuple:
        """Dispatch `key`'s program (compiled first if needed) and keep its new KV pool;
        returns its other outputs, still on the device."""
        if self.params is None or self.kv_cache is None:
            raise RuntimeError("the runner has no weights or no KV pool (the engine sleeps)")
        self.compile(key)
        self._mirror("call", key, step_input, prompt_targets)
        if self.call_log is not None:
            self.call_log.append((key, step_input, prompt_targets))
        step_input = _on_device(step_input, self.input_sharding)
        if key.decode_call:
            tokens, self.kv_cache, next_input = self._compiled[key](
                self.params, self.kv_cache, step_input)
            return tokens, next_input
        targets = (put(prompt_targets, self.input_sharding)
                   if key.with_prompt_logprobs else None)
        outputs, self.kv_cache = self._compiled[key](self.params, self.kv_cache, step_input,
                                                     targets)
        return outputs

    def replay_seconds(self, key: BucketKey, step_input: StepInput,
                       prompt_targets: Optional[np.ndarray] = None, repeats: int = 3) -> float:
        """Device seconds of one call of `key`'s program on this input (as `call_log`
        holds it): after one call waited for, `repeats` calls are queued back to back
        (each waits on the last one's KV pool) and timed together, as the device runs them
        in a pass. The calls write the KV slots the input names, so replay only while no
        request holds pages (a finished benchmark pass)."""
        step_input = _on_device(step_input, self.input_sharding)
        jax.block_until_ready(self._call(key, step_input, prompt_targets))
        start = time.perf_counter()
        for _ in range(repeats):
            outputs = self._call(key, step_input, prompt_targets)
        jax.block_until_ready((outputs, self.kv_cache))
        return (time.perf_counter() - start) / repeats

    def fetch_tokens(self, tokens: Any) -> np.ndarray:
        """Wait for device tokens and copy them to the host (the wait counts as device
        time)."""
        start = time.perf_counter()
        tokens = np.asarray(jax.device_get(tokens))
        self.execute_seconds += time.perf_counter() - start
        return tokens


def _spec(tree: Any, with_sharding: bool = False) -> Any:
    """Abstract shapes and dtypes (and shardings) of every array in `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding if with_sharding else None), tree)


def _zeros(spec: jax.ShapeDtypeStruct) -> jax.Array:
    """A zero array of `spec`: on the default device, or made on its sharding."""
    if spec.sharding is None:
        zeros = jnp.zeros(spec.shape, spec.dtype)
        back_zeros_with_huge_pages(zeros)  # a KV pool: CPU pages are scattered reads
        return zeros
    return jax.jit(functools.partial(jnp.zeros, spec.shape, spec.dtype),
                   out_shardings=spec.sharding)()


def _signature(tree: Any) -> Any:
    """What must match for a compiled program to take `tree`: structure, shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]


def _on_device(step_input: StepInput, sharding: Optional[NamedSharding]) -> StepInput:
    """A host StepInput in one packed transfer (input_transfer.py); a chained call's
    input, already on the device but for its new block tables, as it is. `sharding`:
    where the arrays go (None: the default device)."""
    if all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(step_input)):
        return to_device(step_input, sharding)
    return jax.device_put(step_input, sharding)
