"""The chat page (lmforge/serve/static) end to end in headless Chromium, driven by Selenium.

The page is served with a small fake-but-real FastAPI app that speaks the OpenAI protocol (GET
/v1/models, streaming POST /v1/chat/completions behind a key) on a free 127.0.0.1 port: this tests
the page, not the model. Needs Debian's chromium and chromium-driver (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

import lmforge

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)

STATIC = Path(lmforge.__file__).parent / "serve" / "static"
KEY = "test-key-123"
MODEL = "fake-model"
REPLY = "Hello from the fake model! Streaming works."


# --- the fake server ---------------------------------------------------------------------------


def make_fake_app(state: dict):
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def unauthorized(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            body = {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    def models(request: Request):
        return unauthorized(request) or {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "owned_by": "lmforge"}],
        }

    def chunk(content: str | None, finish: str | None = None) -> str:
        delta = {"content": content} if content is not None else {}
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        state["requests"].append(body)
        prompt = body["messages"][-1]["content"]
        if "fail" in prompt:
            error = {
                "error": {
                    "message": "n=99 is above this server's limit of 8",
                    "type": "invalid_request_error",
                    "param": "n",
                    "code": "n_too_large",
                }
            }
            return JSONResponse(error, status_code=400)

        async def fixed():
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
            words = REPLY.split(" ")
            for i, word in enumerate(words):
                await asyncio.sleep(0.02)
                yield chunk(word if i == 0 else " " + word)
            yield chunk(None, "stop")
            yield "data: [DONE]\n\n"

        async def slow():
            finished = False
            try:
                for _ in range(300):  # 30 s unless stopped
                    yield chunk("tick ")
                    await asyncio.sleep(0.1)
                finished = True
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    state["cancelled"].set()  # the client went away mid-stream

        stream = slow() if "slow" in prompt else fixed()
        return StreamingResponse(stream, media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server():
    from lmforge.serve.app import serve_in_thread

    state = {"requests": [], "cancelled": threading.Event()}
    with serve_in_thread(make_fake_app(state)) as url:
        yield f"{url}/", state


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# --- helpers -------------------------------------------------------------------------------------


def wait(driver, condition, timeout: float = 15, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def assistant_bubbles(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def open_page_with_key(driver, url: str) -> None:
    driver.get(url)
    key = by_id(driver, "api-key")
    key.clear()
    key.send_keys(KEY)
    by_id(driver, "prompt").click()  # leaving the field saves the key and reloads the models
    wait(
        driver,
        lambda d: by_id(d, "model").get_attribute("value") == MODEL,
        message="models never loaded",
    )


def send_message(driver, text: str) -> None:
    prompt = by_id(driver, "prompt")
    prompt.clear()
    prompt.send_keys(text)
    by_id(driver, "send").click()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- tests ---------------------------------------------------------------------------------------


def test_page_is_self_contained():
    html = (STATIC / "index.html").read_text()
    assert "static/app.js" in html and "static/style.css" in html
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text, (
            f"{name} loads something from the network"
        )
    assert "innerHTML" not in (STATIC / "app.js").read_text()  # replies are inserted as text only


def test_key_is_needed_then_a_streamed_reply_appears(server, browser, tmp_path):
    url, state = server
    browser.get(url)
    # without a key the models request is refused and the page says so
    wait(browser, lambda d: "401" in by_id(d, "status").text, message="no 401 shown without a key")

    open_page_with_key(browser, url)
    seed = by_id(browser, "seed")
    seed.clear()
    seed.send_keys("42")
    browser.execute_script(
        "const t = document.getElementById('temperature'); t.value = '0.5';"
        "t.dispatchEvent(new Event('input')); t.dispatchEvent(new Event('change'));"
    )
    assert by_id(browser, "temperature-value").text == "0.50"
    send_message(browser, "Hello there")

    wait(
        browser,
        lambda d: any(b.text == REPLY for b in assistant_bubbles(d)),
        message="the reply never appeared",
    )
    wait(browser, lambda d: by_id(d, "send").is_enabled() and not by_id(d, "stop").is_enabled())
    assert "pending" not in assistant_bubbles(browser)[-1].get_attribute("class")
    assert by_id(browser, "status").text == ""

    sent = state["requests"][-1]
    assert sent["model"] == MODEL and sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "Hello there"}]
    assert (
        sent["temperature"] == 0.5
        and sent["top_p"] == 1
        and sent["max_tokens"] == 256
        and sent["seed"] == 42
    )

    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 500 and len(data) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # text and bubbles, not a blank page
    if keep := os.environ.get("LMFORGE_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(shot, keep)

    # the follow-up carries the conversation, and the key survives a reload (localStorage)
    send_message(browser, "And again")
    wait(browser, lambda d: len([b for b in assistant_bubbles(d) if b.text == REPLY]) == 2)
    assert [m["role"] for m in state["requests"][-1]["messages"]] == ["user", "assistant", "user"]
    assert state["requests"][-1]["messages"][1]["content"] == REPLY
    browser.refresh()
    assert by_id(browser, "api-key").get_attribute("value") == KEY
    wait(browser, lambda d: by_id(d, "model").get_attribute("value") == MODEL)


def test_stop_aborts_a_slow_stream(server, browser):
    url, state = server
    open_page_with_key(browser, url)
    by_id(browser, "clear").click()
    send_message(browser, "slow please")
    wait(browser, lambda d: by_id(d, "stop").is_enabled())
    wait(
        browser,
        lambda d: assistant_bubbles(d) and "tick" in assistant_bubbles(d)[-1].text,
        message="no streamed text",
    )
    by_id(browser, "stop").click()

    wait(browser, lambda d: by_id(d, "status").text == "Stopped.", message="the page did not stop")
    assert state["cancelled"].wait(10), "the server's stream was never cancelled"
    bubble = assistant_bubbles(browser)[-1]
    assert "stopped" in bubble.get_attribute("class")
    text = bubble.text
    time.sleep(0.5)
    assert bubble.text == text  # nothing more arrives
    assert by_id(browser, "send").is_enabled() and not by_id(browser, "stop").is_enabled()


def test_an_error_body_is_shown(server, browser):
    url, _ = server
    open_page_with_key(browser, url)
    send_message(browser, "please fail")
    wait(
        browser,
        lambda d: "above this server's limit" in by_id(d, "status").text,
        message="the error was not shown",
    )
    assert "400" in by_id(browser, "status").text
    assert "error" in by_id(browser, "status").get_attribute("class")
    assert by_id(browser, "send").is_enabled()


def test_the_page_on_the_real_server(browser, tmp_path):
    """The page served by `lmforge serve`'s own app, a tiny random GPT behind it: the streamed reply
    appears and equals what the API answers for the same (greedy) request."""
    import httpx
    import torch

    from lmforge.checkpoint import Checkpoint
    from lmforge.serve.app import create_app
    from lmforge.serve.app import serve_in_thread as serving
    from lmforge.serve.security import ApiKeys
    from lmforge.tokenizer import train_tokenizer
    from tests.conftest import SAMPLE_TEXT, tiny_gpt

    tokenizer = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    ckpt = Checkpoint(model=tiny_gpt(tokenizer.vocab_size, block_size=64), tokenizer=tokenizer)
    with serving(create_app(ckpt, model_name=MODEL, api_keys=ApiKeys([KEY]))) as url:
        open_page_with_key(browser, url + "/")
        by_id(browser, "clear").click()
        for field, value in (("max-tokens", "12"), ("seed", "3")):
            box = by_id(browser, field)
            box.clear()
            box.send_keys(value)
        browser.execute_script(
            "const t = document.getElementById('temperature'); t.value = '0';"
            "t.dispatchEvent(new Event('input')); t.dispatchEvent(new Event('change'));"
        )
        send_message(browser, "The quick brown fox")
        wait(browser, lambda d: by_id(d, "send").is_enabled() and assistant_bubbles(d), timeout=60,
             message="no reply from the real server")
        reply = assistant_bubbles(browser)[-1].text
        # 12 tokens rarely reach an end of text: the page says why the reply stopped
        assert by_id(browser, "status").text in ("", "Stopped at max_tokens."), by_id(browser, "status").text
        expected = httpx.post(
            f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            json={"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}],
                  "temperature": 0, "max_tokens": 12, "seed": 3},
        ).json()["choices"][0]["message"]["content"]
        assert reply == expected.strip() or reply == expected
        assert browser.save_screenshot(str(tmp_path / "real.png"))
