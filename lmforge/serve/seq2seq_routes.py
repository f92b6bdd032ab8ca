"""`/v1/completions` for encoder-decoder checkpoints (translation, summarisation): the prompt is the
source text and the completion its target text, decoded by `lmforge.generate.translate` with the
request's settings (greedy at temperature 0, sampling otherwise, `n` choices as
`num_return_sequences`, `seed` as offline: the same request gives what `lmforge translate` gives).

This first version decodes each request whole in a worker thread, one request at a time (no
continuous batching, unlike decoder-only serving); `stream: true` sends each choice's text as one
chunk when it is done, then `data: [DONE]`. logprobs and echo are not offered here (400).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lmforge.checkpoint import Checkpoint
from lmforge.errors import LmforgeError
from lmforge.serve.protocol import (
    APIError,
    CompletionRequest,
    ServerLimits,
    check_limits,
    check_model,
    to_generation_config,
)


def add_seq2seq_routes(app: FastAPI, ckpt: Checkpoint, name: str, limits: ServerLimits, created: int) -> None:
    from lmforge.generate import GenerationConfig, translate

    model, tokenizer = ckpt.model, ckpt.tokenizer
    c = model.config
    max_len = c.max_position if c.position != "relative" else 512
    lock = threading.Lock()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model, [name])
        check_limits(body, limits, c.vocab_size)
        if body.echo or body.logprobs is not None:
            raise APIError(400, "echo and logprobs are not offered for encoder-decoder checkpoints",
                           param="echo" if body.echo else "logprobs")
        if not isinstance(body.prompt, str):
            raise APIError(400, "an encoder-decoder takes its source as text", param="prompt")
        # the source is not the decoder's context: the completion only has to fit the decoder
        kwargs = to_generation_config(body)  # n choices are num_return_sequences
        if c.position != "relative" and kwargs["max_new_tokens"] + 1 > max_len:  # + the start token
            raise APIError(400, f"max_tokens must be at most {max_len - 1} for this model's "
                                f"{max_len} decoder positions, got {kwargs['max_new_tokens']}",
                           param="max_tokens", code="context_length_exceeded")
        try:
            config = GenerationConfig(**kwargs)
        except LmforgeError as e:
            raise APIError(400, str(e)) from e

        def run():
            with lock:
                return translate(model, tokenizer, [body.prompt], config,
                                 source_tokenizer=ckpt.source_tokenizer)

        try:
            outputs = await asyncio.to_thread(run)
        except LmforgeError as e:
            raise APIError(400, str(e), param="prompt") from e
        prompt_tokens = len(outputs[0].prompt_ids) if outputs else 0
        completion_tokens = sum(len(o.token_ids) + (o.finish_reason == "eos") for o in outputs)
        reply = {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": i, "text": o.text, "logprobs": None,
                         "finish_reason": "length" if o.finish_reason == "length" else "stop"}
                        for i, o in enumerate(outputs)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if not body.stream:
            return reply

        async def stream():
            for choice in reply["choices"]:
                yield f"data: {json.dumps({**reply, 'choices': [choice], 'usage': None})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def no_chat() -> None:
        raise APIError(400, "this is an encoder-decoder checkpoint: send the source text to "
                            "/v1/completions as the prompt", param="model")
