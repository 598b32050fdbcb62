"""Prometheus metrics of one server: requests by outcome, engine gauges, latencies, tokens.

Engine figures are read from ``AsyncLLM.stats()`` when ``/metrics`` is scraped, so they cost
the engine nothing between scrapes. Each server has a registry of its own, so that several
apps in one process (tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neuron_llm.engine.llm_engine import LATENCIES, EngineStats

_TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS_S = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
_LATENCY_HISTOGRAMS = {
    "time_to_first_token": ("Arrival to first token.", _TTFT_BUCKETS_S),
    "inter_token_latency": ("Time between two tokens of a request.", _ITL_BUCKETS_S),
    "request_queue_time": ("Arrival to first scheduled.", _REQUEST_BUCKETS_S),
    "e2e_request_latency": ("Arrival to finished.", _REQUEST_BUCKETS_S),
}
"""Help text and buckets of each of the engine's ``LATENCIES``."""
assert set(_LATENCY_HISTOGRAMS) == set(LATENCIES), "a latency the engine samples has no histogram"

OUTCOMES = ("success", "aborted", "invalid", "rejected", "error")
"""Ends of a request: served; client went away; bad request (4xx); queue full or unavailable
(429, 503); server failure (5xx)."""


@dataclass
class _RequestRecord:
    outcome: str | None = None


_current_request: ContextVar[_RequestRecord | None] = ContextVar("neuron_llm_request", default=None)


class ServerMetrics:
    """The server's metrics, rendered in Prometheus' text format by ``render``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(
            "neuron_llm_requests", "Requests to the POST routes, by outcome.", ["outcome"], registry=registry
        )
        for outcome in OUTCOMES:
            self._requests.labels(outcome)  # exported at 0 before the first request
        self._waiting = Gauge("neuron_llm_num_requests_waiting", "Requests queued for a slot.", registry=registry)
        self._running = Gauge("neuron_llm_num_requests_running", "Requests in the running batch.", registry=registry)
        self._kv_usage = Gauge("neuron_llm_kv_cache_usage_ratio", "Fraction of KV blocks in use.", registry=registry)
        self._prefix_hit_rate = Gauge(
            "neuron_llm_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache, over those looked up.",
            registry=registry,
        )
        self._preemptions = Counter("neuron_llm_preemptions", "Requests preempted for KV blocks.", registry=registry)
        # One histogram per latency the engine samples, named after it.
        self._latencies = {
            name: Histogram(f"neuron_llm_{name}_seconds", help_text, buckets=buckets, registry=registry)
            for name, (help_text, buckets) in _LATENCY_HISTOGRAMS.items()
        }
        self._compiled_graphs = Gauge(
            "neuron_llm_compiled_graphs",
            "Graphs the backend has compiled; growth while serving means a shape outside the buckets.",
            registry=registry,
        )
        self._prompt_tokens = Counter("neuron_llm_prompt_tokens", "Prompt tokens prefilled.", registry=registry)
        self._generation_tokens = Counter("neuron_llm_generation_tokens", "Tokens generated.", registry=registry)
        self._draft_tokens = Counter(
            "neuron_llm_spec_decode_draft_tokens", "Proposed tokens verified (speculative decoding).", registry=registry
        )
        self._accepted_tokens = Counter(
            "neuron_llm_spec_decode_accepted_tokens", "Proposed tokens kept (speculative decoding).", registry=registry
        )
        self._last_totals = (0, 0, 0, 0, 0)

    def count_request(self, outcome: str, overrides: bool = False) -> None:
        """Count the request being served as ending with ``outcome`` (one of ``OUTCOMES``).

        Within ``counting_request`` the count waits for the request's end, when its first
        outcome is counted, or a later one that ``overrides`` it (an error found after the
        generation ended): each request is counted once. Elsewhere it counts at once.
        """
        record = _current_request.get()
        if record is None:
            self._requests.labels(outcome).inc()
        elif record.outcome is None or overrides:
            record.outcome = outcome

    @contextmanager
    def counting_request(self, counted: bool = True) -> Iterator[None]:
        """Serve one request within: its outcome is counted once, on leaving; unless ``counted``,
        only an error (a bug, not a refusal) is."""
        record = _RequestRecord()
        token = _current_request.set(record)
        try:
            yield
        finally:
            _current_request.reset(token)
            if record.outcome is not None and (counted or record.outcome == "error"):
                self._requests.labels(record.outcome).inc()

    def count_refusal(self, status_code: int) -> None:
        """Count one request answered with the error ``status_code``."""
        if status_code in (429, 503):
            self.count_request("rejected")
        elif status_code < 500:
            self.count_request("invalid")
        else:
            self.count_request("error")

    def update(self, stats: EngineStats) -> None:
        """Take in the engine's figures (latencies since the previous call, totals so far)."""
        scheduler = stats.scheduler
        self._waiting.set(scheduler.num_waiting)
        self._running.set(scheduler.num_running)
        self._kv_usage.set(scheduler.kv_cache_usage)
        self._prefix_hit_rate.set(scheduler.prefix_cache_hit_rate)
        self._compiled_graphs.set(stats.num_compiled_graphs)
        for name, histogram in self._latencies.items():
            for seconds in getattr(stats, name):
                histogram.observe(seconds)
        # The engine keeps running totals; Prometheus counters only go up by increments.
        totals = (
            scheduler.num_preemptions,
            stats.num_prompt_tokens,
            stats.num_generation_tokens,
            stats.num_draft_tokens,
            stats.num_accepted_tokens,
        )
        counters = (
            self._preemptions,
            self._prompt_tokens,
            self._generation_tokens,
            self._draft_tokens,
            self._accepted_tokens,
        )
        for counter, total, last in zip(counters, totals, self._last_totals):
            counter.inc(max(total - last, 0))
        self._last_totals = totals

    def render(self) -> bytes:
        """All metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)
