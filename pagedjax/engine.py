"""Engine: requests in, one scheduled + padded + jitted step at a time, finished requests out."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import resolve_attention_backend
from pagedjax.models import ModelConfig, build_model, check_params, split_layer_matrices

from .batching import build_prompt_targets, build_step_input, needs_prompt_logprobs
from .block_manager import BlockManager
from .buckets import Buckets
from .compile_cache import enable_compilation_cache
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_copy import copy_kv_blocks
from .parallel_sampling import child_seed
from .outputs import Logprob
from .request import Request
from .runner import ModelRunner, allocate_kv_cache
from .sampler import static_sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the KV pool."""

    num_blocks: int  # including the null page
    block_size: int
    used_blocks: int
    usage: float  # used / usable blocks
    waste: float  # allocated slots of live requests not holding a token
    bytes: int


@dataclass
class EngineStats:
    """Counters since the engine started."""

    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens prefilled (recomputes included)
    num_generated_tokens: int = 0
    busy_seconds: float = 0.0
    max_waste: float = 0.0
    waste_sum: float = 0.0
    max_seqs_in_step: int = 0
    peak_used_blocks: int = 0  # most KV pages in use at once (after a step's scheduling)
    num_block_copies: int = 0  # copy-on-write page copies (parallel sampling)

    @property
    def mean_waste(self) -> float:
        """Block-tail waste of live requests, averaged over steps."""
        return self.waste_sum / self.num_steps if self.num_steps else 0.0


@dataclass
class _DecodeCall:
    """A decode call dispatched to the device: `rows` are its (request, start position)
    pairs in batch order, `tokens` [num_steps, B] and `next_input` (the input of the step
    after it) are device arrays not yet fetched."""

    key: Any  # BucketKey with decode_call set
    rows: list
    tokens: Any
    next_input: Any
    start: float
    chainable: bool = True


@dataclass
class StepResult:
    """What one engine step changed: `updated` holds the requests that got a new token in
    it (scheduling order, finished ones included), `finished` those that ended in it
    (stopped, cut by a stop string, or ended by the scheduler without a token)."""

    updated: list[Request]
    finished: list[Request]


def resolve_dtype(dtype: str, platform: str) -> jnp.dtype:
    """"auto" is float32 on CPU (bf16 is slower there) and bfloat16 on GPU/TPU."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


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
        self.attention_backend = resolve_attention_backend(
            config.attention_backend, platform, head_dim=model_config.head_dim,
            block_size=config.block_size, dtype=self.dtype,
            group=model_config.num_heads // model_config.num_kv_heads)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = _resolve_max_model_len(config, model_config)
        block_size = config.block_size
        self.max_pages_per_seq = math.ceil(self.max_model_len / block_size)
        num_blocks = self._resolve_num_blocks(platform)

        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.buckets = Buckets.for_limits(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs, max_pages_per_seq=self.max_pages_per_seq,
            min_token_bucket=config.min_token_bucket, static_samplers=platform != "cpu")
        # Weights handed in as host arrays are copied to the device anyway: on CPU, copy each
        # layer's matrices to their own arrays then, so no step copies them out of the stack.
        # Device arrays stay as they are (no copy of a caller's params).
        self.per_layer_matrices = platform == "cpu" and not any(
            isinstance(x, jax.Array) for x in jax.tree.leaves(params["layers"]))
        model = build_model(model_config).clone(attention_backend=self.attention_backend)
        kv_cache = allocate_kv_cache(model_config.num_layers, model_config.num_kv_heads,
                                     num_blocks, block_size, model_config.head_dim, self.dtype)
        self.runner = ModelRunner(lambda p, s, kv, **kw: model.apply({"params": p}, s, kv, **kw),
                                  self.cast_params(params), kv_cache, self.max_pages_per_seq)
        self.stats = EngineStats()
        self._in_flight: Optional[_DecodeCall] = None  # dispatched, tokens not applied yet
        self._request_counter = itertools.count()

    # ---- configuration -------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        c = self.model_config
        return (2 * c.num_layers * c.num_kv_heads * self.config.block_size * c.head_dim
                * self.dtype.itemsize)

    def _resolve_num_blocks(self, platform: str) -> int:
        needed_for_one = self.max_pages_per_seq + 1  # + the null page
        if self.config.num_blocks is not None:
            num_blocks = self.config.num_blocks
        else:
            budget = self.config.kv_cache_memory_bytes
            if platform != "cpu":
                stats = jax.devices()[0].memory_stats() or {}
                free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
                if free > 0:
                    budget = int(free * self.config.kv_cache_memory_fraction)
            num_blocks = budget // self._bytes_per_block()
            # More pages than every sequence at full length could use is wasted memory.
            num_blocks = min(num_blocks, self.config.max_num_seqs * self.max_pages_per_seq + 1)
        if num_blocks < needed_for_one:
            raise ValueError(
                f"num_blocks: the KV pool has {num_blocks} blocks of {self.config.block_size} "
                f"tokens, but one sequence of max_model_len={self.max_model_len} needs "
                f"{needed_for_one} (null page included); raise num_blocks / the KV memory "
                f"budget or lower max_model_len")
        return num_blocks

    def cast_params(self, params: Any) -> Any:
        """Params as device arrays of the engine dtype (no copy when already so), in the
        engine's form: with `per_layer_matrices`, each layer matrix one array per layer
        (then a caller's stacked device arrays are copied)."""
        def to_device(x):
            return jnp.asarray(x, dtype=self.dtype)
        if self.per_layer_matrices:
            return split_layer_matrices(params, to_device)
        return jax.tree.map(to_device, params)

    def set_params(self, params: Any) -> None:
        """Swap in new weights (same shapes) without recompiling."""
        check_params(params, self.model_config)
        self.runner.set_params(self.cast_params(params))

    # ---- requests ------------------------------------------------------------------

    def make_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                     prompt: Optional[str] = None,
                     request_id: Optional[str] = None) -> Request:
        """Validate a prompt and build its Request (not yet queued).  Raises ValueError."""
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        token_ids = _validate_token_ids(prompt_token_ids, self.model_config.vocab_size)
        if not token_ids:
            raise ValueError("prompt: the prompt is empty (it has no tokens)")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: the prompt has {len(token_ids)} tokens, but max_model_len is "
                f"{self.max_model_len} (it must leave room for at least one new token)")
        bad_words_ids = sampling_params.check_token_ids(self.model_config.vocab_size,
                                                        self.tokenizer)
        if sampling_params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this engine has none")
        index = next(self._request_counter)
        seed = sampling_params.seed
        if seed is None:
            seed = int(np.random.SeedSequence([self.config.seed, index]).generate_state(
                1, np.uint64)[0]) >> 1
        request = Request(request_id=request_id or str(index), prompt_token_ids=token_ids,
                          sampling_params=sampling_params, seed=seed,
                          eos_token_ids=self.eos_token_ids, prompt=prompt)
        request.bad_words_token_ids = bad_words_ids
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(
                self.tokenizer, token_ids, sampling_params.skip_special_tokens,
                sampling_params.spaces_between_special_tokens)
        if sampling_params.n > 1:
            self._add_parallel_children(request, seed)
        return request

    def _add_parallel_children(self, parent: Request, seed: int) -> None:
        """Give an n > 1 request its n - 1 children (forked once its prompt is prefilled);
        sequence i samples with child_seed(seed, i) and child i has id f"{i}_{parent id}"."""
        n = parent.sampling_params.n
        if n > self.config.max_num_seqs:
            raise ValueError(f"n: {n} parallel sequences exceed max_num_seqs="
                             f"{self.config.max_num_seqs}")
        parent.seed = child_seed(seed, 0)
        parent.sequences = [parent]
        for i in range(1, n):
            child = dataclasses.replace(
                parent, request_id=f"{i}_{parent.request_id}", seed=child_seed(seed, i),
                prompt_token_ids=list(parent.prompt_token_ids), output_token_ids=[],
                block_ids=[], child_index=i, sequences=[], pending_children=[])
            if parent.detokenizer is not None:
                child.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, parent.prompt_token_ids,
                    parent.sampling_params.skip_special_tokens,
                    parent.sampling_params.spaces_between_special_tokens)
            parent.sequences.append(child)
            parent.pending_children.append(child)

    def add_request(self, request: Request) -> None:
        """Queue a request built by `make_request` (FCFS)."""
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
        prompt = parent.all_token_ids[:num_parent_tokens] + list(extra_token_ids)
        request = self.make_request(prompt, sampling_params, request_id=request_id)
        request.retain_blocks = retain_blocks
        cached = min(num_parent_tokens, parent.num_computed_tokens, len(prompt) - 1)
        if parent.block_ids and cached > 0:
            shared = parent.block_ids[:self.block_manager.blocks_needed(cached)]
            request.block_ids = self.block_manager.fork(shared)
            request.num_computed_tokens = cached
        try:
            self.scheduler.add_request(request, forked=True)
        except BaseException:
            self.block_manager.free(request)
            request.num_computed_tokens = 0
            raise
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
        if self._in_flight is not None:  # a decode call dispatched by the previous step
            call, self._in_flight = self._in_flight, None
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
        num_steps = self._reserve_decode_steps(output)
        self._copy_pages(output.copies)
        key, step_input = build_step_input(output.scheduled, self.buckets,
                                           self.config.block_size)
        if num_steps:
            rows = [(chunk.request, chunk.start_position) for chunk in output.scheduled]
            key = self.buckets.decode_call_key(key, num_steps, static_sampler(
                chunk.request.sampling_params for chunk in output.scheduled))
            return self._apply_decode_call(self._dispatch_decode_call(
                key, step_input, rows, self._block_tables(rows, step_input.block_tables),
                start))
        prompt_targets = build_prompt_targets(output.scheduled, key)
        tokens, logprobs = self.runner.execute(key, step_input, prompt_targets)
        if prompt_targets is not None:
            self._update_prompt_logprobs(output, self.runner.last_prompt_logprobs)
        live = [not chunk.request.is_finished for chunk in output.scheduled]
        finished = self.scheduler.update(output, tokens[:output.num_seqs].tolist())
        if logprobs is not None:
            self._update_logprobs(output, live, logprobs)
        finished += self._update_text(output)
        self._record(output, start)
        updated = [chunk.request for chunk in output.scheduled
                   if chunk.samples and chunk.request.finish_reason != "abort"]
        return StepResult(updated=updated, finished=finished)

    def _reserve_decode_steps(self, output: SchedulerOutput) -> int:
        """How many decode steps this batch runs in one decode call (multi_step.py):
        num_scheduler_steps when that is > 1 or async_scheduling is on, every chunk is a
        plain decode (one known token, no penalties or logprobs, no children to fork,
        room below max_model_len), every running request is in the batch, nobody waits
        for admission and the pool holds pages for every step (reserved here; page
        copies go to output.copies); else 0: a plain step."""
        steps = self.config.num_scheduler_steps
        if ((steps == 1 and not self.config.async_scheduling) or self.scheduler.num_waiting
                or output.preempted or output.finished
                or output.num_seqs != self.scheduler.num_running):
            return 0  # safeguard: a running request left out must not wait K steps
        for chunk in output.scheduled:
            request, params = chunk.request, chunk.request.sampling_params
            if (chunk.num_new_tokens != 1 or not chunk.samples or request.pending_children
                    or params.logprobs is not None or params.uses_penalties
                    or chunk.start_position + steps > self.max_model_len):
                return 0
        rows = [(chunk.request, chunk.start_position) for chunk in output.scheduled]
        copies = self._reserve_pages(rows, steps)
        if copies is None:
            return 0
        output.copies.extend(copies)
        return steps

    def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared pages (src, dst), before any step writes them."""
        if copies:
            self.runner.kv_cache = copy_kv_blocks(self.runner.kv_cache, copies)
            self.stats.num_block_copies += len(copies)

    def _reserve_pages(self, rows: list[tuple[Request, int]],
                       num_positions: int) -> Optional[list[tuple[int, int]]]:
        """Pages for `num_positions` positions from each row's start position on (private
        copies of shared ones: the page copies to run first are returned), or None when
        the pool cannot hold them (pages reserved so far stay with their requests)."""
        copies = []
        for request, start in rows:
            end = start + num_positions
            row_copies = self.block_manager.copy_on_write(request, start, end)
            if row_copies is None or not self.block_manager.ensure_capacity(request, end):
                return None
            copies += row_copies
        return copies

    def _block_tables(self, rows: list[tuple[Request, int]],
                      tables: np.ndarray) -> np.ndarray:  # [B, M]
        """`tables` with each row's every page, so each step of a multi-step call reads
        the keys the steps before it wrote."""
        tables = np.array(tables)
        for i, (request, _) in enumerate(rows):
            pages = request.block_ids[:tables.shape[1]]
            tables[i, :len(pages)] = pages
        return tables

    def _dispatch_decode_call(self, key, step_input, rows: list[tuple[Request, int]],
                              block_tables: np.ndarray, start: float) -> "_DecodeCall":
        """Start a decode call on the device (asynchronously)."""
        tokens, next_input = self.runner.dispatch_decode_steps(
            key, step_input._replace(block_tables=block_tables))
        return _DecodeCall(key, rows, tokens, next_input, start)

    def _chain_decode_call(self, call: "_DecodeCall") -> Optional["_DecodeCall"]:
        """Dispatch the call after `call` before its tokens reach the host, so the device
        runs it while the host applies them (vLLM V1's async scheduling, for decode
        batches): its input is `call`'s last sampled tokens, advanced on the device. Only
        when the batch cannot change in between: nobody waits, no row has ended, some row
        outlives `call` by max_tokens, every row stays below max_model_len and the pool
        holds the pages. Returns the dispatched call, or None."""
        steps = call.key.num_steps
        rows = [(request, start + steps) for request, start in call.rows]
        if (self.scheduler.num_waiting or any(r.is_finished for r, _ in rows)
                or any(start + steps > self.max_model_len for _, start in rows)):
            return None
        if not any(r.sampling_params.max_tokens is None
                   or r.sampling_params.max_tokens - len(r.output_token_ids) > steps
                   for r, _ in rows):
            return None  # every row ends within `call`
        copies = self._reserve_pages(rows, steps)
        if copies is None:
            return None
        self._copy_pages(copies)
        tables = self._block_tables(rows, np.zeros(call.next_input.block_tables.shape,
                                                   np.int32))
        return self._dispatch_decode_call(call.key, call.next_input, rows, tables,
                                          time.perf_counter())

    def _apply_decode_call(self, call: "_DecodeCall") -> StepResult:
        """Chain the next call when possible, then apply this call's tokens one step at a
        time as single steps would (a sequence that ends drops the rest)."""
        self._in_flight = self._chain_decode_call(call) if call.chainable else None
        tokens = self.runner.fetch_tokens(call.tokens)  # [num_steps, B]
        finished: list[Request] = []
        updated: dict[int, Request] = {}
        for j in range(call.key.num_steps):
            live = [i for i, (request, _) in enumerate(call.rows) if not request.is_finished]
            if not live:
                break
            step = SchedulerOutput(scheduled=[
                ScheduledRequest(call.rows[i][0], 1, call.rows[i][1] + j) for i in live])
            finished += self.scheduler.update(step, tokens[j, live].tolist())
            finished += self._update_text(step)
            self._record(step, call.start if j == 0 else time.perf_counter())
            for chunk in step.scheduled:
                if chunk.request.finish_reason != "abort":
                    updated[id(chunk.request)] = chunk.request
        if finished and self._in_flight is not None:
            # Rows ended: the call in flight still gets applied, but is not extended, so
            # pages freed now are never written by a later call of this chain.
            self._in_flight.chainable = False
        return StepResult(updated=list(updated.values()), finished=finished)

    def _update_logprobs(self, output, live: list[bool], logprobs) -> None:
        """Append this step's logprobs entry to each request that asked for them and got a
        token: {token_id: Logprob} with the sampled token first, then the top k."""
        for i, chunk in enumerate(output.scheduled):
            request = chunk.request
            k = request.sampling_params.logprobs
            if k is None or not chunk.samples or not live[i]:
                continue
            token = request.output_token_ids[-1]
            sampled = float(logprobs.sampled_logprob[i])
            entry = {token: Logprob(sampled, int(logprobs.sampled_rank[i]),
                                    self._decode_token(token))}
            for rank, (top_id, top_lp) in enumerate(
                    zip(logprobs.top_ids[i, :k].tolist(), logprobs.top_logprobs[i, :k].tolist())):
                if top_id not in entry:
                    entry[top_id] = Logprob(float(top_lp), rank + 1, self._decode_token(top_id))
            if request.logprobs is None:
                request.logprobs, request.cumulative_logprob = [], 0.0
            request.logprobs.append(entry)
            request.cumulative_logprob += sampled

    def _update_prompt_logprobs(self, output, logprobs) -> None:
        """Extend `request.prompt_logprobs` ([None] + one {token_id: Logprob} per prompt
        token after the first, vLLM's layout) with the positions this step's chunk covered;
        positions already recorded (a recompute after preemption) are not added again."""
        offset = 0
        for chunk in output.scheduled:
            request, start = chunk.request, chunk.start_position
            if needs_prompt_logprobs(chunk):
                k = request.sampling_params.prompt_logprobs
                prompt = request.prompt_token_ids
                if request.prompt_logprobs is None:
                    request.prompt_logprobs = [None]
                entries = request.prompt_logprobs
                for pos in range(start, min(start + chunk.num_new_tokens, len(prompt) - 1)):
                    if len(entries) != pos + 1:
                        continue
                    i, token = offset + pos - start, prompt[pos + 1]
                    entry = {token: Logprob(float(logprobs.sampled_logprob[i]),
                                            int(logprobs.sampled_rank[i]),
                                            self._decode_token(token))}
                    for rank, (top_id, top_lp) in enumerate(zip(
                            logprobs.top_ids[i, :k].tolist(),
                            logprobs.top_logprobs[i, :k].tolist())):
                        if top_id not in entry:
                            entry[top_id] = Logprob(float(top_lp), rank + 1,
                                                    self._decode_token(top_id))
                    entries.append(entry)
            offset += chunk.num_new_tokens

    def _decode_token(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _update_text(self, output) -> list[Request]:
        """Detokenize this step's new tokens and apply stop strings; returns the requests
        a stop string ended (those that were still running).

        vLLM semantics: the text of a stop token (EOS or a stop token id) is left out
        unless `include_stop_str_in_output`; a stop string is searched only where it could
        end in the new text, and only once `min_tokens` tokens exist; the text is cut
        before it (after it with `include_stop_str_in_output`) while token ids are kept.
        """
        stopped = []
        for chunk in output.scheduled:
            request = chunk.request
            detokenizer = request.detokenizer
            if not chunk.samples or detokenizer is None or request.finish_reason == "abort":
                continue
            params = request.sampling_params
            by_stop_token = request.finish_reason == "stop"
            delta = ""
            if not by_stop_token or params.include_stop_str_in_output:
                delta = detokenizer.add(request.output_token_ids[-1])
            if request.is_finished:
                delta += detokenizer.flush()
            request.output_text += delta
            if (by_stop_token or not params.stop or not delta
                    or len(request.output_token_ids) < params.min_tokens):
                continue
            match = _find_stop_string(request.output_text, len(delta), params.stop)
            if match is None:
                continue
            index, stop_str = match
            if params.include_stop_str_in_output:
                index += len(stop_str)
            request.output_text = request.output_text[:index]
            if request.is_finished:  # ended by length on this very token: a stop wins
                request.finish_reason, request.stop_reason = "stop", stop_str
            else:
                self.scheduler.finish_request(request.request_id, "stop", stop_str)
                stopped.append(request)
        return stopped

    def _record(self, output, start: float) -> None:
        s = self.stats
        s.num_steps += 1
        s.busy_seconds += time.perf_counter() - start
        s.max_seqs_in_step = max(s.max_seqs_in_step, output.num_seqs)
        for chunk in output.scheduled:
            prompt_left = len(chunk.request.prompt_token_ids) - chunk.start_position
            s.num_prompt_tokens += max(0, min(chunk.num_new_tokens, prompt_left))
            s.num_generated_tokens += int(chunk.samples)
        waste = self.block_manager.waste(self.scheduler.running)
        s.max_waste = max(s.max_waste, waste)
        s.waste_sum += waste

    def warmup_keys(self) -> list:
        """The bucket shapes `warmup` compiles (every one a step of this engine can take
        without penalties or logprobs)."""
        return self.buckets.all_keys(self.config.num_scheduler_steps,
                                     self.config.async_scheduling)

    def warmup(self) -> None:
        """Compile every bucket shape now, so serving never compiles later."""
        for key in self.warmup_keys():
            self.runner.compile(key)

    # ---- introspection -------------------------------------------------------------

    @property
    def num_compiles(self) -> int:
        """Step programs compiled so far."""
        return self.runner.num_compiles

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling step programs."""
        return self.runner.compile_seconds

    def kv_cache_stats(self) -> KVCacheStats:
        """Current pool usage and the block-tail waste of live requests."""
        bm = self.block_manager
        live = self.scheduler.running
        return KVCacheStats(num_blocks=bm.num_blocks, block_size=bm.block_size,
                            used_blocks=bm.num_used_blocks, usage=bm.usage,
                            waste=bm.waste(live),
                            bytes=bm.num_blocks * self._bytes_per_block())


def _resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={limit}")
    return config.max_model_len


def _find_stop_string(text: str, num_new_chars: int,
                      stop: Sequence[str]) -> Optional[tuple[int, str]]:
    """The earliest stop string that ends within the last `num_new_chars` of `text`, as
    (start index, string); ties go to the one listed first."""
    best = None
    for stop_str in stop:
        start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    return best


def _validate_token_ids(token_ids: Any, vocab_size: int) -> list[int]:
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    ids = list(token_ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"prompt_token_ids must hold ints, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt_token_ids: token id {token} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]
