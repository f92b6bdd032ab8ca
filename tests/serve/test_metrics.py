"""Prometheus metrics (lmforge.serve.metrics)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.testclient import TestClient

from lmforge.serve.metrics import MetricsMiddleware, ServerMetrics
from lmforge.serve.protocol import install_error_handlers
from lmforge.serve.security import ApiKeys, SecurityMiddleware

NAMES = [
    "lmforge_requests_total",
    "lmforge_request_duration_seconds",
    "lmforge_queue_depth",
    "lmforge_running_sequences",
    "lmforge_time_to_first_token_seconds",
    "lmforge_inter_token_latency_seconds",
    "lmforge_generation_tokens_total",
    "lmforge_prompt_tokens_total",
]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_render_has_every_metric():
    body, content_type = ServerMetrics().render()
    text = body.decode()
    assert content_type.startswith("text/plain") and "version=" in content_type
    for name in NAMES:
        assert name in text, name
    assert "# TYPE lmforge_time_to_first_token_seconds histogram" in text


def test_two_servers_in_one_process_do_not_clash():
    a, b = ServerMetrics(), ServerMetrics()  # a shared (global) registry would raise here
    a.add_generated_tokens(5)
    assert a.registry.get_sample_value("lmforge_generation_tokens_total") == 5
    assert b.registry.get_sample_value("lmforge_generation_tokens_total") == 0


def test_gauges_read_the_engine_at_each_scrape():
    state = {"queue": 3, "running": 2}
    m = ServerMetrics(lambda: state["queue"], lambda: state["running"])
    assert m.registry.get_sample_value("lmforge_queue_depth") == 3
    state["running"] = 7
    assert "lmforge_running_sequences 7.0" in m.render()[0].decode()
    m.bind_engine(lambda: 11, None)
    assert m.registry.get_sample_value("lmforge_queue_depth") == 11
    assert m.registry.get_sample_value("lmforge_running_sequences") == 0


def test_token_timer_observes_ttft_and_inter_token_latency():
    m, clock = ServerMetrics(), FakeClock()
    timer = m.token_timer(clock=clock)  # the request arrives at t=0
    clock.t = 0.3
    timer.token()  # first token after 0.3 s
    clock.t = 0.35
    timer.token()
    clock.t = 0.55
    timer.token(n=2)  # a chunk of two after 0.2 s: 0.1 s a token
    timer.token(n=0)
    get = m.registry.get_sample_value
    assert get("lmforge_time_to_first_token_seconds_count") == 1
    assert abs(get("lmforge_time_to_first_token_seconds_sum") - 0.3) < 1e-9
    assert get("lmforge_inter_token_latency_seconds_count") == 2
    assert abs(get("lmforge_inter_token_latency_seconds_sum") - 0.15) < 1e-9
    assert get("lmforge_time_to_first_token_seconds_bucket", {"le": "0.25"}) == 0
    assert get("lmforge_time_to_first_token_seconds_bucket", {"le": "0.5"}) == 1
    assert get("lmforge_generation_tokens_total") == 4 and timer.count == 4
    m.add_prompt_tokens(12)
    assert get("lmforge_prompt_tokens_total") == 12


def make_app(metrics: ServerMetrics) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.get("/v1/items/{item}")
    def item(item: int):
        return {"item": item}

    @app.get("/boom")
    def boom():
        raise RuntimeError("bug")

    @app.get("/metrics")
    def scrape():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(SecurityMiddleware, keys=ApiKeys(["k"]), public_metrics=True)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost
    return app


def test_middleware_counts_requests_by_route_template_and_status():
    m = ServerMetrics()
    auth = {"Authorization": "Bearer k"}
    with TestClient(make_app(m), raise_server_exceptions=False) as client:
        client.get("/v1/models", headers=auth)
        client.get("/v1/models", headers=auth)
        client.get("/v1/models")  # 401 from the security middleware, before any routing
        client.get("/v1/items/1", headers=auth)
        client.get("/v1/items/2", headers=auth)
        client.get("/v1/items/x", headers=auth)  # 422
        for i in range(5):
            client.get(f"/scanner/{i}")  # unknown paths share one label
        client.get("/boom")
        text = client.get("/metrics").text

    def count(route, status, method="GET"):
        return m.registry.get_sample_value(
            "lmforge_requests_total", {"route": route, "method": method, "status": str(status)}
        )

    assert count("/v1/models", 200) == 2
    assert count("/v1/models", 401) == 1
    assert count("/v1/items/{item}", 200) == 2
    assert count("/v1/items/{item}", 422) == 1
    assert count("other", 404) == 5
    assert count("/boom", 500) == 1
    assert 'lmforge_requests_total{method="GET",route="/v1/models",status="200"} 2.0' in text
    assert (
        m.registry.get_sample_value(
            "lmforge_request_duration_seconds_count", {"route": "/v1/models"}
        )
        == 3
    )
