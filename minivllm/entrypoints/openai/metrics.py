"""Prometheus metrics of one server (``GET /metrics``), and the periodic one-line stats log.

Everything lives in a registry owned by the ``ServerMetrics`` instance, never prometheus-client's
global one: two servers in one process (tests) keep separate counts. Request-level series are
counted here as requests finish; engine-level ones (running / waiting, KV use, prefix cache,
preemptions) are the engine core's own counters, read with ``AsyncLLM.stats()`` at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minivllm.outputs import RequestMetrics

PREFIX = "minivllm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                  0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector:
    """Exposes the last engine-core stats snapshot (gauges and the core's own counters)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        gauges = (("num_requests_running", "Requests in the engine core's running batch.", "num_running"),
                  ("num_requests_waiting", "Requests queued in the engine core.", "num_waiting"),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", "kv_cache_usage"))
        for name, doc, key in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], float(s.get(key, 0)))
            yield g
        counters = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
                    ("num_preemptions", "Requests preempted for lack of KV blocks.", "num_preemptions"))
        for name, doc, key in counters:
            c = CounterMetricFamily(PREFIX + name, doc)
            c.add_metric([], float(s.get(key, 0)))
            yield c


class ServerMetrics:
    """The metrics registry of one server, and what request handlers report into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished completions by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens.",
                             buckets=_ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.engine = _EngineCollector()
        r.register(self.engine)
        # Plain running totals for the stats log (prometheus-client keeps its values private).
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0

    def render(self, engine_stats: dict[str, Any] | None) -> bytes:
        """The exposition text; ``engine_stats`` None keeps the last snapshot (core busy or dead)."""
        if engine_stats is not None:
            self.engine.stats = dict(engine_stats)
        return generate_latest(self.registry)

    def observe_tokens(self, now_s: float, last_s: float | None, num_new_tokens: int) -> None:
        """A streamed step: one inter-token latency per step that brought tokens after the first."""
        if last_s is not None and num_new_tokens > 0:
            self.itl.observe(max(now_s - last_s, 0.0))

    def observe_finished(self, num_prompt_tokens: int, completion_lengths: list[int],
                         finish_reasons: list[str | None], timing: RequestMetrics | None,
                         streamed: bool, start_s: float) -> None:
        """Count a finished request: its prompt, each completion's length and finish reason.

        ``timing`` (the engine's timestamps) gives TTFT and end-to-end latency; ``start_s``
        (``time.time()`` at arrival) stands in when it is missing. A streamed request reported
        its inter-token latencies step by step; a non-streamed one only has first and last
        token times, so it reports their mean once per token gap.
        """
        now = time.time()
        num_generated = sum(completion_lengths)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generated)
        self.total_prompt_tokens += num_prompt_tokens
        self.total_generation_tokens += num_generated
        for reason in finish_reasons:
            self.request_success.labels(finished_reason=reason or "abort").inc()
        arrival = timing.arrival_time if timing is not None else start_s
        first = timing.first_token_time if timing is not None else None
        finished = timing.finished_time if timing is not None and timing.finished_time is not None else now
        if first is not None:
            self.ttft.observe(max(first - arrival, 0.0))
        self.e2e.observe(max(finished - arrival, 0.0))
        longest = max(completion_lengths, default=0)
        if not streamed and first is not None and longest > 1:
            mean = max(finished - first, 0.0) / (longest - 1)
            for _ in range(longest - 1):
                self.itl.observe(mean)


class StatsLogger:
    """vLLM-style periodic log line: throughput, running / waiting, KV use, prefix-cache hit rate.

    Silent while nothing happens, so an idle server does not fill its log.
    """

    def __init__(self, metrics: ServerMetrics, logger: logging.Logger) -> None:
        self.metrics = metrics
        self.logger = logger
        self._last = (time.monotonic(), 0.0, 0.0, 0.0, 0.0)

    def log(self, engine_stats: dict[str, Any]) -> None:
        m = self.metrics
        now = time.monotonic()
        prompt, gen = m.total_prompt_tokens, m.total_generation_tokens
        queries, hits = float(engine_stats.get("prefix_cache_queries", 0)), float(engine_stats.get("prefix_cache_hits", 0))
        t0, p0, g0, q0, h0 = self._last
        self._last = (now, prompt, gen, queries, hits)
        running, waiting = engine_stats.get("num_running", 0), engine_stats.get("num_waiting", 0)
        if prompt == p0 and gen == g0 and not running and not waiting:
            return
        dt = max(now - t0, 1e-6)
        hit_rate = (hits - h0) / (queries - q0) if queries > q0 else 0.0
        self.logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            (prompt - p0) / dt, (gen - g0) / dt, running, waiting,
            100 * float(engine_stats.get("kv_cache_usage", 0)), 100 * hit_rate)
