"""The server's Prometheus metrics (prometheus_client), one registry per app, served at /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few decode steps to a long generation under load.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Request counts are labelled by these paths only (anything else is "other"), so that a scan of random paths
# cannot grow the label set.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """Requests by endpoint and status, prompt and completion tokens, queue depth, running rows, and
    histograms of time to first token and of latency (per choice: one row of the batch)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("leangpt_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("leangpt_prompt_tokens", "prompt tokens of the choices served", registry=r)
        self.completion_tokens = Counter("leangpt_completion_tokens", "tokens generated for the choices served",
                                         registry=r)
        self.queue_depth = Gauge("leangpt_queue_depth", "choices waiting for a row of the running batch",
                                 registry=r)
        self.running_rows = Gauge("leangpt_running_rows", "rows in the running batch (prefilling or decoding)",
                                  registry=r)
        self.ttft = Histogram("leangpt_time_to_first_token_seconds", "from a request's arrival to the first "
                              "token of a choice", buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("leangpt_request_latency_seconds", "from a request's arrival to the end of a "
                                 "choice", buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, queue_depth: Callable[[], float], running_rows: Callable[[], float]) -> None:
        """Read the two gauges from these functions at each scrape."""
        self.queue_depth.set_function(queue_depth)
        self.running_rows.set_function(running_rows)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
