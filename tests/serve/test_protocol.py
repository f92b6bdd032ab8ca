"""Request validation, limits and OpenAI-shaped errors (lmforge.serve.protocol)."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lmforge.generate.config import GenerationConfig
from lmforge.serve.protocol import (
    APIError,
    BodySizeLimit,
    ChatCompletionRequest,
    CompletionRequest,
    ServerLimits,
    check_limits,
    check_model,
    check_request,
    error_body,
    install_error_handlers,
    resolve_max_tokens,
    to_generation_config,
    validation_error,
)

CONTEXT = 32  # the fake model's context, in tokens
VOCAB = 100
LIMITS = ServerLimits(max_n=4, max_tokens=20, max_body_bytes=4096, max_prompt_chars=1000)
MODELS = ["tiny"]


def _tokens(req) -> int:
    """A stand-in tokenizer: one token per character (token id lists count as themselves)."""
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.content) for m in req.messages)
    return len(req.prompt)


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=LIMITS.max_body_bytes)

    def serve(req):
        check_model(req.model, MODELS)
        check_limits(req, LIMITS, vocab_size=VOCAB)
        check_request(req, _tokens(req), LIMITS, CONTEXT, vocab_size=VOCAB)
        return {
            "ok": True,
            "config": to_generation_config(
                req, resolve_max_tokens(req, _tokens(req), LIMITS, CONTEXT)
            ),
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return serve(req)

    @app.post("/v1/chat/completions")
    def chat(req: ChatCompletionRequest):
        return serve(req)

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def assert_openai_error(
    response, status: int, param: str | None = "unset", code: str | None = "unset"
):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "unset":
        assert body["error"]["param"] == param, body
    if code != "unset":
        assert body["error"]["code"] == code, body
    return body["error"]


def completion(**fields):
    return {"model": "tiny", "prompt": "hello", **fields}


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], **fields}


# --- schema: 422 naming the field -------------------------------------------------------------------

SCHEMA_ERRORS = [
    ("completions", {"prompt": "hi"}, "model"),
    ("completions", {"model": "tiny"}, "prompt"),
    ("completions", completion(temperature=2.5), "temperature"),
    ("completions", completion(temperature=-0.1), "temperature"),
    ("completions", completion(top_p=0), "top_p"),
    ("completions", completion(top_p=1.01), "top_p"),
    ("completions", completion(n=0), "n"),
    ("completions", completion(max_tokens=0), "max_tokens"),
    ("completions", completion(presence_penalty=2.5), "presence_penalty"),
    ("completions", completion(frequency_penalty=-2.01), "frequency_penalty"),
    ("completions", completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("completions", completion(stop=""), "stop"),
    ("completions", completion(stop=[1]), "stop"),
    ("completions", completion(top_k=0), "top_k"),
    ("completions", completion(top_k=-2), "top_k"),
    ("completions", completion(min_p=1.0), "min_p"),
    ("completions", completion(repetition_penalty=0), "repetition_penalty"),
    ("completions", completion(logprobs=6), "logprobs"),
    ("completions", completion(seed=2**64), "seed"),
    ("completions", completion(prompt=["one", "two"]), "prompt"),
    ("completions", completion(prompt=[[1, 2], [3]]), "prompt"),
    ("completions", completion(prompt=[1, -1]), "prompt"),
    ("completions", completion(prompt=[1, 10**30]), "prompt"),
    ("completions", completion(prompt=[1, 2.5]), "prompt"),
    ("completions", completion(prompt=[True]), "prompt"),
    ("completions", completion(prompt=5), "prompt"),
    ("completions", completion(prompt=None), "prompt"),
    ("completions", completion(stream_options={"include_usage": True}), "stream_options"),
    ("completions", completion(logit_bias={"1": 5}), "logit_bias"),
    ("chat/completions", chat(messages=[]), "messages"),
    ("chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    ("chat/completions", chat(messages=[{"role": "user"}]), "messages[0].content"),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
        "messages[0].tool_calls",
    ),
    ("chat/completions", chat(top_logprobs=3), "top_logprobs"),
    ("chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat/completions", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("chat/completions", chat(tools=[]), "tools"),
]


@pytest.mark.parametrize(
    "route,body,param",
    SCHEMA_ERRORS,
    ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(SCHEMA_ERRORS)],
)
def test_schema_errors_are_422_naming_the_field(client, route, body, param):
    error = assert_openai_error(client.post(f"/v1/{route}", json=body), 422, param=param)
    assert error["type"] == "invalid_request_error"


def test_unknown_fields_are_named(client):
    error = assert_openai_error(
        client.post("/v1/completions", json=completion(suffix="x", best_of=2)), 422
    )
    assert error["message"].startswith("Unrecognized request argument supplied:")
    assert "suffix" in error["message"] and "best_of" in error["message"]
    assert error["code"] == "unrecognized_argument"


def test_nan_is_rejected(client):
    # Python's json accepts NaN/Infinity, which no bound admits
    body = json.dumps(completion()).replace("}", ', "temperature": NaN}')
    assert_openai_error(
        client.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
        422,
        param="temperature",
    )


@pytest.mark.parametrize("body", ['{"model": "tiny", "prompt": ', "not json", '{"a": 1,}'])
def test_malformed_json_is_400(client, body):
    response = client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, param=None, code="invalid_json")


def test_empty_body_and_non_object_body(client):
    assert_openai_error(
        client.post("/v1/completions", headers={"content-type": "application/json"}), 400
    )
    assert_openai_error(client.post("/v1/completions", json=[1, 2]), 422)
    assert_openai_error(client.post("/v1/completions", json="a string"), 422)


def test_invalid_utf8_is_400(client):
    response = client.post(
        "/v1/completions",
        content=b'{"model": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(response, 400)


# --- limits and the context: check_request -------------------------------------------------------


def test_valid_requests_pass(client):
    assert client.post("/v1/completions", json=completion(max_tokens=10)).status_code == 200
    assert client.post("/v1/completions", json=completion(prompt=[1, 2, 3])).status_code == 200
    assert client.post("/v1/completions", json=completion(prompt=["just one"])).status_code == 200
    assert (
        client.post(
            "/v1/chat/completions",
            json=chat(n=4, stop="x", stream=True, stream_options={"include_usage": True}),
        ).status_code
        == 200
    )
    parts = chat(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert client.post("/v1/chat/completions", json=parts).status_code == 200


def test_empty_prompt(client):
    assert_openai_error(
        client.post("/v1/completions", json=completion(prompt="")),
        400,
        param="prompt",
        code="empty_prompt",
    )
    assert_openai_error(
        client.post("/v1/completions", json=completion(prompt=[])),
        400,
        param="prompt",
        code="empty_prompt",
    )
    empty_chat = chat(messages=[{"role": "system", "content": ""}, {"role": "user", "content": ""}])
    assert_openai_error(
        client.post("/v1/chat/completions", json=empty_chat),
        400,
        param="messages",
        code="empty_prompt",
    )


def test_prompt_longer_than_the_context(client):
    error = assert_openai_error(
        client.post("/v1/completions", json=completion(prompt="x" * 40)),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    assert "32" in error["message"] and "40" in error["message"]
    # exactly the context leaves no room for one token either
    assert_openai_error(
        client.post("/v1/completions", json=completion(prompt="x" * 32, max_tokens=1)),
        400,
        code="context_length_exceeded",
    )


def test_prompt_plus_max_tokens_over_the_context(client):
    error = assert_openai_error(
        client.post("/v1/completions", json=completion(prompt="x" * 20, max_tokens=13)),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    # the numbers, as vLLM and OpenAI say them
    assert "maximum context length is 32 tokens" in error["message"]
    assert "you requested 33 tokens (20 in the prompt, 13 in the completion)" in error["message"]
    assert (
        client.post("/v1/completions", json=completion(prompt="x" * 20, max_tokens=12)).status_code
        == 200
    )
    error = assert_openai_error(
        client.post(
            "/v1/chat/completions",
            json=chat(messages=[{"role": "user", "content": "y" * 30}], max_completion_tokens=5),
        ),
        400,
        param="max_completion_tokens",
    )
    assert "30 in the messages, 5 in the completion" in error["message"]


def test_chat_default_max_tokens_fits_the_context(client):
    # no max_tokens: as many as fit (30 + 2 = 32), so no error
    response = client.post(
        "/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "y" * 30}])
    )
    assert response.status_code == 200
    assert response.json()["config"]["max_new_tokens"] == 2


def test_caps(client):
    assert_openai_error(
        client.post("/v1/completions", json=completion(n=5)), 400, param="n", code="n_too_large"
    )
    assert_openai_error(client.post("/v1/completions", json=completion(n=10**9)), 400, param="n")
    assert_openai_error(
        client.post("/v1/completions", json=completion(max_tokens=21)),
        400,
        param="max_tokens",
        code="max_tokens_too_large",
    )
    assert_openai_error(
        client.post("/v1/chat/completions", json=chat(max_completion_tokens=10**12)),
        400,
        param="max_completion_tokens",
    )
    assert_openai_error(
        client.post("/v1/completions", json=completion(prompt="x" * 1001)),
        413,
        param="prompt",
        code="prompt_too_long",
    )


def test_token_ids_out_of_the_vocabulary(client):
    error = assert_openai_error(
        client.post("/v1/completions", json=completion(prompt=[1, VOCAB])),
        400,
        param="prompt",
        code="invalid_token_id",
    )
    assert str(VOCAB) in error["message"]


def test_unknown_model(client):
    error = assert_openai_error(
        client.post("/v1/completions", json=completion(model="gpt-4")),
        404,
        param="model",
        code="model_not_found",
    )
    assert "gpt-4" in error["message"] and "tiny" in error["message"]


def test_check_request_directly():
    req = CompletionRequest(model="m", prompt="abc", max_tokens=5)
    check_request(req, 3, LIMITS, CONTEXT)
    with pytest.raises(APIError) as info:
        check_request(req, 0, LIMITS, CONTEXT)  # a prompt that tokenizes to nothing
    assert info.value.status == 400 and info.value.code == "empty_prompt"
    with pytest.raises(APIError) as info:
        check_request(req, 28, LIMITS, CONTEXT)
    assert info.value.code == "context_length_exceeded"


# --- errors for routes and crashes -----------------------------------------------------------------


def test_unknown_route_and_method(client):
    assert_openai_error(client.get("/v1/nothing"), 404, code="not_found")
    response = client.get("/v1/completions")
    assert_openai_error(response, 405, code="method_not_allowed")
    assert "POST" in response.headers["allow"]


def test_a_crash_is_an_openai_shaped_500(client):
    error = assert_openai_error(client.get("/boom"), 500, code="internal_error")
    assert "a bug" not in error["message"]  # internals stay in the log
    assert error["type"] == "server_error"


def test_validation_error_from_a_plain_pydantic_error():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(chat(messages=[{"role": "user", "content": 3}]))
    err = validation_error(list(info.value.errors()))
    assert err.status == 422 and err.param == "messages[0].content"
    assert error_body(err) == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": "invalid_value",
        }
    }


# --- body size -------------------------------------------------------------------------------------


def test_body_over_the_cap_by_content_length(client):
    big = completion(prompt="x" * 5000)
    assert_openai_error(client.post("/v1/completions", json=big), 413, code="request_too_large")


def test_body_over_the_cap_without_content_length(client):
    # a chunked body: only counting the bytes as they arrive can catch it
    chunks = [b'{"model": "tiny", "prompt": "'] + [b"x" * 1000] * 8 + [b'"}']
    response = client.post(
        "/v1/completions", content=iter(chunks), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, code="request_too_large")


def test_body_size_limit_does_not_trust_a_small_content_length():
    """A raw ASGI request whose Content-Length says 10 but which sends 5000 bytes."""
    import asyncio

    app = make_app()
    sent = []
    chunks = [b"x" * 1000 for _ in range(5)]

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413


def test_bad_content_length(client):
    response = client.post(
        "/v1/completions",
        content=b"{}",
        headers={"content-length": "-5", "content-type": "application/json"},
    )
    assert response.status_code in (400, 413)  # the client library may refuse to send it as is


# --- mapping to GenerationConfig -------------------------------------------------------------------


def test_generation_config_mapping_greedy():
    req = CompletionRequest(model="m", prompt="hi", temperature=0, max_tokens=7, stop="\n", seed=3)
    kwargs = to_generation_config(req)
    assert (
        kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 7 and kwargs["stop"] == ["\n"]
    )
    assert kwargs["seed"] == 3 and kwargs["num_return_sequences"] == 1
    assert kwargs["presence_penalty"] == 0.0 and kwargs["frequency_penalty"] == 0.0
    GenerationConfig(**kwargs)  # valid as is


def test_generation_config_mapping_sampling():
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.2,
        n=3,
        stop=["a", "b"],
        max_tokens=99,
        max_completion_tokens=11,
    )
    kwargs = to_generation_config(req)
    assert kwargs == dict(
        max_new_tokens=11,  # max_completion_tokens wins over max_tokens
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        stop=["a", "b"],
        num_return_sequences=3,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=None,
    )
    GenerationConfig(**kwargs)


def test_generation_config_defaults_are_off():
    kwargs = to_generation_config(CompletionRequest(model="m", prompt="hi"))
    assert kwargs["top_k"] is None and kwargs["top_p"] is None and kwargs["min_p"] is None
    assert (
        kwargs["do_sample"] is True
        and kwargs["temperature"] == 1.0
        and kwargs["max_new_tokens"] == 16
    )
    assert kwargs["stop"] == []


def test_generation_config_penalties():
    req = CompletionRequest(model="m", prompt="hi", presence_penalty=0.5, frequency_penalty=-1.0)
    kwargs = to_generation_config(req, max_new_tokens=4)
    assert kwargs["presence_penalty"] == 0.5 and kwargs["frequency_penalty"] == -1.0
    assert kwargs["max_new_tokens"] == 4
    GenerationConfig(**kwargs)


def test_resolve_max_tokens():
    limits = ServerLimits(max_tokens=50)
    assert resolve_max_tokens(CompletionRequest(model="m", prompt="x"), 10, limits, 100) == 16
    assert (
        resolve_max_tokens(CompletionRequest(model="m", prompt="x", max_tokens=30), 10, limits, 100)
        == 30
    )
    msgs = [{"role": "user", "content": "x"}]
    assert (
        resolve_max_tokens(ChatCompletionRequest(model="m", messages=msgs), 10, limits, 100) == 50
    )
    assert (
        resolve_max_tokens(ChatCompletionRequest(model="m", messages=msgs), 90, limits, 100) == 10
    )


def test_server_limits_are_validated():
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="max_n"):
        ServerLimits(max_n=0)


# --- fuzz: no input makes anything but a clean error ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
]
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
            "content": json_values,
        }
    ),
    max_size=3,
)
bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    json_values | messages,
    max_size=8,
).map(
    lambda d: {
        "model": "tiny",
        "prompt": "hi",
        "messages": [{"role": "user", "content": "hi"}],
        **d,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, chat_route=st.booleans())
def test_fuzz_models_and_checks(body, chat_route):
    """Anything a client sends is accepted or refused with a ValidationError/APIError, never a crash."""
    cls = ChatCompletionRequest if chat_route else CompletionRequest
    body = {k: v for k, v in body.items() if k != ("prompt" if chat_route else "messages")}
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = validation_error(list(e.errors()))
        assert err.status in (400, 422)
        json.dumps(error_body(err))
        return
    try:
        check_request(req, _tokens(req), LIMITS, CONTEXT, vocab_size=VOCAB)
    except APIError as e:
        assert e.status in (400, 404, 413)
        return
    GenerationConfig(
        **to_generation_config(req, resolve_max_tokens(req, _tokens(req), LIMITS, CONTEXT))
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=bodies | json_values, chat_route=st.booleans())
def test_fuzz_http(client, body, chat_route):
    route = "/v1/chat/completions" if chat_route else "/v1/completions"
    response = client.post(
        route, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code in (200, 400, 404, 413, 422), response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
