"""``GET /metrics``: the server's counters in Prometheus' text format (``sambay serve --metrics``).

Names follow llama-server's ``llamacpp:*`` metrics where one maps (``llamacpp:prompt_tokens_total``
is ``sambay_prompt_tokens_total`` here), with an underscore after the prefix: Prometheus keeps
colons for recording rules. What is counted:

* per HTTP request (a middleware, so refusals such as 401, 413 and 503 count too):
  ``sambay_requests_total{endpoint, status}`` and the latency histogram
  ``sambay_request_duration_seconds{endpoint}``, from arrival to the response's last byte (a
  stream's whole length);
* per finished generation (the pool's totals): prompt tokens evaluated and reused, prompt and
  generation seconds, generated tokens, and from them the average tokens/s;
* the slots and the queue at the time of the scrape.

prometheus-client (in the ``server`` extra) writes the exposition: escaping, histogram series
and OpenMetrics negotiation are its business, not ours.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

from ..errors import MissingDependencyError
from .pool import SlotPool

PREFIX = "sambay_"
# request latency buckets (seconds): a tokenize call to a long reasoning stream
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as err:
        raise MissingDependencyError("--metrics needs prometheus-client: pip install \"sambay[server]\"") from err
    return prometheus_client


def require_prometheus() -> None:
    """Raises :class:`MissingDependencyError` naming the install command when
    prometheus-client cannot be imported."""
    _prometheus()


class _PoolCollector:
    """Reads the pool's totals and counts at scrape time (on the event loop, like the pool)."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pool, t = self.pool, self.pool.totals
        counters = (
            ("prompt_tokens", "Prompt tokens evaluated, excluding those reused from a slot's cache",
             t.prompt_evaluated),
            ("prompt_tokens_cached", "Prompt tokens reused from a slot's cache", t.prompt_tokens - t.prompt_evaluated),
            ("prompt_seconds", "Time spent evaluating prompts", t.prompt_seconds),
            ("tokens_predicted", "Generated tokens", t.generated_tokens),
            ("tokens_predicted_seconds", "Time spent generating tokens", t.generate_seconds),
            ("requests_rejected", "Requests refused because the queue was full", pool.n_rejected),
            ("requests_cancelled", "Requests whose client left before the end", pool.n_cancelled),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        gauges = (
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             t.prompt_evaluated / t.prompt_seconds if t.prompt_seconds > 0 else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             t.generated_tokens / t.generate_seconds if t.generate_seconds > 0 else 0.0),
            ("requests_processing", "Requests generating (busy slots)", pool.n_busy),
            ("requests_deferred", "Requests waiting in the queue for a slot", pool.n_waiting),
            ("slots_idle", "Idle slots", pool.n_slots - pool.n_busy),
            ("slots_total", "Slots (sequences decoded together)", pool.n_slots),
            ("queue_limit", "Requests that may wait for a slot before the server answers 503", pool.max_queue),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)


class ServerMetrics:
    """The registry of one app: request counters, the latency histogram and the pool's figures.

    Raises:
        MissingDependencyError: prometheus-client is not installed.
    """

    def __init__(self, pool: SlotPool) -> None:
        prom = _prometheus()
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.latency = prom.Histogram(PREFIX + "request_duration_seconds",
                                      "Time from a request's arrival to the last byte of its response",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_PoolCollector(pool))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def exposition(self, accept: Optional[str]) -> tuple[bytes, str]:
        """The body and its content type (OpenMetrics when the scraper asks for it)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (the app's route path, ``other`` for unknown
    paths, so a scan of random URLs cannot grow the label set) and status, and times it until
    its response's last body message (or until the client left)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._paths: Optional[frozenset[str]] = None

    def _endpoint(self, scope: Any) -> str:
        if self._paths is None:
            routes = getattr(scope.get("app"), "routes", ())
            self._paths = frozenset(p for p in (getattr(r, "path", None) for r in routes) if p)
        path = scope.get("path", "")
        return path if path in self._paths else "other"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: Optional[int] = None
        done = False

        def record(code: int) -> None:
            nonlocal done
            if not done:
                done = True
                self.metrics.observe(self._endpoint(scope), code, time.perf_counter() - t0)

        async def counting_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record(status or 500)

        try:
            await self.app(scope, receive, counting_send)
        finally:  # an exception, or a client that left mid-stream
            record(status or 500)
