"""EngineConfig: how the engine sizes its KV pool, batches and buckets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pagedjax.kernels import ATTENTION_BACKENDS

from .prefix_cache import HASH_ALGOS
from .sampler import LOGPROBS_MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs with vLLM's names. Every field is validated at construction.

    `max_model_len=None` takes the model's `max_position_embeddings`. `num_blocks=None`
    sizes the pool from `kv_cache_memory_fraction` of free accelerator memory, or from
    `kv_cache_memory_bytes` on CPU (where free memory is not reported). `block_size`
    (tokens per KV page) defaults to 64, between vLLM's 16 on GPU and 128 on CPU: a
    decode row reads its context one page per loop step, so larger pages read it faster
    on CPU, for up to block_size - 1 unfilled slots per sequence; the Pallas GPU kernel
    takes one page per inner step.
    `min_token_bucket` is the smallest step shape in tokens (None: the platform's, 1 on CPU,
    16 elsewhere). On CPU a step's matmuls cost in proportion to its padded rows, so a
    decode step of one sequence padded to 16 tokens took 2.6x as long as one of 1 token; an
    accelerator reads the weights once for either, and fewer shapes compile fewer programs.
    `attention_backend` names the kernels (kernels/backend.py); "exact" also sets the
    numerics that make logits equal `pagedjax.forward(..., exact=True)`'s to the bit.
    `num_scheduler_steps` > 1 runs that many decode steps per device call when every
    scheduled sequence is decoding and needs no host work between tokens (multi_step.py):
    it pays where the host's per-step work is comparable to the device's, as on a GPU.
    `async_scheduling` takes such decode batches through the same chained calls at any
    step count, one step per call included: the next call is dispatched before this
    one's tokens reach the host, so the host's work overlaps the device's (vLLM V1's
    `--async-scheduling`; outputs are unchanged; off by default: on a CPU host and device
    share the cores, and it compiles one more program per sequence bucket).
    `enable_prefix_caching` (on, as in vLLM V1) reuses the KV pages of prompt prefixes
    already computed (prefix_cache.py); `prefix_caching_hash_algo` "sha256" makes page
    keys collision-proof for multi-tenant servers ("builtin": Python's 64-bit hash).
    `logprobs_mode` (vLLM's) says what `SamplingParams.logprobs` return: "raw_logprobs"
    (log_softmax of the model's logits), "processed_logprobs" (of the logits the token
    was drawn from: after penalties and bias, then temperature, top-k, top-p, min-p),
    "raw_logits" or "processed_logits"; it is compiled into the step, not chosen per
    request.
    `tensor_parallel_size` > 1 splits the model over that many devices (Megatron's
    layout, pagedjax/param_layout.py); `mesh` gives a `jax.sharding.Mesh` to run on
    instead, its "tp" axis the tensor-parallel one. `data_parallel_size` (vLLM's name)
    runs that many replicas, each with its own KV pool and scheduler, on dp x tp devices
    (or along a mesh's "dp" axis; pagedjax/data_parallel.py). Whether the devices exist
    is checked when the engine starts (pagedjax/mesh.py).
    """

    dtype: str = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 64
    num_blocks: Optional[int] = None
    kv_cache_memory_bytes: int = 1 << 30
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    min_token_bucket: Optional[int] = None
    seed: int = 0
    attention_backend: str = "auto"
    num_scheduler_steps: int = 1
    async_scheduling: bool = False
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "builtin"
    logprobs_mode: str = "raw_logprobs"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    mesh: Optional[Any] = None  # a jax.sharding.Mesh with a "tp" axis

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        _positive("block_size", self.block_size)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
            if self.num_blocks < 2:
                raise ValueError(
                    f"num_blocks must be >= 2 (block 0 is the reserved null page), "
                    f"got {self.num_blocks}")
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.min_token_bucket is not None:
            _positive("min_token_bucket", self.min_token_bucket)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        _positive("num_scheduler_steps", self.num_scheduler_steps)
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(
                f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, "
                             f"got {self.prefix_caching_hash_algo!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, "
                             f"got {self.logprobs_mode!r}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("data_parallel_size", self.data_parallel_size)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
