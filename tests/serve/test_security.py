"""API keys, the auth middleware and the rate limiter (lmforge.serve.security)."""

from __future__ import annotations

import hmac
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmforge.errors import LmforgeError
from lmforge.serve.protocol import APIError, install_error_handlers
from lmforge.serve.security import (
    ApiKeys,
    RateLimiter,
    install_security,
    is_protected,
    parse_bearer,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_app(keys: ApiKeys, rpm: float | None = None, public_metrics: bool = False, clock=None):
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.get("/metrics")
    def metrics():
        return "metrics"

    @app.get("/")
    def index():
        return "page"

    install_security(
        app,
        keys,
        requests_per_minute=rpm,
        public_metrics=public_metrics,
        clock=clock or FakeClock(),
    )
    return app


def assert_401(response):
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    return error


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,token",
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_parse_bearer(header, token):
    assert parse_bearer(header) == token


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(["first-key", "second-key", "a-much-longer-third-key"])
    for token, expected in [
        ("first-key", 0),
        ("second-key", 1),
        ("a-much-longer-third-key", 2),
        ("wrong", None),
        ("", None),
    ]:
        calls.clear()
        assert keys.match(token) == expected
        # no early exit: every key is compared, and over fixed-length digests (no length leak)
        assert len(calls) == 3
        assert all(a == b == 32 for a, b in calls)


def test_check_raises_401_with_a_reason():
    keys = ApiKeys(["k1"])
    assert keys.check("Bearer k1") == 0
    for header, words in [
        (None, "didn't provide"),
        ("Token k1", "Malformed"),
        ("Bearer k2", "Incorrect"),
    ]:
        with pytest.raises(APIError) as info:
            keys.check(header)
        assert info.value.status == 401 and words in info.value.message
        assert info.value.headers == {"WWW-Authenticate": "Bearer"}


def test_keys_from_the_command_line_and_the_environment():
    env = {"LMFORGE_API_KEY": " env-a, env-b ,,"}
    from_env = ApiKeys.from_sources(None, env)
    assert len(from_env) == 2 and from_env.match("env-a") == 0 and from_env.match("env-b") == 1
    # --api-key wins over the environment
    from_cli = ApiKeys.from_sources(["cli-1", "cli-2"], env)
    assert len(from_cli) == 2 and from_cli.match("env-a") is None and from_cli.match("cli-2") == 1
    assert not ApiKeys.from_sources(None, {}).enabled
    assert not ApiKeys.from_sources([], {"LMFORGE_API_KEY": ""}).enabled


def test_keys_from_os_environ(monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "secret")
    assert ApiKeys.from_sources().match("secret") == 0


@pytest.mark.parametrize("bad", ["", "has space", "tab\tkey", "ключ"])
def test_invalid_keys_are_refused(bad):
    with pytest.raises(LmforgeError, match="API key"):
        ApiKeys([bad])


# --- the middleware ------------------------------------------------------------------------------


def test_protected_paths():
    assert (
        is_protected("/v1/models") and is_protected("/v1/chat/completions") and is_protected("/v1")
    )
    assert is_protected("/metrics") and not is_protected("/metrics", public_metrics=True)
    assert not is_protected("/health") and not is_protected("/") and not is_protected("/v10/x")
    assert not is_protected("/static/app.js")


def test_v1_needs_the_key_health_stays_open():
    with TestClient(make_app(ApiKeys(["k1", "k2"]))) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        assert_401(client.get("/v1/models"))
        assert_401(client.get("/v1/models", headers={"Authorization": "Basic azE6"}))
        assert_401(client.get("/v1/models", headers={"Authorization": "Bearer k3"}))
        assert_401(client.get("/v1/models", headers={"Authorization": "Bearerk1"}))
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        # an unknown /v1 route answers 401 before 404: without a key nothing about the routes shows
        assert_401(client.get("/v1/secret-route"))
        assert (
            client.get("/v1/secret-route", headers={"Authorization": "Bearer k1"}).status_code
            == 404
        )


def test_metrics_behind_the_key_unless_public():
    with TestClient(make_app(ApiKeys(["k1"]))) as client:
        assert_401(client.get("/metrics"))
        assert client.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
    with TestClient(make_app(ApiKeys(["k1"]), public_metrics=True)) as client:
        assert client.get("/metrics").status_code == 200


def test_no_keys_means_open():
    with TestClient(make_app(ApiKeys())) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_rate_limit_per_key_with_retry_after():
    clock = FakeClock()
    with TestClient(make_app(ApiKeys(["k1", "k2"]), rpm=2, clock=clock)) as client:
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        assert client.get("/v1/models", headers=k1).status_code == 200
        assert client.get("/v1/models", headers=k1).status_code == 200
        response = client.get("/v1/models", headers=k1)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "30"  # 2/minute: one more every 30 s
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and set(error) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert (
            client.get("/v1/models", headers=k2).status_code == 200
        )  # another key, its own budget
        assert client.get("/health").status_code == 200  # not limited
        assert_401(
            client.get("/v1/models")
        )  # a bad key is refused before it can use anyone's budget
        clock.t += 30
        assert client.get("/v1/models", headers=k1).status_code == 200
        assert client.get("/v1/models", headers=k1).status_code == 429


def test_rate_limit_without_keys_is_per_client_address():
    clock = FakeClock()
    with TestClient(make_app(ApiKeys(), rpm=1, clock=clock)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models").status_code == 429


# --- the rate limiter ----------------------------------------------------------------------------


def test_token_bucket_with_a_fake_clock():
    clock = FakeClock()
    limiter = RateLimiter(60, clock)  # one a second, bursts of 60
    assert all(limiter.acquire("a") == 0 for _ in range(60))
    assert limiter.acquire("a") == pytest.approx(1.0)
    clock.t += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)  # refused requests are not counted
    clock.t += 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("b") == 0
    clock.t += 3600  # refills up to the burst, never beyond
    assert sum(limiter.acquire("a") == 0 for _ in range(100)) == 60


def test_check_rounds_retry_after_up():
    clock = FakeClock()
    limiter = RateLimiter(7, clock)  # one every 60/7 = 8.57 s
    for _ in range(7):
        limiter.check("k")
    with pytest.raises(APIError) as info:
        limiter.check("k")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "9"


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(500, FakeClock())  # a frozen clock: exactly 500 may pass
    allowed = []

    def worker():
        allowed.append(sum(limiter.acquire("shared") == 0 for _ in range(200)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500


def test_idle_buckets_are_pruned(monkeypatch):
    clock = FakeClock()
    limiter = RateLimiter(60, clock)
    monkeypatch.setattr(RateLimiter, "MAX_KEYS", 10)
    for i in range(10):
        limiter.acquire(f"k{i}")
    clock.t += 120  # all full again
    limiter.acquire("new")
    assert len(limiter._buckets) <= 1


def test_rate_limiter_validates_its_rate():
    with pytest.raises(LmforgeError, match="requests_per_minute"):
        RateLimiter(0)
