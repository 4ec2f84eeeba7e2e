"""Prometheus metrics of one server (its own registry: several servers never collide)."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """vLLM-style counters, gauges and latency histograms, prefixed `pagedjax:`."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(f"pagedjax:{name}", doc, list(labels), registry=self.registry
                         ).labels(**labels)

        def counter(name, doc):
            return Counter(f"pagedjax:{name}", doc, list(labels), registry=self.registry
                           ).labels(**labels)

        def histogram(name, doc):
            return Histogram(f"pagedjax:{name}", doc, list(labels), buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(**labels)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.max_seqs_in_step = gauge("max_num_seqs_in_step",
                                      "Most sequences batched in one step so far.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Requests preempted by recompute.")
        self.steps = counter("num_steps", "Engine steps run.")
        self.finished = counter("request_success", "Requests finished (stop or length).")
        self.aborted = counter("request_aborted", "Requests aborted (client gone).")
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Arrival to first generated token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between consecutive tokens of a request.")
        self.e2e_latency = histogram("e2e_request_latency_seconds",
                                     "Arrival to finish of a request.")
        self._seen_preemptions = 0
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
        self.running.set(queues.num_running)
        self.waiting.set(queues.num_waiting)
        self.kv_usage.set(engine.kv_cache_stats().usage)
        self.max_seqs_in_step.set(stats.max_seqs_in_step)
        self._recent.append((time.monotonic(), stats.num_prompt_tokens,
                             stats.num_generated_tokens))

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
