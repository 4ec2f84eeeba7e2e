"""Data parallelism: `data_parallel_size` engine replicas behind one engine interface.

Each replica is a whole Engine (scheduler, KV pool, compiled programs) on its own mesh of
`tensor_parallel_size` devices (mesh.replica_meshes), so a mesh of 8 devices runs dp=4 x
tp=2. A router sends each new request to the replica with the fewest unfinished requests,
as vLLM's data-parallel front end balances its engine cores: one scheduler per replica keeps
each step's batch, buckets and block tables exactly the single-engine ones (no step pads
rows for another replica's sequences), and a replica's prefix cache and forks stay within
its own pool. Forks (beam search) go to their parent's replica. One step steps every busy
replica at once, each on a worker thread: their device programs overlap, their host work
takes turns on the GIL.
"""

from __future__ import annotations

import dataclasses
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from pagedjax.models import ModelConfig

from .config import EngineConfig
from .engine import Engine, StepResult
from .engine_stats import EngineStats, KVCacheStats, QueueStats
from .mesh import DP_AXIS, replica_meshes
from .request import Request
from .sampling_params import SamplingParams


def make_engine(model_config: ModelConfig, params: Any, eos_token_ids: frozenset[int],
                config: EngineConfig, tokenizer: Any = None) -> Any:
    """An Engine, or a DataParallelEngine when `config` asks for more than one replica
    (`data_parallel_size` > 1, or a mesh whose DP_AXIS is longer than 1)."""
    mesh_has_dp = DP_AXIS in getattr(config.mesh, "axis_names", ())
    replicas = config.data_parallel_size
    if mesh_has_dp:
        replicas = max(replicas, config.mesh.shape[DP_AXIS])
    if replicas == 1:
        if mesh_has_dp:  # a dp axis of size 1: the engine runs on the rest of the mesh
            config = dataclasses.replace(config, mesh=replica_meshes(
                config.tensor_parallel_size, 1, config.mesh)[0])
        return Engine(model_config, params, eos_token_ids, config, tokenizer)
    return DataParallelEngine(model_config, params, eos_token_ids, config, tokenizer)


class DataParallelEngine:
    """Several Engine replicas, one per slice of the devices, driven as one engine."""

    def __init__(self, model_config: ModelConfig, params: Any, eos_token_ids: frozenset[int],
                 config: EngineConfig, tokenizer: Any = None):
        meshes = replica_meshes(config.tensor_parallel_size, config.data_parallel_size,
                                config.mesh)
        self.replicas = [
            Engine(model_config, params, eos_token_ids,
                   dataclasses.replace(config, data_parallel_size=1, mesh=mesh),
                   tokenizer=tokenizer)
            for mesh in meshes]
        first = self.replicas[0]
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.eos_token_ids = first.eos_token_ids
        self.max_model_len = first.max_model_len
        self.attention_backend = first.attention_backend
        # One input processor: request ids and default seeds from one sequence, so a
        # request samples the same tokens whichever replica runs it.
        self.input_processor = first.input_processor
        self._replica_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._workers = ThreadPoolExecutor(len(self.replicas),
                                           thread_name_prefix="pagedjax-replica")

    # ---- requests ------------------------------------------------------------------

    def make_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                     prompt: Optional[str] = None,
                     request_id: Optional[str] = None) -> Request:
        """Validate a prompt and build its Request: replica 0's Engine.make_request, whose
        input processor names and seeds every replica's requests."""
        return self.replicas[0].make_request(prompt_token_ids, sampling_params,
                                             prompt=prompt, request_id=request_id)

    def add_request(self, request: Request) -> None:
        """Queue `request` on the replica with the fewest unfinished requests (the lowest
        index among equals)."""
        replica = min(self.replicas, key=_load)
        replica.add_request(request)
        self._replica_of[request] = replica

    def fork_request(self, parent: Request, extra_token_ids: Sequence[int],
                     sampling_params: SamplingParams, **kwargs) -> Request:
        """Engine.fork_request on the replica holding `parent`'s pages."""
        replica = self._replica(parent)
        request = replica.fork_request(parent, extra_token_ids, sampling_params, **kwargs)
        self._replica_of[request] = replica
        return request

    def release_request(self, request: Request) -> None:
        """Free the pages a finished `retain_blocks` request kept."""
        self._replica(request).release_request(request)

    def abort_request(self, request_id: str) -> Optional[Request]:
        """Stop a request on whichever replica has it and free its pages."""
        for replica in self.replicas:
            request = replica.abort_request(request_id)
            if request is not None:
                return request
        return None

    def has_unfinished_requests(self) -> bool:
        """True while any replica has a request waiting or running."""
        return any(replica.has_unfinished_requests() for replica in self.replicas)

    def _replica(self, request: Request) -> Engine:
        replica = self._replica_of.get(request)
        if replica is None:
            raise ValueError("request: not one this engine queued")
        return replica

    # ---- stepping ------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One step of every busy replica; returns the requests that finished in it."""
        return self.step_with_updates().finished

    def step_with_updates(self) -> StepResult:
        """One step of every replica with unfinished requests, run side by side; their
        results in replica order."""
        busy = [replica for replica in self.replicas if replica.has_unfinished_requests()]
        if len(busy) <= 1:
            results = [replica.step_with_updates() for replica in busy]
        else:
            results = [future.result() for future in
                       [self._workers.submit(replica.step_with_updates) for replica in busy]]
        return StepResult(updated=[r for result in results for r in result.updated],
                          finished=[r for result in results for r in result.finished])

    # ---- weights, memory, compiling: every replica ---------------------------------

    def set_params(self, params: Any) -> None:
        """New weights on every replica (each takes its copy on its own devices)."""
        for replica in self.replicas:
            replica.set_params(params)

    def reset_prefix_cache(self) -> None:
        """Forget every replica's cached KV pages."""
        for replica in self.replicas:
            replica.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Engine.sleep on every replica."""
        for replica in self.replicas:
            replica.sleep(level)

    def wake_up(self) -> None:
        """Engine.wake_up on every replica."""
        for replica in self.replicas:
            replica.wake_up()

    @property
    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up`."""
        return self.replicas[0].is_sleeping

    def check_ready(self) -> None:
        """Raise EngineNotReady unless every replica can run requests."""
        for replica in self.replicas:
            replica.check_ready()

    def warmup_keys(self) -> list:
        """The bucket shapes `warmup` compiles on each replica."""
        return self.replicas[0].warmup_keys()

    def warmup(self) -> None:
        """Compile every bucket shape on every replica."""
        for replica in self.replicas:
            replica.warmup()

    @property
    def num_compiles(self) -> int:
        """Step programs compiled so far, all replicas together."""
        return sum(replica.num_compiles for replica in self.replicas)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling, all replicas together."""
        return sum(replica.compile_seconds for replica in self.replicas)

    # ---- introspection -------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """The replicas' counters added up (maxima: the largest)."""
        return EngineStats.combined([replica.stats for replica in self.replicas])

    def kv_cache_stats(self) -> KVCacheStats:
        """All replicas' KV pools as one."""
        return KVCacheStats.combined([replica.kv_cache_stats() for replica in self.replicas])

    def queue_stats(self) -> QueueStats:
        """All replicas' queues as one."""
        parts = [replica.queue_stats() for replica in self.replicas]
        return QueueStats(num_running=sum(q.num_running for q in parts),
                          num_waiting=sum(q.num_waiting for q in parts),
                          num_preemptions=sum(q.num_preemptions for q in parts))


def _load(replica: Engine) -> int:
    queues = replica.queue_stats()
    return queues.num_running + queues.num_waiting
