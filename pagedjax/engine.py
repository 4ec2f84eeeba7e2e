"""Engine: the step loop. Each step schedules, builds the padded step input, runs it on the
device and applies the sampled tokens (vLLM's EngineCore.step).

Around it, one concept per module: requests are built by input_processor, scheduled by
scheduler (which owns the KV pages through block_manager), packed by batching, run by
runner, and their tokens turned into text, logprobs and stop decisions by
output_processor; decode calls that chain several steps are decode_calls'.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from pagedjax.kernels import resolve_attention_backend, small_matmul
from pagedjax.models import ModelConfig, build_model, check_params, split_layer_matrices

from .batching import build_prompt_targets, build_step_input
from .block_manager import BlockManager
from .buckets import Buckets
from .compile_cache import enable_compilation_cache
from .config import EngineConfig
from .decode_calls import DecodeCall, DecodeCallPipeline
from .distributed import is_leader, plan_channel
from .engine_stats import EngineStats, KVCacheStats, QueueStats
from .grammar_bitmasks import GrammarBitmasks
from .input_processor import InputProcessor
from .kv_pool import (bytes_per_block, resolve_dtype, resolve_kv_dtype, resolve_max_model_len,
                      resolve_num_blocks)
from .mesh import engine_mesh
from .output_processor import OutputProcessor
from .param_layout import TensorParallelLayout
from .prefix_cache import PrefixCache
from .request import Request
from .runner import ModelRunner, allocate_kv_cache
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .weight_blocks import WeightBlocks, detach as detach_blocks

__all__ = ["Engine", "EngineNotReady", "EngineStats", "KVCacheStats", "QueueStats",
           "StepResult", "resolve_dtype"]


class EngineNotReady(RuntimeError):
    """The engine cannot take requests now: it sleeps, or has no (live) weights."""


@dataclass
class StepResult:
    """What one engine step changed: `updated` holds the requests that got a new token in
    it (scheduling order, finished ones included), `finished` those that ended in it
    (stopped, cut by a stop string, or ended by the scheduler without a token)."""

    updated: list[Request]
    finished: list[Request]


class Engine:
    """Continuous-batching engine over one model, one paged KV pool and one scheduler."""

    def __init__(self, model_config: ModelConfig, params: Any, eos_token_ids: frozenset[int],
                 config: EngineConfig, tokenizer: Any = None):
        check_params(params, model_config)
        self.tokenizer = tokenizer  # None: no output text (and no stop strings)
        self.compilation_cache_dir = enable_compilation_cache()
        self.model_config = model_config
        self.config = config
        platform = jax.default_backend()
        self.dtype = resolve_dtype(config.dtype, platform)
        # Tensor parallel: a mesh and where each param and the KV pool lie on it; the
        # programs then run `step_config`, the model with KV heads copied when tp > K.
        self.mesh = engine_mesh(config.tensor_parallel_size, config.data_parallel_size,
                                config.mesh)
        self.layout = None if self.mesh is None else TensorParallelLayout(model_config,
                                                                          self.mesh)
        # Several processes (distributed.py): process 0 schedules and sends each device
        # operation to the others, which replay it.
        self.plan_channel = plan_channel()
        if self.plan_channel is not None:
            _check_multi_process(config, self.mesh)
        self.step_config = model_config if self.layout is None else (
            self.layout.engine_model_config)
        # The pool the native kernels would read (a bfloat16 one only on one device), then
        # the pool of the backend that serves.
        self.attention_backend = resolve_attention_backend(
            config.attention_backend, platform, head_dim=model_config.head_dim,
            block_size=config.block_size,
            dtype=resolve_kv_dtype(self.dtype, platform, native=self.layout is None),
            group=model_config.num_heads // self.step_config.num_kv_heads)
        self.kv_dtype = resolve_kv_dtype(self.dtype, platform, native=(
            self.attention_backend == "native" and self.layout is None))
        if (self.attention_backend == "native" and self.layout is None
                and small_matmul.unsupported_reason(platform, self.dtype) is None):
            # Products of a few rows (decode steps of a few sequences) in the CPU kernel
            # that reads each weight once; "reference" stays pure XLA.
            self.step_config = dataclasses.replace(self.step_config,
                                                   small_matmul_rows=small_matmul.MAX_ROWS)
        if self.attention_backend == "exact":  # pagedjax.forward(exact=True)'s numerics
            self.step_config = dataclasses.replace(self.step_config, exact=True)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = resolve_max_model_len(config, model_config)
        self.max_pages_per_seq = math.ceil(self.max_model_len / config.block_size)
        num_blocks = resolve_num_blocks(config, self.step_config, self.max_model_len,
                                        self.kv_dtype, platform,
                                        kv_shards=1 if self.layout is None else self.layout.tp)

        self.input_processor = InputProcessor(
            vocab_size=model_config.vocab_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, eos_token_ids=self.eos_token_ids,
            tokenizer=tokenizer, seed=config.seed)
        self.prefix_cache = (PrefixCache(config.block_size, config.prefix_caching_hash_algo)
                             if config.enable_prefix_caching else None)
        self.block_manager = BlockManager(num_blocks, config.block_size, self.prefix_cache)
        self.buckets = Buckets.for_limits(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs, max_pages_per_seq=self.max_pages_per_seq,
            min_token_bucket=config.min_token_bucket or (1 if platform == "cpu" else 16),
            # XLA sums a one-row product (a matrix-vector one) in another order than
            # products of 2+ rows, which agree row by row whatever the row count: the
            # exact backend's steps, like a forward of rows of 2+ tokens, never run one.
            min_rows=2 if self.attention_backend == "exact" else 1,
            static_samplers=platform != "cpu")
        # On CPU a step's padding costs what its tokens do: prompt chunks end steps at
        # bucket sizes where that saves padding (buckets.bucket_aligned_total).
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   self.buckets.tokens if platform == "cpu" else ())
        self.output_processor = OutputProcessor(tokenizer, self.max_model_len)
        self.grammar_bitmasks = GrammarBitmasks(model_config.vocab_size)
        # Weights handed in as host arrays are copied to the device anyway: on CPU, copy each
        # layer's matrices to their own arrays then, so no step copies them out of the stack.
        # Device arrays stay as they are (no copy of a caller's params). A sharded engine
        # keeps stacked matrices.
        self.per_layer_matrices = platform == "cpu" and self.layout is None and not any(
            isinstance(x, jax.Array) for x in jax.tree.leaves(params["layers"]))
        # Matrices a block format holds exactly (a quantized GGUF's), also kept as blocks for
        # the small-matmul kernel's decode products (weight_blocks.py): float32 engines only
        # (the blocks hold the float32 values; a bfloat16 engine's kernel reads its params).
        self.weight_blocks = (WeightBlocks.encode(params, model_config)
                              if self.step_config.small_matmul_rows and self.per_layer_matrices
                              and self.dtype == jnp.float32 else None)
        model = build_model(self.step_config).clone(attention_backend=self.attention_backend,
                                                    mesh=self.mesh)
        kv_cache = allocate_kv_cache(
            self.step_config.num_layers, self.step_config.num_kv_heads, num_blocks,
            config.block_size, self.step_config.head_dim, self.kv_dtype,
            None if self.layout is None else self.layout.kv_shardings())
        self.runner = ModelRunner(lambda p, s, kv, **kw: model.apply({"params": p}, s, kv, **kw),
                                  self.cast_params(params), kv_cache, self.max_pages_per_seq,
                                  logprobs_mode=config.logprobs_mode, mesh=self.mesh,
                                  plan_channel=self.plan_channel,
                                  exact_logprobs=self.step_config.exact)
        self.decode_calls = DecodeCallPipeline(
            self.scheduler, self.runner, num_scheduler_steps=config.num_scheduler_steps,
            async_scheduling=config.async_scheduling, max_model_len=self.max_model_len,
            copy_pages=self._copy_pages)
        self.stats = EngineStats()

    # ---- weights -------------------------------------------------------------------

    def cast_params(self, params: Any) -> Any:
        """Params as device arrays of the engine dtype (no copy when already so), in the
        engine's form: with `per_layer_matrices`, each layer matrix one array per layer
        (then a caller's stacked device arrays are copied); on a mesh, in the layout's
        shardings (param_layout.py: leaves already so are kept as they are)."""
        if self.layout is not None:
            return self.layout.to_engine_layout(params, self.dtype)

        def to_device(x):
            return jnp.asarray(x, dtype=self.dtype)
        if self.per_layer_matrices:
            params = split_layer_matrices(params, to_device)
            if self.weight_blocks is not None:
                params = self.weight_blocks.attach(params, self.step_config)
            return params
        return jax.tree.map(to_device, params)

    @property
    def params(self) -> Any:
        """The weights the engine runs, as a params tree in its form (device arrays; on
        CPU, layer matrices one array per layer); None after sleep(level=2)."""
        params = self.runner.params
        if params is None or self.weight_blocks is None:
            return params
        return detach_blocks(params, self.step_config)

    def set_params(self, params: Any) -> None:
        """Swap in new weights (same shapes) without recompiling; no KV page computed with
        the old weights is found by the prefix cache again."""
        self._check_single_process("update_params")
        check_params(params, self.model_config)
        if self.weight_blocks is not None:
            self.weight_blocks = self.weight_blocks.stale()  # blocks of the old weights
        self.runner.set_params(self.cast_params(params))
        if self.prefix_cache is not None:
            self.prefix_cache.new_weights()

    def reset_prefix_cache(self) -> None:
        """Forget every cached KV page (pages in use stay with their requests)."""
        self.block_manager.reset_prefix_cache()

    def _check_single_process(self, what: str) -> None:
        """Weights live in every process's own program, so process 0 cannot send them."""
        if self.plan_channel is not None:
            raise RuntimeError(f"{what}: not supported across processes yet (each process "
                               f"would have to pass its weights together)")

    # ---- sleep (device memory back to a trainer) -----------------------------------

    def sleep(self, level: int = 1) -> None:
        """Give device memory back with no request in flight: level 1 deletes the KV pool,
        level 2 also lets go of the weights (`set_params` brings them back). Compiled
        programs are kept, so `wake_up` recompiles nothing."""
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"level must be 1 (KV pool) or 2 (KV pool and weights), "
                             f"got {level!r}")
        if level == 2:
            self._check_single_process("sleep(level=2)")
        if self.has_unfinished_requests() or self.block_manager.num_used_blocks:
            raise RuntimeError(
                f"sleep: {self.scheduler.num_running + self.scheduler.num_waiting} requests "
                f"in flight and {self.block_manager.num_used_blocks} KV pages held; abort or "
                f"finish (and release) them first")
        self.decode_calls.take()  # a finished chain's last call: every row in it has ended
        self.block_manager.reset_prefix_cache()  # cached pages' contents go with the pool
        self.runner.free_kv_cache()
        if level == 2:
            self.runner.drop_params()
            if self.weight_blocks is not None:
                self.weight_blocks = self.weight_blocks.stale()

    def wake_up(self) -> None:
        """Reallocate the KV pool after `sleep` (no-op when awake); weights dropped by
        level 2 come back with `set_params`."""
        self.runner.allocate_kv_cache()

    @property
    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up` (no KV pool)."""
        return self.runner.kv_cache is None

    @property
    def has_weights(self) -> bool:
        """False after `sleep(level=2)` until `set_params`."""
        return self.runner.params is not None

    def check_ready(self) -> None:
        """Raise EngineNotReady, saying why, unless requests can run now."""
        if self.is_sleeping:
            raise EngineNotReady("the engine is asleep (its KV pool is freed): call "
                                 "wake_up() first")
        if not self.has_weights:
            raise EngineNotReady("the engine has no weights: sleep(level=2) dropped them; "
                                 "pass them with update_params(params)")
        if any(isinstance(x, jax.Array) and x.is_deleted()
               for x in jax.tree.leaves(self.runner.params)):
            raise EngineNotReady("the engine's weights were deleted (donated to a training "
                                 "step?): pass the live ones with update_params(params)")

    # ---- requests ------------------------------------------------------------------

    def make_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                     prompt: Optional[str] = None,
                     request_id: Optional[str] = None) -> Request:
        """Validate a prompt and build its Request (not yet queued).  Raises ValueError."""
        return self.input_processor.make_request(prompt_token_ids, sampling_params,
                                                 prompt=prompt, request_id=request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request built by `make_request` (FCFS). Raises EngineNotReady while
        the engine sleeps or has no weights."""
        self.check_ready()
        if self.plan_channel is not None and not is_leader():
            raise RuntimeError(f"process {jax.process_index()} follows process 0, which "
                               f"takes every request: call pagedjax.distributed.follow(llm)")
        self.scheduler.add_request(request)

    def fork_request(self, parent: Request, extra_token_ids: Sequence[int],
                     sampling_params: SamplingParams, *,
                     num_parent_tokens: Optional[int] = None,
                     request_id: Optional[str] = None,
                     retain_blocks: bool = False) -> Request:
        """Build and queue a request that continues `parent` from its cached KV.

        Its prompt is `parent.all_token_ids[:num_parent_tokens] + extra_token_ids`
        (`num_parent_tokens` defaults to the parent's computed tokens). The pages holding
        the parent's first min(num_parent_tokens, parent.num_computed_tokens,
        len(prompt) - 1) tokens are shared by reference count, a partly filled last one is
        copied on write, and only the remaining prompt tokens are prefilled. `parent` may
        be running, waiting or finished with `retain_blocks` (not yet released); one that
        holds no pages (preempted, finished and freed) just gives its tokens, and the new
        request prefills its whole prompt. A forked request that gets preempted re-prefills
        its whole prompt like any other. Raises ValueError for bad inputs (nothing queued).
        """
        if not isinstance(parent, Request):
            raise ValueError(f"parent must be a Request, got {type(parent).__name__}")
        if num_parent_tokens is None:
            num_parent_tokens = parent.num_computed_tokens
        if (isinstance(num_parent_tokens, bool) or not isinstance(num_parent_tokens, int)
                or not 0 <= num_parent_tokens <= parent.num_tokens):
            raise ValueError(f"num_parent_tokens must be an int in [0, {parent.num_tokens}], "
                             f"got {num_parent_tokens!r}")
        if isinstance(sampling_params, SamplingParams) and (
                sampling_params.prompt_logprobs is not None):
            raise ValueError("prompt_logprobs: a forked request does not compute its "
                             "shared prefix, so it cannot return prompt logprobs")
        self.check_ready()
        prompt = parent.all_token_ids[:num_parent_tokens] + list(extra_token_ids)
        request = self.make_request(prompt, sampling_params, request_id=request_id)
        request.retain_blocks = retain_blocks
        cached = min(num_parent_tokens, parent.num_computed_tokens, len(prompt) - 1)
        self.scheduler.add_forked(request, parent, cached)
        return request

    def release_request(self, request: Request) -> None:
        """Free the KV pages a finished `retain_blocks` request kept (no-op otherwise)."""
        self.scheduler.release(request)

    def abort_request(self, request_id: str) -> Optional[Request]:
        """Stop a request wherever it is and free its blocks."""
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    # ---- stepping ------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Schedule, run and commit one step; returns requests that finished in it."""
        return self.step_with_updates().finished

    def step_with_updates(self) -> StepResult:
        """Like `step`, but also reports which requests got new tokens (for streaming)."""
        call = self.decode_calls.take()  # dispatched by the previous step
        if call is not None:
            return self._apply_decode_call(call)
        output = self.scheduler.schedule()
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks,
                                          self.block_manager.num_used_blocks)
        if output.is_empty:
            finished = self.scheduler.update(output, [])
            if not finished and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending")
            return StepResult(updated=[], finished=finished)
        start = time.perf_counter()
        num_steps = self.decode_calls.plan(output)
        self._copy_pages(output.copies)
        key, step_input = build_step_input(
            output.scheduled, self.buckets, self.config.block_size, num_steps,
            token_bitmask=None if num_steps else self.grammar_bitmasks.rows(output.scheduled))
        if num_steps:
            rows = [(chunk.request, chunk.start_position) for chunk in output.scheduled]
            return self._apply_decode_call(
                self.decode_calls.dispatch(key, step_input, rows, start))
        prompt_targets = build_prompt_targets(output.scheduled, key)
        tokens, logprobs = self.runner.execute(key, step_input, prompt_targets)
        prompt_logprobs = self.runner.last_prompt_logprobs if prompt_targets is not None else None
        return self._commit(output, tokens[:output.num_seqs].tolist(), start, logprobs,
                            prompt_logprobs)

    def _commit(self, output: SchedulerOutput, tokens: list[int], start: float,
                logprobs: Any = None, prompt_logprobs: Any = None) -> StepResult:
        """Apply one step's sampled tokens: the scheduler appends them, the output
        processor decides what stops, the scheduler ends those."""
        finished = self.scheduler.update(output, tokens)
        # Grammars take the new tokens and make the next masks while outputs are processed.
        self.grammar_bitmasks.advance(output.scheduled)
        decisions = self.output_processor.process(output.scheduled, logprobs, prompt_logprobs)
        finished += self.scheduler.finish_requests(decisions)
        self.stats.record_step(output, time.perf_counter() - start, self.scheduler.kv_waste())
        updated = [chunk.request for chunk in output.scheduled
                   if chunk.samples and chunk.request.finish_reason != "abort"]
        return StepResult(updated=updated, finished=finished)

    def _apply_decode_call(self, call: DecodeCall) -> StepResult:
        """Chain the next call when possible, then apply this call's tokens one step at a
        time as single steps would (a sequence that ends drops the rest)."""
        self.decode_calls.in_flight = self.decode_calls.chain(call)
        tokens = self.runner.fetch_tokens(call.tokens)  # [num_steps, B]
        finished: list[Request] = []
        updated: dict[int, Request] = {}
        for j in range(call.key.num_steps):
            step, live = call.substep(j)
            if not live:
                break
            result = self._commit(step, tokens[j, live].tolist(),
                                  call.start if j == 0 else time.perf_counter())
            finished += result.finished
            for request in result.updated:
                updated[id(request)] = request
        if finished:
            self.decode_calls.stop_chain()
        return StepResult(updated=list(updated.values()), finished=finished)

    def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared pages (src, dst), before any step writes them."""
        if copies:
            self.runner.copy_pages(copies)
            self.stats.num_block_copies += len(copies)

    # ---- compiling -----------------------------------------------------------------

    def warmup_keys(self) -> list:
        """The bucket shapes `warmup` compiles (every one a step of this engine can take
        without penalties or logprobs)."""
        return self.buckets.all_keys(self.config.num_scheduler_steps,
                                     self.config.async_scheduling)

    def warmup(self) -> None:
        """Compile every bucket shape now, so serving never compiles later."""
        for key in self.warmup_keys():
            self.runner.compile(key)

    @property
    def num_compiles(self) -> int:
        """Step programs compiled so far."""
        return self.runner.num_compiles

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling step programs."""
        return self.runner.compile_seconds

    # ---- introspection -------------------------------------------------------------

    def kv_cache_stats(self) -> KVCacheStats:
        """Current pool usage and the block-tail waste of live requests."""
        bm, cache = self.block_manager, self.prefix_cache
        return KVCacheStats(num_blocks=bm.num_blocks, block_size=bm.block_size,
                            used_blocks=bm.num_used_blocks, usage=bm.usage,
                            waste=self.scheduler.kv_waste(),
                            bytes=bm.num_blocks * bytes_per_block(
                                self.step_config, self.config.block_size, self.kv_dtype),
                            cached_blocks=cache.num_cached_blocks if cache else 0,
                            prefix_cache_queries=cache.num_queried_tokens if cache else 0,
                            prefix_cache_hits=cache.num_hit_tokens if cache else 0)

    def queue_stats(self) -> QueueStats:
        """Requests running and waiting now, and preemptions so far."""
        s = self.scheduler
        return QueueStats(num_running=s.num_running, num_waiting=s.num_waiting,
                          num_preemptions=s.num_preemptions)


def _check_multi_process(config: EngineConfig, mesh: Any) -> None:
    """What a run over several processes needs: a mesh over every process's devices (each
    process runs every program) and plain steps (a chained decode call's input stays on
    the devices, where process 0 cannot send it)."""
    if mesh is None or mesh.devices.size != jax.device_count():
        raise ValueError(f"tensor_parallel_size: a run over {jax.process_count()} processes "
                         f"needs a mesh over all {jax.device_count()} devices, got "
                         f"{1 if mesh is None else mesh.devices.size}")
    if config.num_scheduler_steps != 1 or config.async_scheduling:
        raise ValueError("num_scheduler_steps / async_scheduling: a run over several "
                         "processes takes one step per program (num_scheduler_steps=1, "
                         "async_scheduling=False)")
