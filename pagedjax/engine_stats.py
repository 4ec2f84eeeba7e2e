"""What an engine reports about itself: counters, queue state and the KV pool."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the KV pool."""

    num_blocks: int  # including the null page
    block_size: int
    used_blocks: int
    usage: float  # used / usable blocks
    waste: float  # allocated slots of live requests not holding a token
    bytes: int
    cached_blocks: int = 0  # pages holding a prefix-cache key or tail (free or in use)
    prefix_cache_queries: int = 0  # prompt tokens looked up, since the engine started
    prefix_cache_hits: int = 0  # of those, tokens found in the cache

    @classmethod
    def combined(cls, parts: list["KVCacheStats"]) -> "KVCacheStats":
        """Several pools (data-parallel replicas) as one: sizes and counters added, usage
        and waste over all of them (waste weighted by each pool's pages in use)."""
        used = sum(p.used_blocks for p in parts)
        usable = sum(p.num_blocks - 1 for p in parts)  # each pool keeps its null page
        return cls(num_blocks=sum(p.num_blocks for p in parts), block_size=parts[0].block_size,
                   used_blocks=used, usage=used / usable if usable else 0.0,
                   waste=sum(p.waste * p.used_blocks for p in parts) / used if used else 0.0,
                   bytes=sum(p.bytes for p in parts),
                   cached_blocks=sum(p.cached_blocks for p in parts),
                   prefix_cache_queries=sum(p.prefix_cache_queries for p in parts),
                   prefix_cache_hits=sum(p.prefix_cache_hits for p in parts))

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens over queried tokens (0 before any query)."""
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of the scheduler's queues (what a metrics endpoint or a log shows)."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # since the engine started


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

    @classmethod
    def combined(cls, parts: list["EngineStats"]) -> "EngineStats":
        """Several engines' counters (data-parallel replicas) as one: counts added,
        maxima the largest. A step of every replica counts once per replica."""
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: (max if name.startswith(("max_", "peak_")) else sum)(
            getattr(p, name) for p in parts) for name in fields})

    @property
    def mean_waste(self) -> float:
        """Block-tail waste of live requests, averaged over steps."""
        return self.waste_sum / self.num_steps if self.num_steps else 0.0

    def record_step(self, output, seconds: float, waste: float) -> None:
        """Count one step (a SchedulerOutput) that took `seconds`; `waste` is the KV
        block-tail waste after it."""
        self.num_steps += 1
        self.busy_seconds += seconds
        self.max_seqs_in_step = max(self.max_seqs_in_step, output.num_seqs)
        for chunk in output.scheduled:
            prompt_left = len(chunk.request.prompt_token_ids) - chunk.start_position
            self.num_prompt_tokens += max(0, min(chunk.num_new_tokens, prompt_left))
            self.num_generated_tokens += int(chunk.samples)
        self.max_waste = max(self.max_waste, waste)
        self.waste_sum += waste
