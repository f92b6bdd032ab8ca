"""The OpenAI-compatible request schema, its limits, and errors in OpenAI's shape.

Requests are pydantic v2 models with OpenAI's field names (plus vLLM's `top_k`, `min_p`,
`repetition_penalty`). Choices made here:

- Unknown fields are rejected (422, `param` names the field, message "Unrecognized request
  argument supplied: ..."), as OpenAI itself does: a silently ignored `logit_bias` or `tools`
  would return something other than what the caller asked for.
- One prompt per completion request: `prompt` is a string, or a list of token ids (ints >= 0).
  A list of one string is taken as that string; batches (several strings, lists of id lists) are
  rejected with a message saying to send one request per prompt.
- Chat message `content` is a string or a list of `{"type": "text", "text": ...}` parts (joined);
  roles are system, developer (treated as system), user and assistant.
- `temperature=0` means greedy decoding; `top_p=1`, `top_k=-1`, `min_p=0` mean "off".

Checks that need the tokenized prompt or the server's configuration (`ServerLimits`, the model's
context) live in `check_request`, which raises `APIError`; `install_error_handlers` turns those,
pydantic's validation errors, malformed JSON and unknown routes into
`{"error": {"message", "type", "param", "code"}}` bodies. `BodySizeLimit` is an ASGI middleware
answering 413 to bodies over the cap, counting the bytes as they arrive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from lmforge.config import check

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP = 4  # OpenAI accepts at most 4 stop sequences
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# --- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with HTTP status `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def __repr__(self) -> str:
        return (
            f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"
        )


def error_body(err: APIError) -> dict:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


# --- request models -----------------------------------------------------------------------------


class _Strict(BaseModel):
    # forbid: unknown fields are errors (see the module docstring); `model_` fields are ours
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # vLLM's extras
    top_k: int = -1  # -1: off
    min_p: float = Field(0.0, ge=0, lt=1)  # 0: off
    repetition_penalty: float = Field(1.0, gt=0, le=100)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop accepts at most {MAX_STOP} sequences, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {v}")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # a field validator (not a model one) so that the error names the field
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            if len(v) == 1 and isinstance(v[0], str):
                return v[0]  # ["text"]: one prompt written as a batch of one
            if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                if any(not 0 <= t <= INT64_MAX for t in v):
                    raise ValueError("token ids must be integers in [0, 2**63)")
                return v
            if all(isinstance(p, str | list) for p in v):
                raise ValueError(
                    f"batched prompts ({len(v)} of them) are not supported: send one request per prompt"
                )
        raise ValueError("prompt must be a string or a list of token ids (integers)")

    @property
    def max_tokens_requested(self) -> int | None:
        return self.max_tokens


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):  # content parts: only text is understood
            texts = []
            for part in v:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        'content parts must be {"type": "text", "text": "..."}; only text is supported'
                    )
                texts.append(part["text"])
            return "".join(texts)
        if not isinstance(v, str):
            raise ValueError("content must be a string or a list of text parts")
        return v


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @property
    def max_tokens_requested(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins, as in vLLM
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


# --- limits -------------------------------------------------------------------------------------


@dataclass
class ServerLimits:
    max_n: int = 8
    max_tokens: int = 512  # cap on max_tokens; also the default for chat requests that omit it
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_prompt_chars: int = 200_000  # before tokenizing: a cheap guard against huge prompts

    def __post_init__(self) -> None:
        check(self.max_n >= 1, f"max_n must be >= 1, got {self.max_n}")
        check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        check(self.max_body_bytes >= 1, f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        check(
            self.max_prompt_chars >= 1,
            f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}",
        )


Request = CompletionRequest | ChatCompletionRequest


def _prompt_param(req: Request) -> str:
    return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"


def check_model(name: str, available: list[str] | tuple[str, ...]) -> None:
    """404 `model_not_found` unless `name` is one of the served model names."""
    if name not in available:
        raise APIError(
            404,
            f"The model `{name}` does not exist. Available: {', '.join(available)}",
            param="model",
            code="model_not_found",
        )


def check_limits(req: Request, limits: ServerLimits, vocab_size: int | None = None) -> None:
    """The checks that need no tokenizer: call before tokenizing (`check_request` repeats them)."""
    if isinstance(req, ChatCompletionRequest):
        chars = sum(len(m.content) for m in req.messages)
        empty = all(not m.content for m in req.messages)
    else:
        chars = len(req.prompt)
        empty = chars == 0
    param = _prompt_param(req)
    if empty:
        what = "every message is empty" if param == "messages" else "the prompt is empty"
        raise APIError(
            400, f"{what}: there is nothing to continue", param=param, code="empty_prompt"
        )
    if chars > limits.max_prompt_chars:
        raise APIError(
            413,
            f"the {param} is {chars} characters long; this server accepts at most {limits.max_prompt_chars}",
            param=param,
            code="prompt_too_long",
        )
    if (
        isinstance(req, CompletionRequest)
        and isinstance(req.prompt, list)
        and vocab_size is not None
    ):
        bad = [t for t in req.prompt if t >= vocab_size]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is out of range: the vocabulary has {vocab_size} tokens (ids 0..{vocab_size - 1})",
                param="prompt",
                code="invalid_token_id",
            )
    if req.n > limits.max_n:
        raise APIError(
            400,
            f"n={req.n} is above this server's limit of {limits.max_n}",
            param="n",
            code="n_too_large",
        )
    asked = req.max_tokens_requested
    if asked is not None and asked > limits.max_tokens:
        param = (
            "max_completion_tokens"
            if getattr(req, "max_completion_tokens", None) is not None
            else "max_tokens"
        )
        raise APIError(
            400,
            f"{param}={asked} is above this server's limit of {limits.max_tokens}",
            param=param,
            code="max_tokens_too_large",
        )


def resolve_max_tokens(
    req: Request, prompt_token_count: int, limits: ServerLimits, context_len: int
) -> int:
    """The number of new tokens to generate: what was asked, else the default.

    Completions default to OpenAI's 16; chat defaults to as many as fit (at most `limits.max_tokens`).
    """
    asked = req.max_tokens_requested
    if asked is not None:
        return asked
    if isinstance(req, CompletionRequest):
        return COMPLETION_DEFAULT_MAX_TOKENS
    return max(1, min(limits.max_tokens, context_len - prompt_token_count))


def check_request(
    req: Request,
    prompt_token_count: int,
    limits: ServerLimits,
    context_len: int,
    vocab_size: int | None = None,
) -> None:
    """Raise `APIError` when `req` cannot be served: the checks of `check_limits`, then those of
    `check_context`."""
    check_limits(req, limits, vocab_size)
    check_context(req, prompt_token_count, limits, context_len)


def check_context(req: Request, prompt_token_count: int, limits: ServerLimits, context_len: int) -> int:
    """Raise `APIError` unless the tokenized prompt and the completion fit the model's context;
    return the number of new tokens to generate (`resolve_max_tokens`).

    `prompt_token_count` is the tokenized prompt's length (for chat, the rendered conversation's),
    `context_len` the model's context (block_size). The prompt must leave room for at least one
    token, and prompt + max_tokens must fit in the context.
    """
    param = _prompt_param(req)
    if prompt_token_count == 0:
        raise APIError(
            400, f"the {param} is empty after tokenization", param=param, code="empty_prompt"
        )
    where = "messages" if param == "messages" else "prompt"
    if prompt_token_count >= context_len:
        raise APIError(
            400,
            f"This model's maximum context length is {context_len} tokens. However, your {where} "
            f"is {prompt_token_count} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {where}.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = resolve_max_tokens(req, prompt_token_count, limits, context_len)
    if prompt_token_count + max_tokens > context_len:
        name = (
            "max_completion_tokens"
            if getattr(req, "max_completion_tokens", None) is not None
            else "max_tokens"
        )
        raise APIError(
            400,
            f"This model's maximum context length is {context_len} tokens. However, you requested "
            f"{prompt_token_count + max_tokens} tokens ({prompt_token_count} in the {where}, "
            f"{max_tokens} in the completion). Please reduce the length of the {where} or completion.",
            param=name,
            code="context_length_exceeded",
        )
    return max_tokens


def to_generation_config(req: Request, max_new_tokens: int | None = None) -> dict[str, Any]:
    """`GenerationConfig` keyword arguments for `req` (OpenAI names → Hugging Face names).

    `max_new_tokens` defaults to what the request asked for, else 16 (use `resolve_max_tokens` for
    chat's "as many as fit").
    """
    if max_new_tokens is None:
        max_new_tokens = req.max_tokens_requested or COMPLETION_DEFAULT_MAX_TOKENS
    greedy = req.temperature == 0
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else req.temperature,  # unused when greedy; must stay > 0
        top_k=None if req.top_k == -1 else req.top_k,
        top_p=None if req.top_p >= 1 else req.top_p,
        min_p=None if req.min_p == 0 else req.min_p,
        repetition_penalty=req.repetition_penalty,
        stop=req.stop_list,
        num_return_sequences=req.n,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
    )


# --- FastAPI error handlers ---------------------------------------------------------------------


def _param_path(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content') → 'messages[0].content'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """The `APIError` for pydantic/FastAPI validation `errors`: 400 for unparsable JSON, else 422."""
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "invalid JSON")
            where = e["loc"][-1] if e.get("loc") else "?"
            return APIError(
                400,
                f"We could not parse the JSON body of your request: {detail} (at character {where})",
                code="invalid_json",
            )
        if e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",):
            return APIError(
                400, "The request body is empty: send a JSON object", code="invalid_json"
            )
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _param_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        unknown = [_param_path(e["loc"]) for e in errors if e.get("type") == "extra_forbidden"]
        return APIError(
            422,
            f"Unrecognized request argument supplied: {', '.join(map(str, unknown))}",
            param=param,
            code="unrecognized_argument",
        )
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    message = f"{param}: {msg}" if param and not msg.startswith(param.split(".")[-1]) else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(422, message, param=param, code="invalid_value")


_STATUS_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    400: "bad_request",
}


def install_error_handlers(app) -> None:
    """Make every error `app` returns OpenAI-shaped: APIError, validation, bad JSON, 404/405, 500."""

    async def on_api_error(request: StarletteRequest, exc: APIError):
        return error_response(exc)

    async def on_validation(request: StarletteRequest, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    async def on_http(request: StarletteRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Unknown URL: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(
            exc.status_code,
            message,
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            code=_STATUS_CODES.get(exc.status_code),
            headers=dict(exc.headers or {}),
        )
        return error_response(err)

    async def on_crash(request: StarletteRequest, exc: Exception):
        # the traceback is still logged by Starlette's ServerErrorMiddleware
        return error_response(
            APIError(
                500,
                "The server had an error while processing your request.",
                type="server_error",
                code="internal_error",
            )
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)


# --- body size limit ----------------------------------------------------------------------------


def _body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server's limit of {max_bytes} bytes",
        code="request_too_large",
    )


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a request body passes the limit; see `BodySizeLimit`.

    An HTTPException, so FastAPI (which turns other errors while reading a body into 400s) passes
    it through to the exception handlers unchanged.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _body_too_large(max_bytes).message)


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`.

    A Content-Length over the limit is refused before reading; otherwise the bytes are counted as
    they arrive (chunked bodies, or a Content-Length that lies), and reading past the limit raises
    inside the app's `receive`, which FastAPI turns into the 413 (or this middleware does, when the
    app let the error through before starting its response).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    await send_error(
                        send,
                        APIError(
                            400, "Content-Length is not a non-negative integer", code="bad_request"
                        ),
                    )
                    return
                if length > self.max_bytes:
                    await send_error(send, _body_too_large(self.max_bytes))
                    return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await send_error(send, _body_too_large(self.max_bytes))


async def send_error(send, err: APIError) -> None:
    """Send `err` as a complete JSON response on a raw ASGI `send` (for middlewares)."""
    body = json.dumps(error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if err.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "APIError",
    "BodySizeLimit",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ServerLimits",
    "StreamOptions",
    "check_context",
    "check_limits",
    "check_model",
    "check_request",
    "error_body",
    "error_response",
    "install_error_handlers",
    "resolve_max_tokens",
    "send_error",
    "to_generation_config",
    "validation_error",
]
