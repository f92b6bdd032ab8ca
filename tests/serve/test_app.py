"""The OpenAI-compatible API, served by uvicorn on a loopback port and called with the official
`openai` client (raw httpx for the wire format): the texts are offline `generate`'s."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from lmforge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from lmforge.generate import GenerationConfig, generate
from lmforge.serve import Engine
from lmforge.serve.app import DEFAULT_CHAT_STOP, ChatTemplate, create_app, serve_in_thread
from lmforge.tokenizer import TOKENIZER_CONFIG_FILE, train_tokenizer
from tests.conftest import SAMPLE_TEXT, tiny_gpt

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny"


serving = serve_in_thread  # the app on a free loopback port; yields its base URL


@pytest.fixture(scope="module")
def ckpt():
    tokenizer = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = tiny_gpt(tokenizer.vocab_size, block_size=64)
    with torch.no_grad():  # sharper than at init, so that choices are not near-ties
        model.lm_head.weight.mul_(3)
    return Checkpoint(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def url(ckpt):
    with serving(create_app(ckpt, model_name=MODEL, max_batch_size=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def offline(ckpt, prompt: str, **config):
    return generate(ckpt.model, ckpt.tokenizer, prompt, GenerationConfig(**config))


def test_health_and_models(url, client):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_is_offline_generate(ckpt, client):
    options = dict(max_tokens=20, seed=3, temperature=0.8, top_p=0.9, presence_penalty=0.5,
                   frequency_penalty=0.3)
    extra = dict(top_k=40, min_p=0.02, repetition_penalty=1.2)
    r = client.completions.create(model=MODEL, prompt="The quick", **options, extra_body=extra)
    (expected,) = offline(ckpt, "The quick", max_new_tokens=20, seed=3, temperature=0.8, top_p=0.9,
                          presence_penalty=0.5, frequency_penalty=0.3, **extra)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    prompt_tokens = len(ckpt.tokenizer.encode("The quick"))
    usage = r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens
    assert usage == (prompt_tokens, 20, prompt_tokens + 20)
    # the same request streamed gives the same text, piece by piece
    stream = client.completions.create(model=MODEL, prompt="The quick", **options, extra_body=extra,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


def test_greedy_stop_and_echo(ckpt, client):
    # the penalties keep greedy decoding of a random model from repeating one token
    options = dict(max_new_tokens=16, do_sample=False, presence_penalty=2.0, frequency_penalty=2.0)
    (free,) = offline(ckpt, "Pack my", **options)
    stop = free.text[5:8]  # a stop string the text holds
    (expected,) = offline(ckpt, "Pack my", **options, stop=[stop])
    assert expected.finish_reason == "stop" and len(expected.text) >= 5
    r = client.completions.create(model=MODEL, prompt="Pack my", max_tokens=16, temperature=0, stop=[stop],
                                  echo=True, presence_penalty=2.0, frequency_penalty=2.0)
    assert r.choices[0].text == "Pack my" + expected.text
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_as_num_return_sequences(ckpt, client):
    r = client.completions.create(model=MODEL, prompt="A", max_tokens=12, n=2, seed=7)
    expected = offline(ckpt, "A", max_new_tokens=12, seed=7, num_return_sequences=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 1


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=6, logprobs=2, seed=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_chat_is_offline_generate_on_the_template(ckpt, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = ChatTemplate().render(messages)
    assert prompt == "system: Be brief.\nuser: Hello there\nassistant:"
    (expected,) = offline(ckpt, prompt, max_new_tokens=15, seed=2, stop=DEFAULT_CHAT_STOP)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, seed=2,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert r.usage.prompt_tokens == len(ckpt.tokenizer.encode(prompt))
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, seed=2, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sse_framing(url):
    body = dict(model=MODEL, prompt="The", max_tokens=5, stream=True, seed=0)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_errors_are_openai_shaped(url, client):
    r = httpx.post(f"{url}/v1/completions", json=dict(model="gpt-4", prompt="x"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    # a value out of range is a validation error (422); a request that does not fit is a 400
    for bad, param, status in ((dict(temperature=5), "temperature", 422),
                               (dict(max_tokens=500), "max_tokens", 400), (dict(n=9), "n", 400)):
        r = httpx.post(f"{url}/v1/completions", json=dict(model=MODEL, prompt="x", **bad))
        assert r.status_code == status and r.json()["error"]["param"] == param, r.json()
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = httpx.get(f"{url}/v2/nothing")  # as OpenAI: an unknown URL is an invalid request, 404
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_full_queue_is_429_with_retry_after(ckpt):
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=1, max_queue=0, start=False)
    engine.submit([5, 6], GenerationConfig(max_new_tokens=2), lambda event: None)  # the one place
    try:
        with serving(create_app(ckpt, engine=engine, model_name=MODEL)) as url:
            r = httpx.post(f"{url}/v1/completions", json=dict(model=MODEL, prompt="x"))
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt="x")
    finally:
        engine.close()


def test_disconnect_cancels_the_sequence(ckpt):
    engine = Engine(ckpt.model, ckpt.tokenizer)
    feed = engine._feed
    engine._feed = lambda: (time.sleep(0.02), feed())  # slow decoding: the client leaves first
    handles = []
    submit = engine.submit
    engine.submit = lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1]
    try:
        with serving(create_app(ckpt, engine=engine, model_name=MODEL)) as url:
            body = dict(model=MODEL, prompt="The", max_tokens=50, stream=True)
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                next(r.iter_lines())  # the first event, then hang up
            (handle,) = handles
            assert handle.wait(10) and handle.finish_reason == "cancelled"
            assert handle.completion_tokens < 50
    finally:
        engine.close()


def test_chat_template_from_the_checkpoint(tmp_path, ckpt):
    save_checkpoint(tmp_path, ckpt.model, ckpt.tokenizer)
    config = json.loads((tmp_path / TOKENIZER_CONFIG_FILE).read_text())
    config["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    template = ChatTemplate.for_checkpoint(load_checkpoint(tmp_path))
    assert template.render([{"role": "user", "content": "Hi"}]) == "<|user|>Hi<|assistant|>"
    assert template.stop == []


def test_request_timeout(ckpt):
    with serving(create_app(ckpt, model_name=MODEL, request_timeout=0.0)) as url:
        r = httpx.post(f"{url}/v1/completions", json=dict(model=MODEL, prompt="x"), timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        body = dict(model=MODEL, prompt="x", stream=True)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            events = r.read().decode().split("\n\n")
        # the status line went out before the timeout: the error comes as an event
        assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "timeout"
        assert events[-2] == "data: [DONE]"
