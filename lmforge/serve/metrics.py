"""Prometheus metrics for the server, in a private registry (several apps in one process don't clash).

`ServerMetrics` holds them; `render()` gives the text exposition for `GET /metrics`;
`MetricsMiddleware` counts every request by route template and status; `TokenTimer` turns the
arrival of each generated token into time-to-first-token and inter-token latency observations.

| metric | type | labels |
| --- | --- | --- |
| `lmforge_requests_total` | counter | route, method, status |
| `lmforge_request_duration_seconds` | histogram | route |
| `lmforge_queue_depth` | gauge (read from the engine) | |
| `lmforge_running_sequences` | gauge (read from the engine) | |
| `lmforge_time_to_first_token_seconds` | histogram | |
| `lmforge_inter_token_latency_seconds` | histogram | |
| `lmforge_generation_tokens_total` | counter | |
| `lmforge_prompt_tokens_total` | counter | |
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match

# seconds: from a few ms (a small model on a GPU) to a minute (a long queue on a CPU)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNMATCHED_ROUTE = "other"  # unknown paths share one label, so scanners cannot grow the series


class ServerMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], float] | None = None,
        running_sequences: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmforge_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lmforge_request_duration_seconds",
            "Time from request to the end of the response",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lmforge_queue_depth", "Requests waiting for a slot in the batch", registry=r
        )
        self.running_sequences = Gauge(
            "lmforge_running_sequences", "Sequences being generated now", registry=r
        )
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "lmforge_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Counter(
            "lmforge_generation_tokens", "Tokens generated", registry=r
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.bind_engine(queue_depth, running_sequences)

    def bind_engine(
        self,
        queue_depth: Callable[[], float] | None,
        running_sequences: Callable[[], float] | None,
    ) -> None:
        """Read the gauges from these callables at each scrape (e.g. the engine's counters)."""
        self.queue_depth.set_function(queue_depth or (lambda: 0))
        self.running_sequences.set_function(running_sequences or (lambda: 0))

    def count_request(
        self, route: str, method: str, status: int, seconds: float | None = None
    ) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        if seconds is not None:
            self.request_duration.labels(route=route).observe(seconds)

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def add_generated_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def token_timer(
        self, start: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> TokenTimer:
        """A `TokenTimer` for one sequence; `start` is the request's arrival (default: now)."""
        return TokenTimer(self, clock() if start is None else start, clock)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenTimer:
    """Observes one sequence's token timings: call `token()` as each token (or chunk) arrives."""

    def __init__(self, metrics: ServerMetrics, start: float, clock: Callable[[], float]) -> None:
        self.metrics, self.clock = metrics, clock
        self.start, self.last = start, None
        self.count = 0

    def token(self, n: int = 1) -> None:
        """`n` tokens arrived now: the first observes TTFT, later ones the inter-token latency."""
        if n <= 0:
            return
        now = self.clock()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            # a chunk of n tokens after a gap: n - 1 of them arrived together, one after the gap
            self.metrics.inter_token.observe((now - self.last) / n)
        self.last = now
        self.count += n
        self.metrics.add_generated_tokens(n)


def _route_label(scope) -> str:
    route = scope.get("route")  # set by FastAPI's router on the scope it was given
    if route is not None and getattr(route, "path", None):
        return route.path
    app = scope.get("app")  # the outer Starlette app; requests stopped before routing land here
    for candidate in getattr(app, "routes", ()):
        try:
            match, _ = candidate.matches(scope)
        except Exception:  # a route that cannot judge this scope is not it
            continue
        if match != Match.NONE and getattr(candidate, "path", None) is not None:
            return candidate.path or "/"
    return UNMATCHED_ROUTE


class MetricsMiddleware:
    """ASGI middleware: counts each HTTP request by route template, method and status.

    Put it outermost, so that requests answered by other middlewares (401, 413, 429) count too.
    A request that raises before responding counts as 500.
    """

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.count_request(
                _route_label(scope), scope.get("method", ""), status, time.perf_counter() - start
            )


__all__ = ["MetricsMiddleware", "ServerMetrics", "TokenTimer"]
