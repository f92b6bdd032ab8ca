"""API keys (constant-time bearer check) and per-key rate limiting, as one ASGI middleware.

- Keys come from `--api-key` (repeatable) or, when none is given there, the `LMFORGE_API_KEY`
  environment variable (several keys comma-separated). No keys: the server is open (it binds
  127.0.0.1 by default).
- Every `/v1/*` route (and `/metrics`, unless it is public) needs `Authorization: Bearer <key>`.
  The presented key is compared with *every* configured key through `hmac.compare_digest` on
  SHA-256 digests, with no early exit, so neither which key matched nor a key's length shows in
  the response time. A missing, malformed or wrong header answers 401 with `WWW-Authenticate`.
- `RateLimiter` is a token bucket per key (per client address when there are no keys): bursts up
  to `requests_per_minute`, refilled at that rate; over it answers 429 with `Retry-After`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from lmforge.errors import LmforgeError
from lmforge.serve.protocol import APIError, send_error

ENV_VAR = "LMFORGE_API_KEY"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class ApiKeys:
    """The accepted API keys; `match` checks a presented one in constant time."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        keys = list(keys)
        for k in keys:
            if not (isinstance(k, str) and k and k.isascii() and k.isprintable() and " " not in k):
                raise LmforgeError(
                    "an API key must be a non-empty string of printable ASCII without spaces"
                )
        # only digests are kept: equal length, so compare_digest's time does not depend on the key
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def from_sources(
        cls, cli_keys: Iterable[str] | None = None, env: Mapping[str, str] | None = None
    ) -> ApiKeys:
        """Keys from `--api-key` (repeatable), else from LMFORGE_API_KEY (comma-separated)."""
        cli_keys = [k.strip() for k in (cli_keys or [])]
        if cli_keys:
            return cls(cli_keys)
        env = os.environ if env is None else env
        raw = env.get(ENV_VAR, "")
        return cls(k.strip() for k in raw.split(",") if k.strip())

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, token: str | None) -> int | None:
        """The index of the key equal to `token`, or None. Compares against every key."""
        if token is None:
            return None
        presented = _digest(token)
        found = -1
        for i, d in enumerate(self._digests):
            equal = hmac.compare_digest(presented, d)  # every key, no early exit
            found = i if equal else found
        return None if found < 0 else found

    def check(self, authorization: str | None) -> int:
        """The matching key's index for an `Authorization` header; `APIError(401)` otherwise."""
        token = parse_bearer(authorization)
        index = self.match(token)
        if index is None:
            if not authorization:
                message = (
                    "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
                )
            elif token is None:
                message = "Malformed Authorization header: expected 'Bearer YOUR_KEY'."
            else:
                message = "Incorrect API key provided."
            raise APIError(
                401,
                message,
                param=None,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return index


class RateLimiter:
    """A token bucket per key: up to `requests_per_minute` at once, refilled at that rate.

    Thread-safe; `clock` (seconds, monotonic) is injectable for tests.
    """

    MAX_KEYS = 10_000  # idle (full) buckets are dropped past this many keys

    def __init__(
        self, requests_per_minute: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not requests_per_minute > 0:
            raise LmforgeError(f"requests_per_minute must be > 0, got {requests_per_minute}")
        self.capacity = float(requests_per_minute)
        self.rate = self.capacity / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 if `key` may make a request now (and counts it), else the seconds until it may."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > self.MAX_KEYS:
                self._prune(now)
            return wait

    def _prune(self, now: float) -> None:
        for k, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.capacity:
                del self._buckets[k]

    def check(self, key: str) -> None:
        """`APIError(429)` with `Retry-After` (whole seconds, rounded up) when `key` is over its rate."""
        wait = self.acquire(key)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise APIError(
                429,
                f"Rate limit reached: {self.capacity:g} requests per minute. Try again in {seconds} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(seconds)},
            )


def is_protected(path: str, public_metrics: bool = False) -> bool:
    """Whether `path` needs the API key: /v1 and below, and /metrics unless public."""
    if path == "/v1" or path.startswith("/v1/"):
        return True
    return path.rstrip("/") == "/metrics" and not public_metrics


class SecurityMiddleware:
    """ASGI middleware: API key on protected paths (401), then the rate limit (429).

    The rate limit applies to /v1/* only, per matched key, or per client address with no keys.
    Other paths (/, /health, static files) pass through untouched.
    """

    def __init__(
        self,
        app,
        keys: ApiKeys,
        rate_limiter: RateLimiter | None = None,
        public_metrics: bool = False,
    ) -> None:
        self.app, self.keys, self.rate_limiter, self.public_metrics = (
            app,
            keys,
            rate_limiter,
            public_metrics,
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_protected(scope.get("path", ""), self.public_metrics):
            await self.app(scope, receive, send)
            return
        try:
            bucket = self._authorize(scope)
            path = scope.get("path", "")
            if self.rate_limiter is not None and (path == "/v1" or path.startswith("/v1/")):
                self.rate_limiter.check(bucket)
        except APIError as err:
            await send_error(send, err)
            return
        await self.app(scope, receive, send)

    def _authorize(self, scope) -> str:
        """The rate-limit bucket of an authorized request; `APIError(401)` otherwise."""
        if not self.keys.enabled:
            client = scope.get("client")
            return f"addr:{client[0] if client else 'unknown'}"
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        return f"key:{self.keys.check(authorization)}"


def install_security(
    app,
    keys: ApiKeys,
    requests_per_minute: float | None = None,
    public_metrics: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> RateLimiter | None:
    """Add `SecurityMiddleware` to a FastAPI/Starlette `app`; returns its rate limiter, if any."""
    limiter = RateLimiter(requests_per_minute, clock) if requests_per_minute else None
    app.add_middleware(
        SecurityMiddleware, keys=keys, rate_limiter=limiter, public_metrics=public_metrics
    )
    return limiter


__all__ = [
    "ENV_VAR",
    "ApiKeys",
    "RateLimiter",
    "SecurityMiddleware",
    "install_security",
    "is_protected",
    "parse_bearer",
]
