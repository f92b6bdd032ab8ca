"""The real app with its guards on: API keys, rate limit, limits, metrics, the chat page, and a
64-client streaming load whose every stream equals its offline result."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from lmforge.serve.app import create_app
from lmforge.serve.protocol import ServerLimits
from lmforge.serve.security import ApiKeys
from tests.serve.test_app import MODEL, ckpt, offline, serving  # noqa: F401  (ckpt is a fixture)

openai = pytest.importorskip("openai")
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def guarded(ckpt):  # noqa: F811
    app = create_app(ckpt, model_name=MODEL, max_batch_size=8, max_queue=128,
                     limits=ServerLimits(max_n=2, max_tokens=20, max_body_bytes=4096),
                     api_keys=ApiKeys([KEY, "sk-other"]), requests_per_minute=None)
    with serving(app) as url:
        yield url


def test_keys_guard_v1_and_metrics_but_not_health_or_the_page(guarded):
    assert httpx.get(f"{guarded}/health").status_code == 200
    page = httpx.get(f"{guarded}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(f"{guarded}/static/app.js").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}):
        r = httpx.get(f"{guarded}/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{guarded}/metrics", headers=headers).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{guarded}/v1/models", headers=ok).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="nope", max_retries=0).models.list()


def test_limits_and_metrics(guarded):
    ok = {"Authorization": f"Bearer {KEY}"}
    post = lambda body: httpx.post(f"{guarded}/v1/completions", json={"model": MODEL, **body}, headers=ok)  # noqa: E731
    assert post({"prompt": "the", "n": 3}).status_code == 400  # over max_n
    assert post({"prompt": "the", "max_tokens": 21}).status_code == 400  # over the max_tokens cap
    assert post({"prompt": ""}).status_code == 400  # empty prompt
    assert post({"prompt": "x" * 5000}).status_code == 413  # body over 4096 bytes
    r = httpx.post(f"{guarded}/v1/completions", content=b"{not json", headers={**ok, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert post({"prompt": "the", "max_tokens": 5, "temperature": 0}).status_code == 200
    text = httpx.get(f"{guarded}/metrics", headers=ok).text
    for name in ("lmforge_requests_total", "lmforge_queue_depth", "lmforge_running_sequences",
                 "lmforge_time_to_first_token_seconds", "lmforge_inter_token_latency_seconds",
                 "lmforge_generation_tokens_total"):
        assert name in text, name
    assert 'status="413"' in text and 'status="200"' in text


def test_rate_limit_per_key(ckpt):  # noqa: F811
    app = create_app(ckpt, model_name=MODEL, api_keys=ApiKeys([KEY]), requests_per_minute=2)
    with serving(app) as url:
        codes = [httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code
                 for _ in range(3)]
        assert codes[:2] == [200, 200] and codes[2] == 429
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_64_concurrent_streams_all_complete_and_equal_offline(guarded, ckpt):  # noqa: F811
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0, timeout=120)
    prompts = [f"{w} {i}" for i, w in enumerate(["the", "a quick", "pack my", "how", "model"] * 13)][:64]

    def stream(i: int) -> tuple[str, str]:
        chunks = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0.9,
                                           seed=i, stream=True)
        text, finish = "", None
        for chunk in chunks:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64), timeout=180))
    for i, (text, finish) in enumerate(results):
        [expected] = offline(ckpt, prompts[i], max_new_tokens=12, temperature=0.9, seed=i)
        assert text == expected.text, i
        assert finish in ("stop", "length")


def test_fuzzed_requests_never_crash_or_wedge_the_real_server(ckpt):  # noqa: F811
    """Hypothesis bodies (tests.serve.test_protocol's strategy) against the real app and engine:
    every answer is a success or an OpenAI-shaped 4xx, and afterwards nothing is left running."""
    import json

    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.serve.test_protocol import bodies, json_values

    app = create_app(ckpt, model_name="tiny", max_batch_size=4, limits=ServerLimits(max_tokens=8))

    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=80, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(body=bodies | json_values, chat_route=st.booleans())
        def fuzz(body, chat_route):
            route = "/v1/chat/completions" if chat_route else "/v1/completions"
            r = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code in (200, 400, 404, 413, 422), r.text
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        fuzz()
        engine = app.state.engine
        assert engine.running == 0 and engine.queue_depth == 0
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_openapi_schema_describes_what_the_server_accepts(guarded):
    schema = httpx.get(f"{guarded}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health"):
        assert path in schema["paths"], path
    components = schema["components"]["schemas"]
    completion = components["CompletionRequest"]
    assert completion["additionalProperties"] is False  # unknown fields are refused, as served
    assert {"model", "prompt", "max_tokens", "temperature", "n", "stream", "logprobs", "echo",
            "top_k", "min_p", "repetition_penalty"} <= set(completion["properties"])
    temperature = completion["properties"]["temperature"]
    assert temperature.get("maximum") == 2 and temperature.get("minimum") == 0
    # an unknown field named in the schema's terms is refused with 422, as the schema says
    r = httpx.post(f"{guarded}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "x", "logit_bias": {}})
    assert r.status_code == 422
