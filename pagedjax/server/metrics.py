"""Prometheus metrics of one server (its own registry: several servers never collide).

Counters and histograms are fed by the engine thread as steps run; the gauges (queues, KV
usage) are read when /metrics is scraped, from the state the engine thread last published
after a step or a command, so an engine that went idle after aborts shows 0, not the
last step's numbers.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LiveStats:
    """The engine's state as its thread last saw it (replaced whole, read from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    max_seqs_in_step: int = 0


_LIVE_GAUGES = (
    ("num_requests_running", "Requests in the running batch.", "num_running"),
    ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", "kv_usage"),
    ("max_num_seqs_in_step", "Most sequences batched in one step so far.", "max_seqs_in_step"),
)


class _LiveGauges:
    """A collector: the gauges, read from `read()` at scrape time."""

    def __init__(self, model_name: str, read: Callable[[], LiveStats]):
        self.model_name = model_name
        self.read = read

    def collect(self):
        """One gauge family per live statistic."""
        stats = self.read()
        for name, doc, attribute in _LIVE_GAUGES:
            family = GaugeMetricFamily(f"pagedjax:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], getattr(stats, attribute))
            yield family


class ServerMetrics:
    """vLLM-style counters, gauges and latency histograms, prefixed `pagedjax:`."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = {"model_name": model_name}

        def counter(name, doc):
            return Counter(f"pagedjax:{name}", doc, list(labels), registry=self.registry
                           ).labels(**labels)

        def histogram(name, doc):
            return Histogram(f"pagedjax:{name}", doc, list(labels), buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(**labels)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Requests preempted by recompute.")
        self.steps = counter("num_steps", "Engine steps run.")
        self.finished = counter("request_success", "Requests finished (stop or length).")
        self.aborted = counter("request_aborted", "Requests aborted (client gone).")
        self.failed = counter("request_failed", "Requests failed by an engine step error.")
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Arrival to first generated token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between consecutive tokens of a request.")
        self.e2e_latency = histogram("e2e_request_latency_seconds",
                                     "Arrival to finish of a request.")
        self._seen_preemptions = 0
        self._seen_cache = (0, 0)  # prefix cache (queries, hits) already counted
        self._prompt_total = 0
        self._output_total = 0
        self._recent = collections.deque(maxlen=64)  # (time, prompt tokens, output tokens)

    def observe_step(self, engine) -> None:
        """Record one engine step (called on the engine thread)."""
        stats = engine.stats
        queues = engine.queue_stats()
        self.prompt_tokens.inc(stats.num_prompt_tokens - self._prompt_total)
        self.generation_tokens.inc(stats.num_generated_tokens - self._output_total)
        self._prompt_total = stats.num_prompt_tokens
        self._output_total = stats.num_generated_tokens
        self.preemptions.inc(queues.num_preemptions - self._seen_preemptions)
        self._seen_preemptions = queues.num_preemptions
        self.steps.inc()
        kv = engine.kv_cache_stats()
        self.prefix_cache_queries.inc(kv.prefix_cache_queries - self._seen_cache[0])
        self.prefix_cache_hits.inc(kv.prefix_cache_hits - self._seen_cache[1])
        self._seen_cache = (kv.prefix_cache_queries, kv.prefix_cache_hits)
        self._recent.append((time.monotonic(), stats.num_prompt_tokens,
                             stats.num_generated_tokens))

    def watch(self, read: Callable[[], LiveStats]) -> None:
        """Serve the gauges from `read()` at every scrape (once per server)."""
        self.registry.register(_LiveGauges(self.model_name, read))

    def observe_finished(self, request, now: float) -> None:
        """Record a request that finished on its own (not aborted)."""
        if request.finish_reason != "abort":
            self.finished.inc()
            self.e2e_latency.observe(now - request.arrival_time)

    def recent_throughput(self) -> tuple[float, float]:
        """(prompt, generation) tokens/s over the last steps."""
        if len(self._recent) < 2:
            return 0.0, 0.0
        (t0, p0, g0), (t1, p1, g1) = self._recent[0], self._recent[-1]
        seconds = max(t1 - t0, 1e-9)
        return (p1 - p0) / seconds, (g1 - g0) / seconds

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
