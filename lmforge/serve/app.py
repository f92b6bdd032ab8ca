"""An OpenAI-compatible HTTP API over the continuous-batching `Engine`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, each with
OpenAI's request fields and response shapes (streaming as server-sent events ending in
`data: [DONE]`), plus vLLM's extra sampling fields `top_k`, `min_p` and `repetition_penalty`.
Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.

Requests map onto `GenerationConfig` so that a request gives the tokens of offline `generate` for
the same prompt and settings: `temperature: 0` is greedy decoding, `seed` seeds choice j of `n`
with seed + j (as `num_return_sequences` does offline). The handlers only tokenize and format;
the model runs in the engine's thread, whose events cross into asyncio through
`loop.call_soon_threadsafe`. A client that disconnects cancels its sequences.

Log-probabilities are the model's own distribution (log_softmax of the raw logits, before
penalties, temperature and filters), as vLLM reports by default.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

# the chat template is shared with `lmforge chat` and chat fine-tuning (imported here for callers)
from lmforge.chat import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError  # noqa: F401
from lmforge.checkpoint import Checkpoint, load_checkpoint
from lmforge.errors import LmforgeError
from lmforge.generate.config import GenerationConfig
from lmforge.models.bert import Bert
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.serve.engine import Engine, Event, QueueFull, SequenceHandle, openai_finish_reason
from lmforge.serve.metrics import MetricsMiddleware, ServerMetrics, TokenTimer
from lmforge.serve.protocol import (
    APIError,
    BodySizeLimit,
    ChatCompletionRequest,
    CompletionRequest,
    ServerLimits,
    check_context,
    check_limits,
    check_model,
    error_body,
    install_error_handlers,
    to_generation_config,
)
from lmforge.serve.security import ApiKeys, install_security

STATIC_DIR = Path(__file__).parent / "static"  # the chat page
_Sampling = CompletionRequest | ChatCompletionRequest


# GenerationConfig's messages start with its field's name; OpenAI calls some fields otherwise
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}


def _bad_config(e: LmforgeError) -> APIError:
    first = str(e).split(" ", 1)[0]
    param = _PARAM_NAMES.get(first, first) if first in GenerationConfig.__dataclass_fields__ else None
    return APIError(400, str(e), param=param)


# --- chat messages -----------------------------------------------------------------------------------


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # content parts: only text is understood
        if any(part.get("type") != "text" for part in content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(part.get("text", "") for part in content)
    return content or ""


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    ckpt: Checkpoint | str | Path,
    *,
    engine: Engine | None = None,
    model_name: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    request_timeout: float | None = None,
    chat_template: ChatTemplate | None = None,
    limits: ServerLimits | None = None,
    api_keys: ApiKeys | None = None,
    requests_per_minute: float | None = None,
    public_metrics: bool = False,
) -> FastAPI:
    """The API for one checkpoint (a folder, or a loaded `Checkpoint`). Without `engine` one is
    made (and closed with the app); `model_name` is the id clients pass as `model` (default: the
    folder's name); `request_timeout` ends any request after that many seconds.

    `limits` caps n, max_tokens, prompt size and body size; with `api_keys` (enabled) every /v1
    route and /metrics (unless `public_metrics`) needs `Authorization: Bearer KEY`;
    `requests_per_minute` rate-limits each key (each client address without keys)."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    # an encoder (BERT) serves embeddings, classification and fill-mask; a GPT generates
    encoder = isinstance(ckpt.model, Bert)
    seq2seq = isinstance(ckpt.model, EncoderDecoder)
    owns_engine = engine is None and not (encoder or seq2seq)
    if engine is None and not (encoder or seq2seq):
        engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    name = model_name or (ckpt.path.name if ckpt.path is not None else "lmforge")
    tokenizer = ckpt.tokenizer
    template = chat_template or ChatTemplate.for_checkpoint(ckpt)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_engine:
            await asyncio.to_thread(engine.close)

    limits = limits or ServerLimits()
    vocab_size = ckpt.model.config.vocab_size
    metrics = ServerMetrics()
    if engine is not None:
        metrics.bind_engine(lambda: engine.queue_depth, lambda: engine.running)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.engine, app.state.model_name, app.state.chat_template = engine, name, template
    app.state.metrics = metrics
    install_error_handlers(app)
    # added innermost first: the body cap runs inside the key check, and the metrics middleware,
    # outermost, also counts the requests those two refuse (401, 413, 429)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if (api_keys is not None and api_keys.enabled) or requests_per_minute:
        install_security(app, api_keys or ApiKeys([]), requests_per_minute, public_metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if encoder:
        from lmforge.serve.encoder_routes import add_encoder_routes

        add_encoder_routes(app, ckpt, name, limits, created)
        return app
    if seq2seq:
        from lmforge.serve.seq2seq_routes import add_seq2seq_routes

        add_seq2seq_routes(app, ckpt, name, limits, created)
        return app

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")


    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "lmforge",
            "max_model_len": engine.max_len,
        }]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, [name])
        check_limits(body, limits, vocab_size)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (scoring the prompt) is not supported yet", param="echo")
        prompts = [_completion_prompt(body.prompt, tokenizer)]
        config = _generation_config(body, len(prompts[0]), limits, engine.max_len)
        metrics.add_prompt_tokens(len(prompts[0]))
        choices = _Choices(engine, prompts, config, body.n, body.logprobs, request_timeout, metrics)
        reply = _Reply("cmpl", "text_completion", name, prompts, body.n)
        if body.stream:
            return _sse(choices, request, reply.completion_chunks(choices, request, body, tokenizer))
        await choices.wait(request)
        return reply.completion(choices, body, tokenizer)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model, [name])
        check_limits(body, limits, vocab_size)
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
        try:
            text = template.render(messages)
        except ChatTemplateError as e:  # the template's raise_exception, or a Jinja error
            raise APIError(400, str(e), param="messages") from e
        prompt = _encode(text, tokenizer)
        stop = body.stop_list
        stop += [s for s in template.stop if s not in stop]
        config = _generation_config(body, len(prompt), limits, engine.max_len, stop)
        metrics.add_prompt_tokens(len(prompt))
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = _Choices(engine, [prompt], config, body.n, top, request_timeout, metrics)
        reply = _Reply("chatcmpl", "chat.completion", name, [prompt], body.n)
        if body.stream:
            return _sse(choices, request, reply.chat_chunks(choices, request, body, tokenizer))
        await choices.wait(request)
        return reply.chat(choices, tokenizer)

    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Run `app` under uvicorn in a background thread (port 0: a free one) and yield its base URL;
    the server stops when the block ends. For tests, benchmarks and embedding in a program."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def _encode(text: str, tokenizer) -> list[int]:
    try:
        ids = tokenizer.encode(text)
    except LmforgeError as e:  # e.g. a character the char tokenizer does not know
        raise APIError(400, str(e), param="prompt") from e
    if not ids:  # as offline: an empty prompt starts from a document boundary
        if tokenizer.eos_id is None:
            raise APIError(
                400, "the prompt is empty and the tokenizer has no end-of-text token to start from",
                param="prompt",
            )
        ids = [tokenizer.eos_id]
    return ids


def _completion_prompt(prompt: str | list[int], tokenizer) -> list[int]:
    """The prompt's token ids: `protocol.CompletionRequest` leaves one text or one list of ids."""
    return _encode(prompt, tokenizer) if isinstance(prompt, str) else list(prompt)


def _generation_config(
    body: _Sampling, prompt_len: int, limits: ServerLimits, max_len: int, stop: list[str] | None = None
) -> GenerationConfig:
    """The request's sampling fields as the GenerationConfig offline `generate` would take, once
    the prompt and the completion are known to fit the context."""
    kwargs = to_generation_config(body, check_context(body, prompt_len, limits, max_len))
    if stop is not None:
        kwargs["stop"] = stop
    try:
        return GenerationConfig(**kwargs)
    except LmforgeError as e:
        raise _bad_config(e) from e


class _Choices:
    """A request's sequences in the engine (n per prompt; index p * n + j is choice j of prompt
    p, seeded seed + j), with their events arriving on the event loop as (index, Event)."""

    def __init__(self, engine: Engine, prompts: list[list[int]], config: GenerationConfig, n: int,
                 logprobs: int | None, timeout: float | None, metrics: ServerMetrics | None = None):
        loop = asyncio.get_running_loop()
        self.metrics = metrics
        self.timers: list[TokenTimer] = []  # time to first token, then between tokens
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.tokens: list[list[Event]] = [[] for _ in range(len(prompts) * n)]  # token events, for logprobs
        self.handles: list[SequenceHandle] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    # called in the engine thread: hand the event over to this request's loop
                    def on_event(event: Event, i: int = p * n + j) -> None:
                        loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

                    self.handles.append(
                        engine.submit(ids, config, on_event, choice=j, logprobs=logprobs, timeout=timeout)
                    )
                    if metrics is not None:
                        self.timers.append(metrics.token_timer(start=self.handles[-1].submitted_at))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from e
        except LmforgeError as e:
            self.cancel()
            raise APIError(400, str(e), param="prompt") from e

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Every event until all sequences end; stops early (cancelling them) if the client
        disconnects, which is checked whenever a second passes without an event. A sequence that
        timed out or failed raises APIError."""
        running = len(self.handles)
        try:
            while running:
                try:
                    i, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event.token_id is not None:
                    self.tokens[i].append(event)
                    if self.metrics is not None:
                        self.timers[i].token()
                        self.metrics.add_generated_tokens(1)
                if event.finish_reason == "timeout":
                    raise APIError(504, "the request timed out", "timeout", code="timeout")
                if event.finish_reason == "error":
                    raise APIError(500, f"decoding failed: {self.handles[i].error}", "server_error")
                if event.finish_reason is not None:
                    running -= 1
                yield i, event
        finally:  # also on the task's cancellation (starlette cancels a disconnected stream)
            self.cancel()

    async def wait(self, request: Request) -> None:
        async for _ in self.events(request):
            pass

    def cancel(self) -> None:
        for h in self.handles:
            if not h.finished:
                h.cancel()

    def usage(self, prompts: list[list[int]]) -> dict:
        prompt_tokens = sum(map(len, prompts))
        completion_tokens = sum(h.completion_tokens for h in self.handles)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _sse(choices: _Choices, request: Request, chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        try:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:  # the status line went out already: the error is an event (as vLLM)
                yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left (starlette cancels the stream), or an error ended it early
            choices.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


class _Reply:
    """OpenAI's response objects for one request, whole or as stream chunks."""

    def __init__(self, prefix: str, object: str, model: str, prompts: list[list[int]], n: int):
        self.id, self.object, self.model = f"{prefix}-{uuid.uuid4().hex}", object, model
        self.created, self.prompts, self.n = int(time.time()), prompts, n

    def _envelope(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    # completions -------------------------------------------------------------------------------

    def completion(self, choices: _Choices, body: CompletionRequest, tokenizer) -> dict:
        out = []
        for i, h in enumerate(choices.handles):
            prefix = tokenizer.decode(self.prompts[i // self.n]) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(tokenizer, choices.tokens[i], 0)
            out.append({"index": i, "text": prefix + h.text, "logprobs": logprobs,
                        "finish_reason": openai_finish_reason(h.finish_reason)})
        return self._envelope("text_completion", out, usage=choices.usage(self.prompts))

    async def completion_chunks(self, choices: _Choices, request: Request, body: CompletionRequest,
                                tokenizer) -> AsyncIterator[dict]:
        def chunk(i: int, text: str, logprobs=None, finish_reason=None) -> dict:
            return self._envelope("text_completion", [
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

        if body.echo:
            for i in range(len(choices.handles)):
                yield chunk(i, tokenizer.decode(self.prompts[i // self.n]))
        offsets = [0] * len(choices.handles)
        async for i, event in choices.events(request):
            if event.finish_reason is not None:
                yield chunk(i, event.text, None, event.finish_reason)
            elif event.text or body.logprobs is not None:
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(tokenizer, [event], offsets[i])
                    offsets[i] += len(_token_str(tokenizer, event.token_id))
                yield chunk(i, event.text, logprobs)
        if _include_usage(body):
            yield self._envelope("text_completion", [], usage=choices.usage(self.prompts))

    # chat -------------------------------------------------------------------------------------------

    def chat(self, choices: _Choices, tokenizer) -> dict:
        out = []
        for i, h in enumerate(choices.handles):
            logprobs = None
            if h.logprobs is not None:
                logprobs = {"content": [_chat_logprob(tokenizer, e) for e in choices.tokens[i]]}
            out.append({"index": i, "message": {"role": "assistant", "content": h.text},
                        "logprobs": logprobs, "finish_reason": openai_finish_reason(h.finish_reason)})
        return self._envelope("chat.completion", out, usage=choices.usage(self.prompts))

    async def chat_chunks(self, choices: _Choices, request: Request, body: ChatCompletionRequest,
                          tokenizer) -> AsyncIterator[dict]:
        def chunk(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            return self._envelope("chat.completion.chunk", [
                {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

        for i in range(len(choices.handles)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, event in choices.events(request):
            if event.finish_reason is not None:
                yield chunk(i, {"content": event.text} if event.text else {}, None, event.finish_reason)
            elif event.text or body.logprobs:
                logprobs = {"content": [_chat_logprob(tokenizer, event)]} if body.logprobs else None
                yield chunk(i, {"content": event.text}, logprobs)
        if _include_usage(body):
            yield self._envelope("chat.completion.chunk", [], usage=choices.usage(self.prompts))


def _include_usage(body: _Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _completion_logprobs(tokenizer, events: list[Event], offset: int) -> dict:
    """The legacy completions shape: parallel lists over the tokens."""
    tokens = [_token_str(tokenizer, e.token_id) for e in events]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{_token_str(tokenizer, t): lp for t, lp in e.top_logprobs or []} for e in events],
        "text_offset": offsets,
    }


def _chat_logprob(tokenizer, event: Event) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_str(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(event.token_id, event.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs or []]}
